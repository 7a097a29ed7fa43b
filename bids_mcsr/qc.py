"""Ground-truth-free quality control of super-resolved outputs.

Two families of metrics, both computed without any high-resolution reference:

* **Re-acquisition consistency** (:func:`consistency`): the isotropic output is
  re-acquired with its input's geometry (box slice profile over the slice
  thickness, then sampled at the input voxel centres, see
  :func:`bids_mcsr.resample.acquire`) and compared with the input inside the
  input's foreground. A faithful output explains the data it was fitted to, so
  the re-acquired volume should match the input up to noise. Reported as PSNR
  (dB, peak = the input's robust intensity range) and NRMSE, with the residual
  map on the input grid for the report.
* **Sharpness per axis** (:func:`sharpness`): RMS finite-difference gradient
  along each voxel axis, in units of the robust intensity range per mm, for the
  input and the output. A thick-slice input is blurred through-plane, so its
  through-plane / in-plane ratio is well below 1; super-resolution should raise
  it towards 1 without raising the in-plane value (which would mean noise).

:func:`assess` bundles both into the JSON-able ``QC`` object that goes into the
output sidecar, and :func:`flatten` turns that object into ``group_qc.tsv``
columns.

Conventions: arrays are ``(X, Y, Z)`` volumes with 4x4 voxel-to-world affines
(RAS mm). A rigid ``transform`` maps the input's world to the reference (output)
world, so the input's effective affine is ``geometry.compose(transform, affine)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from .geometry import compose, rotation_of, slice_axis, voxel_map, voxel_sizes
from .masks import foreground_mask, resample_mask
from .resample import acquire, inside_fov

#: Percentiles (inside the foreground) that define the robust intensity range:
#: the PSNR peak and the normaliser of the sharpness values. Robust to a few hot
#: voxels (vessels, fat, artefacts) that would dominate a min-max range.
ROBUST_PERCENTILES = (0.5, 99.5)

#: PSNR reported for a (numerically) perfect match, so the sidecar stays valid
#: JSON (no Infinity): MSE is floored at ``(range * 1e-5)^2``.
PSNR_CAP_DB = 100.0

#: Input voxels compared by the consistency check must have their whole slice
#: profile inside the output field of view; this is the tolerance (voxels).
_FOV_TOLERANCE = 1e-3


def robust_range(
    data: np.ndarray,
    mask: np.ndarray | None = None,
    percentiles: tuple[float, float] = ROBUST_PERCENTILES,
) -> tuple[float, float]:
    """Low and high intensity percentiles of ``data`` inside ``mask`` (all voxels if None)."""
    values = np.asarray(data)[mask] if mask is not None else np.asarray(data).ravel()
    if values.size == 0:
        raise ValueError("robust_range: the mask selects no voxels")
    lo, hi = np.percentile(values, percentiles)
    return float(lo), float(hi)


def _inside_fov(
    lr_shape: tuple[int, ...],
    lr_affine: np.ndarray,
    hr_shape: tuple[int, ...],
    hr_affine: np.ndarray,
) -> np.ndarray:
    """Bool ``lr_shape``: LR voxels whose whole slice profile lies inside the HR field of view.

    A voxel counts as inside when both ends of its slice (+-half a slice step along
    the slice axis) map inside.
    """
    m = voxel_map(lr_affine, hr_affine)
    axis = slice_axis(lr_affine)
    inside = np.ones(tuple(lr_shape[:3]), dtype=bool)
    for half in (-0.5, 0.5):
        shift = [0.0, 0.0, 0.0]
        shift[axis] = half
        inside &= inside_fov(lr_shape, m, hr_shape, _FOV_TOLERANCE, shift)
    return inside


def reacquire(
    output: np.ndarray,
    output_affine: np.ndarray,
    input_shape: tuple[int, ...],
    input_affine: np.ndarray,
    transform: np.ndarray | None = None,
) -> np.ndarray:
    """Re-acquire an output volume with an input's geometry (float32, ``input_shape``).

    The input's effective affine in the output world is ``transform @ input_affine``;
    the box slice profile integrates over the input's slice thickness.
    """
    effective = compose(transform, input_affine)
    return acquire(output, output_affine, input_shape, effective, profile="box")


@dataclass
class Consistency:
    """Result of :func:`consistency`.

    ``residual`` is ``reacquired - input`` on the input grid (float32, input
    intensity units), zero outside ``mask``; ``mask`` marks the compared voxels
    (input foreground inside the output field of view).
    """

    psnr_db: float
    nrmse: float
    intensity_range: tuple[float, float]
    n_voxels: int
    residual: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        """JSON-able summary (no arrays) for the sidecar's ``QC.Consistency``."""
        return {
            "PSNR": _json_number(self.psnr_db, 3),
            "NRMSE": _json_number(self.nrmse, 5),
            "IntensityRange": [round(v, 4) for v in self.intensity_range],
            "RangePercentiles": list(ROBUST_PERCENTILES),
            "Voxels": self.n_voxels,
            "SliceProfile": "box",
        }


