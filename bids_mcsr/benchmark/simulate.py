"""Simulated thick-slice acquisitions from high-resolution volumes.

Two modes, as in the benchmark issue:

* ``"paper"``: cubic-spline point sampling at the coarse voxel centres (the
  paper's preprocessing; no integration over the slice).
* ``"profile"``: average over each coarse voxel's extent first (a 2-D
  acquisition integrates over its slice thickness; box profile), then sample.

Only integer down-sampling factors along the voxel axes of the HR grid are
supported, which keeps the simulation exact (no interpolation in ``profile``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

MODES = ("paper", "profile")


def lr_affine(hr_affine: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Affine of the coarse grid whose voxel ``i`` covers HR voxels ``[i*f, (i+1)*f)``.

    Its centre sits at HR index ``i*f + (f-1)/2`` along each axis.
    """
    f = np.asarray(factors, dtype=float)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f)
    scale[:3, 3] = (f - 1) / 2
    return np.asarray(hr_affine, dtype=float) @ scale


def simulate_acquisition(
    hr: np.ndarray,
    hr_affine: np.ndarray,
    factors: Sequence[int] = (1, 1, 4),
    mode: str = "profile",
) -> tuple[np.ndarray, np.ndarray]:
    """Make a low-resolution acquisition of ``hr`` (shape ``(X, Y, Z)``).

    Parameters
    ----------
    hr, hr_affine
        High-resolution volume and its voxel-to-world affine.
    factors
        Integer voxel-size multipliers per HR voxel axis, e.g. ``(1, 1, 4)`` for
        4 mm slices along the third axis of a 1 mm volume. Trailing HR voxels that
        do not fill a whole coarse voxel are dropped.
    mode
        ``"paper"`` or ``"profile"`` (see module docstring).

    Returns
    -------
    lr, affine
        float32 volume of shape ``(X // fx, Y // fy, Z // fz)`` and its affine.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    f = [int(v) for v in factors]
    if any(v < 1 for v in f) or len(f) != 3:
        raise ValueError(f"factors must be three integers >= 1, got {factors!r}")
    hr = np.asarray(hr, dtype=np.float64)
    shape = [n // k for n, k in zip(hr.shape[:3], f, strict=True)]
    if min(shape) < 1:
        raise ValueError(f"volume {hr.shape} too small for factors {f}")
    if mode == "profile":
        crop = hr[: shape[0] * f[0], : shape[1] * f[1], : shape[2] * f[2]]
        blocks = crop.reshape(shape[0], f[0], shape[1], f[1], shape[2], f[2])
        lr = blocks.mean(axis=(1, 3, 5))
    else:
        centres = [np.arange(n) * k + (k - 1) / 2 for n, k in zip(shape, f, strict=True)]
        coords = np.stack(np.meshgrid(*centres, indexing="ij"), axis=0)
        lr = ndimage.map_coordinates(hr, coords, order=3, mode="nearest")
    return lr.astype(np.float32), lr_affine(hr_affine, f)
