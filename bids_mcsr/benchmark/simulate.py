"""Simulated thick-slice acquisitions from high-resolution volumes, placed as a scanner does.

A scanner does not cut its slices to the voxel lattice of somebody's HR volume:
it centres its field of view on the anatomy, covers it with whole slices, and
each slice centre falls wherever that puts it. :func:`scanner_grid` builds such
a grid for integer factors of the HR spacing: in-plane voxels on the HR
lattice, ``ceil(N / f)`` slices along the thick axis (the field of view is not
cropped to a multiple of ``f``), centred on the HR field of view and shifted
by ``shift_mm`` along the slice axis, so slice centres sit at fractional HR
positions in general.

:func:`simulate_acquisition` then samples the HR volume's cubic B-spline
interpolant (zero outside its field of view) on that grid, two modes:

* ``"paper"``: one point sample at each voxel centre (the paper's
  preprocessing; physically a slice as thin as the HR voxel, with gaps).
* ``"profile"``: the mean of the interpolant over the slice thickness (a box
  slice profile: a 2-D acquisition integrates over its slice), by the midpoint
  rule with :data:`SUBSAMPLES_PER_VOXEL` points per HR voxel of thickness.

``motion`` (a 4x4 rigid world transform) moves the head before the scan
without telling the header: voxel ``i`` holds the HR content at world point
``inv(motion) @ affine @ i``. The correct registration of such a scan onto an
unmoved one is therefore ``inv(motion)`` (moving world -> reference world).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

MODES = ("paper", "profile")
#: Midpoint-rule points along the slice per HR voxel of slice thickness.
SUBSAMPLES_PER_VOXEL = 4
#: Points mapped per map_coordinates call on the moved path (bounds the memory).
_CHUNK = 2_000_000
#: Zero padding (voxels) around the HR volume before prefiltering: beyond the
#: reach of the cubic B-spline prefilter's decay (0.27 per voxel).
_PAD = 12


def scanner_grid(
    hr_shape: Sequence[int],
    hr_affine: np.ndarray,
    factors: Sequence[int],
    shift_mm: float = 0.0,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a thick-slice grid centred on the HR field of view.

    Parameters
    ----------
    hr_shape, hr_affine
        The HR grid ``(X, Y, Z)`` and its voxel-to-world affine (RAS mm).
    factors
        Integer voxel-size multipliers per HR voxel axis, e.g. ``(1, 1, 4)``
        for 4 mm slices along the third axis of a 1 mm volume.
    shift_mm
        Displacement of the grid's centre from the HR grid's centre along the
        thickest axis (mm). Each axis gets ``ceil(N / f)`` voxels.

    Returns
    -------
    shape, affine
        The grid shape and its 4x4 voxel-to-world affine; axes keep the HR
        axes' directions, voxel size ``f`` times the HR voxel size.
    """
    f = np.asarray([int(v) for v in factors], dtype=float)
    if len(f) != 3 or (f < 1).any():
        raise ValueError(f"factors must be three integers >= 1, got {tuple(factors)!r}")
    n_hr = np.asarray(hr_shape[:3], dtype=float)
    shape = np.ceil(n_hr / f).astype(int)
    axis = int(np.argmax(f))
    spacing = float(np.linalg.norm(np.asarray(hr_affine, dtype=float)[:3, axis]))
    centre = (n_hr - 1) / 2
    centre[axis] += shift_mm / spacing
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f)
    scale[:3, 3] = centre - (shape - 1) * f / 2  # LR voxel 0 in HR voxel coordinates
    return (int(shape[0]), int(shape[1]), int(shape[2])), np.asarray(hr_affine, float) @ scale


def _line_weights(n_hr: int, positions: np.ndarray) -> np.ndarray:
    """``(len(positions), n_hr)`` matrix: cubic B-spline interpolation of a line of
    ``n_hr`` samples (zero outside) at fractional ``positions`` (HR voxel units)."""
    eye = np.eye(n_hr)
    rows = np.repeat(positions, n_hr)
    cols = np.tile(np.arange(n_hr, dtype=float), len(positions))
    values = ndimage.map_coordinates(eye, [rows, cols], order=3, mode="grid-constant")
    return values.reshape(len(positions), n_hr)


