"""Fidelity metrics against a high-resolution ground truth, as in the paper.

Both images are min-max normalised to ``[0, 1]`` *inside the brain mask*
(separately), then compared inside the mask only.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity


def minmax_in_mask(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(img - min) / (max - min)`` with min/max taken inside ``mask`` (float64)."""
    img = np.asarray(img, dtype=np.float64)
    vals = img[mask]
    lo, hi = vals.min(), vals.max()
    return (img - lo) / (hi - lo if hi > lo else 1.0)


def psnr(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, data range 1) inside ``mask`` after min-max normalisation."""
    mask = np.asarray(mask, dtype=bool)
    p, t = minmax_in_mask(pred, mask), minmax_in_mask(truth, mask)
    mse = float(np.mean((p[mask] - t[mask]) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def ssim(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, win_size: int = 7) -> float:
    """Mean 3-D SSIM inside ``mask`` after min-max normalisation (data range 1).

    The SSIM map is computed on the mask's bounding box with outside voxels
    zeroed, then averaged over the mask voxels.
    """
    mask = np.asarray(mask, dtype=bool)
    p = np.where(mask, minmax_in_mask(pred, mask), 0.0)
    t = np.where(mask, minmax_in_mask(truth, mask), 0.0)
    idx = np.nonzero(mask)
    box = tuple(slice(max(int(i.min()) - win_size, 0), int(i.max()) + win_size + 1) for i in idx)
    _, smap = structural_similarity(t[box], p[box], data_range=1.0, win_size=win_size, full=True)
    return float(smap[mask[box]].mean())
