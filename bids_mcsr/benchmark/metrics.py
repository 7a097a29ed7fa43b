"""Fidelity metrics against a high-resolution ground truth, as in the paper.

Both images are min-max normalised to ``[0, 1]`` *inside the brain mask*
(separately), then compared inside the mask only. Because the prediction's own
minimum and maximum set its scale, one extreme voxel (e.g. at the mask edge)
shifts every other voxel's score; ``psnr_truth_range`` maps both images with the
truth's minimum and maximum instead, so it measures the voxel errors alone.

The MI errors of the paper's Table 1 use the engine's histogram MI
(:func:`bids_mcsr.inr.mi.mutual_information`: 32 bins, natural log) on the
voxels inside the mask, so the benchmark and the stopping rule measure MI alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_multiotsu
from skimage.metrics import structural_similarity

from ..inr.mi import mutual_information


def minmax_in_mask(img: np.ndarray, mask: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """``(img - min) / (max - min)`` with min/max of ``ref`` (default: ``img``) inside ``mask``.

    float64, same shape as ``img``.
    """
    img = np.asarray(img, dtype=np.float64)
    vals = (img if ref is None else np.asarray(ref, dtype=np.float64))[mask]
    lo, hi = vals.min(), vals.max()
    return (img - lo) / (hi - lo if hi > lo else 1.0)


def _psnr_db(p: np.ndarray, t: np.ndarray, where: np.ndarray) -> float:
    """PSNR (dB, data range 1) of normalised images ``p`` against ``t`` over ``where``."""
    mse = float(np.mean((p[where] - t[where]) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def _scored(mask: np.ndarray, region: np.ndarray | None, metric: str) -> np.ndarray:
    """The voxels a PSNR averages over: ``mask``, or ``mask & region``; never empty."""
    where = mask if region is None else mask & np.asarray(region, dtype=bool)
    if not where.any():
        raise ValueError(f"{metric}: the scoring region is empty")
    return where


def psnr(
    pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, region: np.ndarray | None = None
) -> float:
    """PSNR (dB, data range 1) inside ``mask`` after min-max normalisation.

    ``region`` (bool, same shape) restricts the squared error to a sub-region,
    e.g. lesions, while the normalisation still uses the whole ``mask``.
    """
    mask = np.asarray(mask, dtype=bool)
    where = _scored(mask, region, "psnr")
    return _psnr_db(minmax_in_mask(pred, mask), minmax_in_mask(truth, mask), where)


def psnr_truth_range(
    pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, region: np.ndarray | None = None
) -> float:
    """PSNR (dB) inside ``mask`` with both images scaled by the truth's in-mask range.

    ``10 log10(1 / mean(((pred - truth) / (max - min))^2))``, min and max of
    ``truth`` inside ``mask``: no re-normalisation of the prediction, so a few
    out-of-range voxels cost only their own error. ``region`` (bool, same shape)
    restricts the mean to a sub-region, e.g. lesions; the scale stays the mask's.
    """
    mask = np.asarray(mask, dtype=bool)
    where = _scored(mask, region, "psnr_truth_range")
    return _psnr_db(minmax_in_mask(pred, mask, ref=truth), minmax_in_mask(truth, mask), where)


def ssim(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, win_size: int = 7) -> float:
    """Mean 3-D SSIM inside ``mask``, both images scaled by the truth's in-mask range.

    The scaling of ``psnr_truth_range`` (data range 1): the prediction's own
    extremes do not rescale it. The SSIM map is computed on the mask's bounding
    box with outside voxels zeroed, then averaged over the mask voxels.
    """
    mask = np.asarray(mask, dtype=bool)
    p = np.where(mask, minmax_in_mask(pred, mask, ref=truth), 0.0)
    t = np.where(mask, minmax_in_mask(truth, mask), 0.0)
    idx = np.nonzero(mask)
    box = tuple(slice(max(int(i.min()) - win_size, 0), int(i.max()) + win_size + 1) for i in idx)
    _, smap = structural_similarity(t[box], p[box], data_range=1.0, win_size=win_size, full=True)
    return float(smap[mask[box]].mean())


def mi_errors(
    preds: Mapping[str, np.ndarray],
    truths: Mapping[str, np.ndarray],
    mask: np.ndarray,
    scored: Sequence[str],
    bins: int = 32,
) -> dict[str, float]:
    """The paper's MI errors for one subject with two contrasts (nats).

    ``eps_<C>`` = ``|MI(pred_C, truth_P) - MI(truth_C, truth_P)|`` for each scored
    contrast ``C`` with partner ``P``; ``eps_hat`` = ``|MI(pred_1, pred_2) -
    MI(truth_1, truth_2)|``. All MIs are over the voxels inside ``mask``. Where
    a partner has no HR ground truth its given volume stands in as ``truth_P``.
    """
    names = list(preds)
    if len(names) != 2 or set(names) != set(truths):
        raise ValueError(f"mi_errors needs the same two contrasts in preds and truths, got {names}")
    m = np.asarray(mask, dtype=bool)

    def mi(a: np.ndarray, b: np.ndarray) -> float:
        return mutual_information(a[m], b[m], bins)

    a, b = names
    out = {}
    for c in scored:
        p = b if c == a else a
        out[f"eps_{c}"] = abs(mi(preds[c], truths[p]) - mi(truths[c], truths[p]))
    out["eps_hat"] = abs(mi(preds[a], preds[b]) - mi(truths[a], truths[b]))
    return out


def white_matter_mask(
    t1: np.ndarray, mask: np.ndarray, lesions: np.ndarray, margin_vox: float = 2.0
) -> np.ndarray:
    """Approximate normal-appearing white matter from a T1-weighted volume (bool).

    The brightest of three Otsu classes of T1w intensity inside ``mask`` (WM is
    brightest on T1w), farther than ``margin_vox`` voxels (Euclidean) from the
    mask's edge (no partial volume with CSF/background; the array border counts
    as edge) and from any lesion (no perilesional tissue).
    """
    mask = np.asarray(mask, dtype=bool)
    upper = threshold_multiotsu(np.asarray(t1)[mask], classes=3)[-1]
    inner = _distance_outside(~mask) > margin_vox
    far = _distance_outside(np.asarray(lesions, dtype=bool)) > margin_vox
    return inner & far & (np.asarray(t1) > upper)


def _distance_outside(region: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxels) of every voxel to ``region``; outside the array is in it."""
    padded = np.pad(~region, 1, constant_values=False)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1, 1:-1]


def lesion_contrast(img: np.ndarray, lesions: np.ndarray, wm: np.ndarray) -> float:
    """Relative lesion-to-white-matter contrast ``mean(lesions) / mean(wm) - 1``.

    On FLAIR, MS lesions are hyperintense, so this is positive and shrinks when
    lesions are smoothed into their surroundings. Needs a positive WM mean.
    """
    lesions, wm = np.asarray(lesions, dtype=bool), np.asarray(wm, dtype=bool)
    if not lesions.any() or not wm.any():
        raise ValueError("lesion_contrast: empty lesion or white-matter mask")
    mean_wm = float(np.mean(img[wm]))
    if mean_wm <= 0:
        raise ValueError(f"lesion_contrast: white-matter mean {mean_wm:.3g} is not positive")
    return float(np.mean(img[lesions]) / mean_wm - 1.0)