def simulate_acquisition(
    hr: np.ndarray,
    hr_affine: np.ndarray,
    factors: Sequence[int] = (1, 1, 4),
    mode: str = "profile",
    shift_mm: float = 0.0,
    motion: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Make a low-resolution acquisition of ``hr`` (shape ``(X, Y, Z)``).

    Parameters
    ----------
    hr, hr_affine
        High-resolution volume and its voxel-to-world affine.
    factors, shift_mm
        The acquisition grid (:func:`scanner_grid`).
    mode
        ``"paper"`` or ``"profile"`` (see module docstring).
    motion
        Optional 4x4 rigid world transform applied to the head before the scan
        (module docstring); ``None`` = the head did not move.

    Returns
    -------
    lr, affine
        float32 volume on the grid and its affine (the header a scanner writes:
        it knows nothing of ``motion``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    hr = np.asarray(hr, dtype=np.float64)
    shape, affine = scanner_grid(hr.shape, hr_affine, factors, shift_mm)
    axis = int(np.argmax([int(v) for v in factors]))
    thick = int(factors[axis])
    n_sub = 1 if mode == "paper" or thick == 1 else thick * SUBSAMPLES_PER_VOXEL
    # Sub-sample offsets along the slice axis, in LR voxel units (midpoint rule).
    offsets = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    world = affine if motion is None else np.linalg.inv(np.asarray(motion, float)) @ affine
    to_hr = np.linalg.inv(np.asarray(hr_affine, dtype=float)) @ world
    if motion is None:
        return _on_lattice(hr, to_hr, shape, axis, offsets), affine
    return _moved(hr, to_hr, shape, axis, offsets), affine


def _on_lattice(
    hr: np.ndarray, to_hr: np.ndarray, shape: tuple[int, int, int], axis: int, offsets: np.ndarray
) -> np.ndarray:
    """Separable path: in-plane voxel centres on HR voxel centres, so the tensor-product
    spline reduces to a 1-D interpolation along ``axis`` (exact, and fast)."""
    out = hr
    for ax in range(3):
        step, start = to_hr[ax, ax], to_hr[ax, 3]
        centres = start + step * np.arange(shape[ax])
        if ax == axis:
            pos = (centres[:, None] + step * offsets[None, :]).ravel()
            weights = _line_weights(hr.shape[ax], pos)
            weights = weights.reshape(shape[ax], len(offsets), -1).mean(axis=1)
        elif np.allclose(centres, np.round(centres)) and step == 1:
            idx = np.round(centres).astype(int)
            weights = np.zeros((shape[ax], hr.shape[ax]))
            inside = (idx >= 0) & (idx < hr.shape[ax])
            weights[np.flatnonzero(inside), idx[inside]] = 1.0
        else:
            weights = _line_weights(hr.shape[ax], centres)
        out = np.moveaxis(np.tensordot(weights, out, axes=([1], [ax])), 0, ax)
    return out.astype(np.float32)


def _moved(
    hr: np.ndarray, to_hr: np.ndarray, shape: tuple[int, int, int], axis: int, offsets: np.ndarray
) -> np.ndarray:
    """General path: every sub-sample point mapped into the HR grid and interpolated."""
    # Prefiltered once, zero-padded as map_coordinates pads for "grid-constant"
    # itself, so these samples equal its own (the lattice path's) to rounding.
    coeffs = ndimage.spline_filter(np.pad(hr, _PAD), order=3, mode="mirror")
    total = np.zeros(int(np.prod(shape)), dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    grid = grid.reshape(-1, 3)
    for off in offsets:
        for lo in range(0, len(grid), _CHUNK):
            pts = grid[lo : lo + _CHUNK].copy()
            pts[:, axis] += off
            hr_pts = pts @ to_hr[:3, :3].T + to_hr[:3, 3] + _PAD
            total[lo : lo + _CHUNK] += ndimage.map_coordinates(
                coeffs, hr_pts.T, order=3, mode="grid-constant", prefilter=False
            )
    return (total / len(offsets)).reshape(shape).astype(np.float32)


def rigid_motion_axis_angle(
    axis: Sequence[float], angle_deg: float, translation_mm: Sequence[float], centre=None
) -> np.ndarray:
    """4x4 rigid world transform: a rotation of ``angle_deg`` about ``axis`` (RAS) through
    ``centre`` (mm, default the origin), then a translation (mm)."""
    k = np.asarray(axis, dtype=float)
    k = k / np.linalg.norm(k)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.radians(float(angle_deg))
    rot = np.eye(3) + np.sin(t) * cross + (1 - np.cos(t)) * cross @ cross
    c = np.zeros(3) if centre is None else np.asarray(centre, dtype=float)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = c - rot @ c + np.asarray(translation_mm, dtype=float)
    return out


def displacement_error_mm(
    estimate: np.ndarray | None, truth: np.ndarray | None, points: np.ndarray
) -> tuple[float, float]:
    """Mean and max distance (mm) between two world transforms over ``points`` ``(N, 3)``.

    Both map the same (moving-world) points; ``None`` is the identity.
    """
    eye = np.eye(4)
    a = eye if estimate is None else np.asarray(estimate, dtype=float)
    b = eye if truth is None else np.asarray(truth, dtype=float)
    d = points @ (a - b)[:3, :3].T + (a - b)[:3, 3]
    dist = np.linalg.norm(d, axis=1)
    return float(dist.mean()), float(dist.max())
