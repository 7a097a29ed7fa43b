"""Affines, world coordinates, output grids and slice directions.

Conventions used throughout mcsr:

* An *affine* is the 4x4 NIfTI voxel-to-world matrix (RAS+ scanner space, mm).
  Voxel indices ``(i, j, k)`` address voxel *centres*; voxel ``(i, j, k)`` covers
  ``[i - 0.5, i + 0.5]`` along each axis.
* *World* coordinates are scanner/RAS+ millimetres, shape ``(N, 3)``.
* A *slice axis* is the voxel axis (0, 1 or 2) with the largest spacing; its
  direction in world terms is the through-plane direction.
* *Normalised* coordinates map the union bounding box of all inputs into
  ``[-1, 1]`` with ONE scale for all three axes, so distances stay isotropic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: A contrast counts as anisotropic when largest / smallest spacing >= this.
ANISOTROPY_THRESHOLD = 1.5

#: World axis (RAS) -> name of the plane *perpendicular* to it, i.e. the
#: through-plane direction x means sagittal slices, y coronal, z axial.
_PLANE_OF_WORLD_AXIS = ("sagittal", "coronal", "axial")


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Spacing (mm) along each voxel axis: the column norms of ``affine[:3, :3]``."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def anisotropy(affine: np.ndarray) -> float:
    """Largest over smallest voxel spacing (1.0 for isotropic voxels)."""
    sizes = voxel_sizes(affine)
    return float(sizes.max() / sizes.min())


def is_anisotropic(affine: np.ndarray, threshold: float = ANISOTROPY_THRESHOLD) -> bool:
    """True when the voxel spacing ratio is at least ``threshold``."""
    return anisotropy(affine) >= threshold


def slice_axis(affine: np.ndarray) -> int:
    """Voxel axis (0, 1, 2) with the largest spacing (ties: the last one)."""
    sizes = voxel_sizes(affine)
    return int(np.flatnonzero(np.isclose(sizes, sizes.max(), rtol=1e-3))[-1])


def slice_direction(affine: np.ndarray) -> np.ndarray:
    """Unit world vector (3,) of the slice axis (through-plane direction)."""
    col = np.asarray(affine, dtype=float)[:3, slice_axis(affine)]
    return col / np.linalg.norm(col)


def through_plane(affine: np.ndarray) -> tuple[str, float]:
    """Through-plane direction in world terms and its obliquity.

    Returns ``(plane, angle_deg)``: ``plane`` is ``"axial"`` (slices stacked along
    world z), ``"coronal"`` (y) or ``"sagittal"`` (x), from the world axis closest
    to the slice direction; ``angle_deg`` is the angle between the slice direction
    and that world axis (0 for a non-oblique acquisition).
    """
    direction = np.abs(slice_direction(affine))
    world_axis = int(np.argmax(direction))
    angle = float(np.degrees(np.arccos(np.clip(direction[world_axis], -1.0, 1.0))))
    return _PLANE_OF_WORLD_AXIS[world_axis], angle


def voxel_to_world(ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map voxel coordinates ``(N, 3)`` to world mm ``(N, 3)``."""
    affine = np.asarray(affine, dtype=float)
    return np.asarray(ijk, dtype=float) @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(xyz: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map world mm ``(N, 3)`` to (fractional) voxel coordinates ``(N, 3)``."""
    inv = np.linalg.inv(np.asarray(affine, dtype=float))
    return np.asarray(xyz, dtype=float) @ inv[:3, :3].T + inv[:3, 3]


def voxel_map(affine: np.ndarray, to_affine: np.ndarray) -> np.ndarray:
    """4x4 matrix from voxel indices of one grid (``affine``) to voxel coordinates of another."""
    return np.linalg.inv(np.asarray(to_affine, dtype=float)) @ np.asarray(affine, dtype=float)


def mapped_coordinate(
    shape: Sequence[int],
    matrix: np.ndarray,
    axis: int,
    shift: Sequence[float] = (0.0, 0.0, 0.0),
    start: int = 0,
) -> np.ndarray:
    """Coordinate ``axis`` of ``matrix @ (i, j, k, 1)`` at every voxel of a ``shape`` grid.

    ``matrix``: 4x4 (e.g. ``voxel_map``); ``shift`` (voxels of this grid) is added to
    ``(i, j, k)`` first; ``start`` offsets ``i`` (a slab of a larger grid). The
    mapping is affine, so the ``(X, Y, Z)`` float64 result is built by broadcasting
    three axis ramps, never an ``(N, 3)`` array of voxel coordinates.
    """
    m = np.asarray(matrix, dtype=float)[axis]
    i, j, k = (np.arange(n, dtype=float) + s for n, s in zip(shape[:3], shift, strict=True))
    i += start
    return (m[3] + m[0] * i)[:, None, None] + (m[1] * j)[None, :, None] + (m[2] * k)[None, None, :]


def voxel_grid(shape: Sequence[int]) -> np.ndarray:
    """All voxel indices of a 3-D grid as ``(prod(shape), 3)`` float, C order."""
    axes = [np.arange(n, dtype=float) for n in shape[:3]]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def voxel_centres(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World coordinates ``(prod(shape), 3)`` of every voxel centre, C order."""
    return voxel_to_world(voxel_grid(shape), affine)


def corners_world(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World coordinates ``(8, 3)`` of the outer corners of the field of view."""
    lo = np.full(3, -0.5)
    hi = np.asarray(shape[:3], dtype=float) - 0.5
    corners = np.array(
        [[(hi if b else lo)[a] for a, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)]
    )
    return voxel_to_world(corners, affine)


def world_bounds(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box ``(lo, hi)`` (each ``(3,)``, mm) of the FOV."""
    c = corners_world(shape, affine)
    return c.min(axis=0), c.max(axis=0)


def rotation_of(affine: np.ndarray) -> np.ndarray:
    """Direction cosines (3, 3): ``affine[:3, :3]`` with unit columns (no scaling)."""
    m = np.asarray(affine, dtype=float)[:3, :3]
    return m / np.linalg.norm(m, axis=0, keepdims=True)


def output_grid(
    inputs: Sequence[tuple[Sequence[int], np.ndarray]],
    resolution: float,
    reference_affine: np.ndarray | None = None,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Isotropic grid on the reference's voxel lattice, covering every input's field of view.

    The output's axes follow the reference's voxel axes (direction cosines,
    flips included), and its voxel centres lie on the lattice through the
    reference's voxel ``(0, 0, 0)`` centre with step ``resolution`` along each
    axis. So where ``resolution`` equals a reference spacing (the default: its
    in-plane voxel), output centres coincide with the reference's voxel centres
    along that axis; where the spacing is ``k * resolution`` (4 mm slices at
    1 mm), every k-th output voxel sits on a slice centre. The union of the
    inputs' fields of view (voxel extents, not centres) is covered by whole
    output voxels.

    Parameters
    ----------
    inputs
        ``(shape, affine)`` per input image, affines already in the common
        (reference) world space.
    resolution
        Output voxel size in mm (isotropic).
    reference_affine
        Whose lattice the output follows; default: the first input's.

    Returns
    -------
    shape, affine
        Grid shape ``(nx, ny, nz)`` and its 4x4 voxel-to-world affine.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be > 0 mm, got {resolution}")
    ref = np.asarray(inputs[0][1] if reference_affine is None else reference_affine, dtype=float)
    rot = rotation_of(ref)
    origin = ref[:3, 3]  # the reference's voxel (0, 0, 0) centre
    # Extent of every input along the reference's unit axes, from that centre
    # (mm), so oblique references give a tight grid.
    pts = (np.concatenate([corners_world(s, a) for s, a in inputs]) - origin) @ rot
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    # Output voxel j spans [(j - 1/2) r, (j + 1/2) r]; the tolerance keeps a
    # boundary that falls on a voxel edge from adding a voxel.
    tol = 1e-6
    first = np.floor(lo / resolution + 0.5 + tol)
    last = np.ceil(hi / resolution - 0.5 - tol)
    shape = np.maximum(last - first + 1, 1).astype(int)
    affine = np.eye(4)
    affine[:3, :3] = rot * resolution
    affine[:3, 3] = origin + rot @ (first * resolution)
    return (int(shape[0]), int(shape[1]), int(shape[2])), affine


def lattice_offset(affine: np.ndarray, reference_affine: np.ndarray) -> np.ndarray:
    """Where voxel ``(0, 0, 0)`` of a grid lies in another grid's voxel coordinates ``(3,)``.

    For ``output_grid``'s result and its reference this is a whole multiple of
    ``resolution / spacing`` along each reference axis.
    """
    return voxel_map(affine, reference_affine)[:3, 3]


@dataclass(frozen=True)
class CoordinateNormaliser:
    """Maps world mm to ``[-1, 1]`` with one scale for all axes.

    ``normalised = (world - centre) / half_extent`` where ``half_extent`` is half
    the longest side of the union bounding box (plus ``margin`` mm), so the box
    lands inside ``[-1, 1]^3`` and isotropy is kept.
    """

    centre: np.ndarray  # (3,) mm
    half_extent: float  # mm

    @classmethod
    def from_inputs(
        cls, inputs: Sequence[tuple[Sequence[int], np.ndarray]], margin: float = 0.0
    ) -> CoordinateNormaliser:
        los, his = zip(*(world_bounds(s, a) for s, a in inputs), strict=True)
        lo, hi = np.min(los, axis=0) - margin, np.max(his, axis=0) + margin
        return cls(centre=(lo + hi) / 2, half_extent=float((hi - lo).max() / 2))

    def __call__(self, world: np.ndarray) -> np.ndarray:
        return ((np.asarray(world, dtype=float) - self.centre) / self.half_extent).astype(
            np.float32
        )

    def scale_mm(self, mm: np.ndarray | float) -> np.ndarray | float:
        """Convert a length or displacement in mm to normalised units."""
        return np.asarray(mm, dtype=float) / self.half_extent


def compose(transform: np.ndarray | None, affine: np.ndarray) -> np.ndarray:
    """Affine of an image after a rigid world transform (4x4, image world -> reference world)."""
    if transform is None:
        return np.asarray(affine, dtype=float)
    return np.asarray(transform, dtype=float) @ np.asarray(affine, dtype=float)
