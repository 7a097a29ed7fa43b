"""Resampling between grids: cubic-spline upsampling and slice-profile re-acquisition.

Both functions work in world space through the images' affines, so the grids
may have any orientation. Memory is bounded by processing the target grid in
chunks of ``chunk`` voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .geometry import voxel_grid, voxel_sizes

_CHUNK = 2_000_000


def _prefilter(data: np.ndarray, order: int) -> np.ndarray:
    # Spline coefficients once for the whole volume; map_coordinates on chunks
    # then uses prefilter=False, which keeps chunked results identical.
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
    coeffs = _prefilter(data, order)
    grid = voxel_grid(out_shape)
    out = np.empty(len(grid), dtype=np.float32)
    a = np.asarray(out_affine, dtype=float)
    for start in range(0, len(grid), chunk):
        world = grid[start : start + chunk] @ a[:3, :3].T + a[:3, 3]
        out[start : start + chunk] = sample_world(data, affine, world, order, cval, coeffs)
    return out.reshape(tuple(out_shape[:3]))


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
    grid = voxel_grid(lr_shape)
    a = np.asarray(lr_affine, dtype=float)
    out = np.zeros(len(grid), dtype=np.float64)
    for start in range(0, len(grid), chunk):
        world = grid[start : start + chunk] @ a[:3, :3].T + a[:3, 3]
        acc = np.zeros(len(world))
        for off in offsets:
            acc += sample_world(hr, hr_affine, world + off, order, 0.0, coeffs)
        out[start : start + chunk] = acc / n
    return out.astype(np.float32).reshape(tuple(lr_shape[:3]))
