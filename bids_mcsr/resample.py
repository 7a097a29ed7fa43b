"""Resampling between grids: cubic-spline upsampling and slice-profile re-acquisition.

Both functions work in world space through the images' affines, so the grids
may have any orientation. Grid-to-grid resampling is one affine map of voxel
indices (``geometry.voxel_map``), evaluated by ``scipy.ndimage.affine_transform``
in slabs of about ``chunk`` voxels: no array of per-voxel coordinates is built,
and memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .geometry import mapped_coordinate, voxel_map, voxel_sizes

_CHUNK = 2_000_000


def _prefilter(data: np.ndarray, order: int) -> np.ndarray:
    # Spline coefficients once for the whole volume; the chunked samplers then
    # use prefilter=False, which keeps chunked results identical.
    if order > 1:
        return ndimage.spline_filter(
            np.asarray(data, dtype=np.float64), order=order, mode="nearest"
        )
    return np.asarray(data, dtype=np.float64)


def sample_world(
    data: np.ndarray,
    affine: np.ndarray,
    world: np.ndarray,
    order: int = 3,
    cval: float = 0.0,
    coeffs: np.ndarray | None = None,
) -> np.ndarray:
    """Interpolate ``data`` at world points ``(N, 3)`` mm; outside the FOV gives ``cval``.

    ``coeffs`` may pass precomputed spline coefficients (see ``_prefilter``).
    For every voxel of another grid, ``resample_to_grid`` is faster.
    """
    inv = np.linalg.inv(np.asarray(affine, dtype=float))
    ijk = world @ inv[:3, :3].T + inv[:3, 3]
    if coeffs is None:
        coeffs = _prefilter(data, order)
    out = ndimage.map_coordinates(
        coeffs, ijk.T, order=order, mode="nearest", prefilter=False, output=np.float64
    )
    shape = np.asarray(data.shape[:3]) - 0.5
    outside = np.any((ijk < -0.5) | (ijk > shape), axis=1)
    out[outside] = cval
    return out


def inside_fov(
    shape: Sequence[int],
    matrix: np.ndarray,
    fov_shape: Sequence[int],
    tolerance: float = 0.0,
    shift: Sequence[float] = (0.0, 0.0, 0.0),
    start: int = 0,
) -> np.ndarray:
    """Bool ``shape``: voxels that ``matrix`` maps inside a ``fov_shape`` grid's field of view.

    Inside means every coordinate within ``[-0.5 - tolerance, n - 0.5 + tolerance]``
    (the outer voxel faces). ``matrix``, ``shift`` and ``start``: see
    ``geometry.mapped_coordinate``.
    """
    inside = np.ones((int(shape[0]), *(int(n) for n in shape[1:3])), dtype=bool)
    for d in range(3):
        coord = mapped_coordinate(shape, matrix, d, shift, start)
        inside &= (coord >= -0.5 - tolerance) & (coord <= fov_shape[d] - 0.5 + tolerance)
    return inside


def _sample_grid(
    coeffs: np.ndarray,
    matrix: np.ndarray,
    shape: Sequence[int],
    order: int,
    cval: float,
    chunk: int,
) -> np.ndarray:
    """float64 ``shape``: spline ``coeffs`` sampled at ``matrix @ (i, j, k, 1)`` of every voxel.

    Points outside the coefficients' field of view get ``cval`` (as in ``sample_world``).
    """
    shape = tuple(int(n) for n in shape[:3])
    out = np.empty(shape, dtype=np.float64)
    step = max(1, chunk // max(1, shape[1] * shape[2]))
    for x0 in range(0, shape[0], step):
        slab = (min(step, shape[0] - x0), *shape[1:])
        ndimage.affine_transform(
            coeffs,
            matrix[:3, :3],
            matrix[:3, 3] + matrix[:3, 0] * x0,
            output_shape=slab,
            output=out[x0 : x0 + slab[0]],
            order=order,
            mode="nearest",
            prefilter=False,
        )
        outside = ~inside_fov(slab, matrix, coeffs.shape, start=x0)
        out[x0 : x0 + slab[0]][outside] = cval
    return out


def resample_to_grid(
    data: np.ndarray,
    affine: np.ndarray,
    out_shape: Sequence[int],
    out_affine: np.ndarray,
    order: int = 3,
    cval: float = 0.0,
    chunk: int = _CHUNK,
) -> np.ndarray:
    """Resample a volume onto another grid by spline interpolation (``order`` 0-5).

    This is the cubic-spline baseline when ``order=3``. Points outside the input
    field of view get ``cval``. Returns float32 of shape ``out_shape``.
    """
    matrix = voxel_map(out_affine, affine)
    values = _sample_grid(_prefilter(data, order), matrix, out_shape, order, cval, chunk)
    return values.astype(np.float32)


def profile_offsets(
    lr_affine: np.ndarray, axis: int, n: int, thickness: float | None = None
) -> np.ndarray:
    """World displacements ``(n, 3)`` mm spreading a box slice profile.

    The slice of ``thickness`` mm (None: the spacing along voxel ``axis``) is split
    into ``n`` equal parts; the offsets are their midpoints relative to the slice
    centre, along the slice direction in world space.
    """
    col = np.asarray(lr_affine, dtype=float)[:3, axis]
    t = (np.arange(n) + 0.5) / n - 0.5  # fractions of the thickness
    if thickness is not None:
        col = col * (thickness / np.linalg.norm(col))
    return t[:, None] * col[None, :]


def acquire(
    hr: np.ndarray,
    hr_affine: np.ndarray,
    lr_shape: Sequence[int],
    lr_affine: np.ndarray,
    profile: str = "box",
    order: int = 1,
    chunk: int = _CHUNK,
) -> np.ndarray:
    """Re-acquire a high-resolution volume on a (thick-slice) low-resolution grid.

    ``profile="box"`` averages the HR volume over each LR voxel's slice thickness
    (a 2-D acquisition integrates over the slice), using one sample per HR voxel
    spacing across the slice; ``profile="point"`` samples at LR voxel centres.
    Returns float32 of shape ``lr_shape``.
    """
    if profile not in ("box", "point"):
        raise ValueError(f"profile must be 'box' or 'point', got {profile!r}")
    sizes = voxel_sizes(lr_affine)
    axis = int(np.argmax(sizes))
    n = 1
    if profile == "box":
        n = max(1, int(np.ceil(sizes[axis] / voxel_sizes(hr_affine).min() - 1e-6)))
    offsets = profile_offsets(lr_affine, axis, n)
    coeffs = _prefilter(hr, order)
    matrix = voxel_map(lr_affine, hr_affine)
    to_hr = np.linalg.inv(np.asarray(hr_affine, dtype=float))[:3, :3]
    out = np.zeros(tuple(int(v) for v in lr_shape[:3]), dtype=np.float64)
    for off in offsets:
        # the same LR grid moved by a world offset: only the translation changes
        moved = matrix.copy()
        moved[:3, 3] += to_hr @ off
        out += _sample_grid(coeffs, moved, lr_shape, order, 0.0, chunk)
    return (out / n).astype(np.float32)