def consistency(
    output: np.ndarray,
    output_affine: np.ndarray,
    input_data: np.ndarray,
    input_affine: np.ndarray,
    transform: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> Consistency:
    """Compare an output, re-acquired with the input's geometry, with that input.

    Parameters
    ----------
    output, output_affine
        Isotropic output volume ``(X, Y, Z)`` (input intensity scale) and its affine.
    input_data, input_affine
        The anisotropic input ``(x, y, z)`` and its own (header) affine.
    transform
        4x4 rigid world transform input world -> output world (None: identity).
    mask
        Bool ``input_data.shape`` foreground of the input; None:
        :func:`bids_mcsr.masks.foreground_mask` of the input.

    Returns
    -------
    Consistency
        ``psnr_db = 10 log10(range^2 / MSE)`` (at most :data:`PSNR_CAP_DB`) with ``range = p99.5 - p0.5`` of the
        input inside the compared voxels; ``nrmse = ||reacq - input|| / ||input||``
        (Euclidean norms over the compared voxels, scikit-image's convention).
    """
    input_data = np.asarray(input_data, dtype=np.float32)
    if mask is None:
        mask = foreground_mask(input_data, input_affine)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != input_data.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} != input shape {input_data.shape[:3]}")
    effective = compose(transform, input_affine)
    compared = mask & _inside_fov(input_data.shape, effective, output.shape, output_affine)
    n = int(compared.sum())
    if n == 0:
        raise ValueError("consistency: no input foreground voxel lies inside the output grid")
    reacq = reacquire(output, output_affine, input_data.shape, input_affine, transform)
    lo, hi = robust_range(input_data, compared)
    diff = (reacq - input_data)[compared].astype(np.float64)
    mse = float(np.mean(diff**2))
    peak = max(hi - lo, np.finfo(np.float32).eps)
    psnr = float(min(PSNR_CAP_DB, 10 * np.log10(peak**2 / max(mse, 1e-300))))
    ref = input_data[compared].astype(np.float64)
    norm = float(np.sqrt(np.sum(ref**2)))
    nrmse = float(np.sqrt(np.sum(diff**2)) / norm) if norm > 0 else float("nan")
    residual = np.where(compared, reacq - input_data, 0).astype(np.float32)
    return Consistency(psnr, nrmse, (lo, hi), n, residual, compared)


def axis_codes(affine: np.ndarray) -> list[str]:
    """World direction each voxel axis points to, as nibabel axis codes (e.g. ``['R','A','S']``)."""
    return list(nib.aff2axcodes(np.asarray(affine, dtype=float)))


def nearest_axis(affine: np.ndarray, direction: np.ndarray) -> int:
    """Voxel axis (0-2) of a grid whose world direction is closest to ``direction`` (3,)."""
    return int(np.argmax(np.abs(rotation_of(affine).T @ np.asarray(direction, dtype=float))))


def sharpness(
    data: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray | None = None,
    through_axis: int | None = None,
) -> dict:
    """RMS gradient along each voxel axis, normalised by the robust intensity range.

    For axis ``a`` with spacing ``s_a`` mm: ``G_a = sqrt(mean((I[i+1] - I[i])^2)) /
    (s_a * range)`` over voxel pairs with both voxels in ``mask``; units 1/mm.
    A sharp edge crossed over ``s_a`` mm gives a large value; a thick-slice axis
    spreads the same edge over a long step and gives a small one.

    Parameters
    ----------
    data, affine
        Volume ``(X, Y, Z)`` and its voxel-to-world affine.
    mask
        Bool foreground; None: :func:`bids_mcsr.masks.foreground_mask`.
    through_axis
        Voxel axis that is "through-plane" (default: the largest spacing, i.e.
        the slice axis of an anisotropic input). For an output, pass the output
        axis closest to its input's slice direction (:func:`nearest_axis`).

    Returns
    -------
    dict
        ``Axes`` (world codes), ``Spacing`` (mm), ``RMSGradient`` (per axis, 1/mm),
        ``ThroughPlaneAxis``, ``InPlane`` (mean of the two other axes),
        ``ThroughPlane`` and ``Ratio`` (through-plane / in-plane; 1 = isotropic).
    """
    data = np.asarray(data, dtype=np.float32)
    if mask is None:
        mask = foreground_mask(data, affine)
    mask = np.asarray(mask, dtype=bool)
    lo, hi = robust_range(data, mask)
    scale = max(hi - lo, np.finfo(np.float32).eps)
    spacing = voxel_sizes(affine)
    if through_axis is None:
        through_axis = slice_axis(affine)
    grads = []
    for a in range(3):
        if data.shape[a] < 2:
            grads.append(float("nan"))
            continue
        head = [slice(None)] * 3
        tail = [slice(None)] * 3
        head[a], tail[a] = slice(None, -1), slice(1, None)
        pair = mask[tuple(head)] & mask[tuple(tail)]
        if not pair.any():
            grads.append(float("nan"))
            continue
        d = (data[tuple(tail)] - data[tuple(head)])[pair]
        grads.append(float(np.sqrt(np.mean(np.square(d, dtype=np.float64))) / (spacing[a] * scale)))
    in_plane = float(np.mean([g for a, g in enumerate(grads) if a != through_axis]))
    through = grads[through_axis]
    ratio = through / in_plane if in_plane > 0 else float("nan")
    return {
        "Axes": axis_codes(affine),
        "Spacing": [round(float(s), 4) for s in spacing],
        "RMSGradient": [_json_number(g, 5) for g in grads],
        "ThroughPlaneAxis": int(through_axis),
        "InPlane": _json_number(in_plane, 5),
        "ThroughPlane": _json_number(through, 5),
        "Ratio": _json_number(ratio, 4),
    }


def _json_number(value: float, digits: int) -> float | None:
    # JSON has no NaN; an undefined metric (empty mask, 1-voxel axis) is null.
    return round(float(value), digits) if np.isfinite(value) else None


def assess(
    output: np.ndarray,
    output_affine: np.ndarray,
    input_data: np.ndarray,
    input_affine: np.ndarray,
    transform: np.ndarray | None = None,
    input_mask: np.ndarray | None = None,
    output_mask: np.ndarray | None = None,
) -> tuple[dict, Consistency]:
    """All QC metrics of one output against its input.

    Returns ``(qc, consistency)``: ``qc`` is the JSON-able sidecar object::

        {"Consistency": {...}, "Sharpness": {"Input": {...}, "Output": {...}}}

    and ``consistency`` keeps the residual map for the report. ``output_mask``
    (bool, output shape) limits the output's sharpness to the foreground;
    None: the input mask carried onto the output grid.
    """
    input_data = np.asarray(input_data, dtype=np.float32)
    if input_mask is None:
        input_mask = foreground_mask(input_data, input_affine)
    cons = consistency(output, output_affine, input_data, input_affine, transform, input_mask)
    effective = compose(transform, input_affine)
    if output_mask is None:
        output_mask = resample_mask(input_mask, effective, output.shape, output_affine)
    out_axis = nearest_axis(output_affine, effective[:3, slice_axis(effective)])
    qc = {
        "Consistency": cons.to_dict(),
        "Sharpness": {
            "Input": sharpness(input_data, effective, input_mask),
            "Output": sharpness(output, output_affine, output_mask, through_axis=out_axis),
        },
    }
    return qc, cons


#: ``group_qc.tsv`` column -> path into the sidecar ``QC`` object.
TSV_COLUMNS = {
    "qc_psnr_db": ("Consistency", "PSNR"),
    "qc_nrmse": ("Consistency", "NRMSE"),
    "qc_sharpness_in_plane_input": ("Sharpness", "Input", "InPlane"),
    "qc_sharpness_through_plane_input": ("Sharpness", "Input", "ThroughPlane"),
    "qc_sharpness_ratio_input": ("Sharpness", "Input", "Ratio"),
    "qc_sharpness_in_plane_output": ("Sharpness", "Output", "InPlane"),
    "qc_sharpness_through_plane_output": ("Sharpness", "Output", "ThroughPlane"),
    "qc_sharpness_ratio_output": ("Sharpness", "Output", "Ratio"),
}


def flatten(qc: dict | None) -> dict[str, float | None]:
    """``group_qc.tsv`` columns (:data:`TSV_COLUMNS`) from a sidecar ``QC`` object; None when absent."""
    out: dict[str, float | None] = {}
    for column, path in TSV_COLUMNS.items():
        node = qc
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        out[column] = float(node) if isinstance(node, (int, float)) else None
    return out


#: Robust outlier rule of the group report: a value is flagged when it lies more
#: than this many robust standard deviations from the median of its group.
OUTLIER_K = 3.0
#: Fewer values than this: no flags (a median of two says nothing).
OUTLIER_MIN_N = 3


def robust_outliers(
    values: Sequence[float | None], k: float = OUTLIER_K, min_n: int = OUTLIER_MIN_N
) -> list[str]:
    """Flag each value ``"low"``, ``"high"`` or ``""`` by the median +- k robust SDs rule.

    The robust SD is ``1.4826 * MAD`` (median absolute deviation from the
    median; equals the SD for normal data). When more than half the values are
    identical the MAD is 0; the scale then falls back to ``1.2533 * mean
    absolute deviation`` (also the SD for normal data), and with no spread at
    all nothing is flagged. None/NaN values are never flagged and do not count.
    """
    x = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    finite = x[np.isfinite(x)]
    flags = [""] * len(x)
    if finite.size < min_n:
        return flags
    med = float(np.median(finite))
    dev = np.abs(finite - med)
    scale = 1.4826 * float(np.median(dev))
    if scale == 0:
        scale = 1.2533 * float(np.mean(dev))
    if scale == 0:
        return flags
    for i, v in enumerate(x):
        if np.isfinite(v) and abs(v - med) > k * scale:
            flags[i] = "low" if v < med else "high"
    return flags
