"""Foreground masks, skull-stripped detection and the output-grid mask.

A *foreground mask* is a boolean array on an image's own voxel grid that is
True inside the imaged object (the head, or the brain for skull-stripped
inputs) and False in the air/background around it. Masks choose the training
samples of the engine and the region in which mutual information is measured;
they are never used to change intensities.

Morphology is done in millimetres: structuring elements are ellipsoids whose
half-width along each voxel axis is ``radius_mm / spacing`` voxels, so a
1x1x4 mm thick-slice image is opened/closed by the same physical distance
in-plane and through-plane (where that often means zero or one voxel).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from .geometry import voxel_sizes
from .resample import resample_to_grid

#: Radius (mm) of the opening that removes background noise specks and thin
#: bridges (e.g. to head-rest or coil artefacts) before keeping the largest object.
OPEN_RADIUS_MM = 2.0
#: Radius (mm) of the closing that bridges dark gaps in the object (sulcal CSF,
#: skull diploe in T2w) before the holes are filled.
CLOSE_RADIUS_MM = 4.0
#: A voxel grid matches another when its affine agrees within this (mm).
GRID_ATOL_MM = 1e-3


def ellipsoid(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Boolean ellipsoidal structuring element of ``radius_mm`` on a voxel grid.

    ``spacing`` is the voxel size (mm) per axis; the half-width along axis ``a``
    is ``round(radius_mm / spacing[a])`` voxels (0 means no extent along it).
    """
    half = [int(np.floor(radius_mm / s + 0.5)) for s in spacing]
    grids = np.meshgrid(
        *[np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=True)], indexing="ij"
    )
    dist2 = sum(g.astype(float) ** 2 for g in grids)
    return dist2 <= radius_mm**2 + 1e-9


def _spacing(data: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    return np.ones(3) if affine is None else voxel_sizes(affine)


def _dilate(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation(mask, ellipsoid(radius_mm, spacing))


def _erode(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    return ndimage.binary_erosion(mask, ellipsoid(radius_mm, spacing), border_value=1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_holes(mask: np.ndarray, slice_ax: int) -> np.ndarray:
    # 3-D filling misses cavities that open onto the first/last slice (common
    # when a thick-slice FOV cuts through the head), so holes are also filled
    # slice by slice along the acquisition's slice axis.
    filled = ndimage.binary_fill_holes(mask)
    moved = np.moveaxis(filled, slice_ax, 0)
    for k in range(moved.shape[0]):
        moved[k] = ndimage.binary_fill_holes(moved[k])
    return filled


def background_threshold(data: np.ndarray) -> float:
    """Intensity separating background (air) from any tissue, by two-stage Otsu.

    Bright outliers (vessels, fat, artefacts) are clipped at the 99.9th
    percentile first. A single Otsu threshold on a head image usually lands
    between dark and bright *tissue* (it cuts away dark scalp in FLAIR and CSF
    at the brain surface), so Otsu is applied a second time to the values below
    the first threshold, which splits air from the darkest tissue.
    """
    values = np.asarray(data, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    lo, hi = np.percentile(values, [0.0, 99.9])
    if hi <= lo:
        return float(lo)
    values = np.clip(values, lo, hi)
    first = threshold_otsu(values, nbins=256)
    below = values[values <= first]
    if np.ptp(below) == 0:
        return float(first)
    return float(threshold_otsu(below, nbins=256))


def foreground_mask(data: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
    """Foreground (head or brain) of one 3-D image.

    A two-stage Otsu threshold (``background_threshold``) separates object
    from background; an opening
    (``OPEN_RADIUS_MM``) removes noise and thin bridges, the largest connected
    object is kept, a closing (``CLOSE_RADIUS_MM``) bridges dark gaps and holes
    are filled (in 3-D and per slice along the slice axis).

    Parameters
    ----------
    data
        ``(X, Y, Z)`` intensities, any real dtype; NaNs count as background.
    affine
        4x4 voxel-to-world matrix; only its voxel sizes are used, to make the
        morphology isotropic in mm. ``None`` treats voxels as 1 mm cubes.

    Returns
    -------
    ``(X, Y, Z)`` bool. An image with no contrast (constant) gives all False.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"foreground_mask expects a 3-D array, got shape {data.shape}")
    finite = np.isfinite(data)
    if not finite.any() or np.ptp(data[finite]) == 0:
        return np.zeros(data.shape, dtype=bool)
    spacing = _spacing(data, affine)
    mask = finite & (data > background_threshold(data[finite]))
    # Pad so that closing near the FOV border does not erode the object there.
    pad = [(int(np.ceil(CLOSE_RADIUS_MM / s)) + 1,) * 2 for s in spacing]
    mask = np.pad(mask, pad)
    opened = _dilate(_erode(mask, OPEN_RADIUS_MM, spacing), OPEN_RADIUS_MM, spacing)
    if opened.any():  # tiny objects vanish under the opening; keep them then
        mask = opened
    mask = _largest_component(mask)
    mask = _erode(_dilate(mask, CLOSE_RADIUS_MM, spacing), CLOSE_RADIUS_MM, spacing)
    mask = mask[tuple(slice(p, p + n) for (p, _), n in zip(pad, data.shape, strict=True))]
    return _fill_holes(mask, int(np.argmax(spacing)))


#: ``is_skull_stripped``: minimum fraction of the background shell that must
#: hold exactly the background value.
STRIPPED_SHELL_FRACTION = 0.7
#: Thickness (mm) of the shell just outside the foreground that is inspected.
SHELL_MM = 4.0


def is_skull_stripped(
    data: np.ndarray, mask: np.ndarray | None = None, affine: np.ndarray | None = None
) -> bool:
    """Whether an image looks skull-stripped (brain extracted, background zeroed).

    Heuristic: brain-extraction tools set everything outside the brain to one
    constant (usually 0), so the voxels *immediately outside* the object carry
    exactly that value: the object ends in a sharp cutoff. A raw scan instead
    has noise (Rician, never exactly constant) in the air next to the scalp,
    even when the scanner zero-fills the far background or the corners of the
    FOV. The image is called skull-stripped when at least
    ``STRIPPED_SHELL_FRACTION`` of a ``SHELL_MM`` thick shell around the
    foreground equals the most common background value.

    Parameters
    ----------
    data
        ``(X, Y, Z)`` intensities.
    mask
        Its foreground (default: ``foreground_mask(data, affine)``).
    affine
        Voxel-to-world matrix, for the shell thickness in mm (default 1 mm voxels).
    """
    data = np.asarray(data, dtype=np.float32)
    if mask is None:
        mask = foreground_mask(data, affine)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or mask.all():
        return False
    spacing = _spacing(data, affine)
    shell = _dilate(mask, SHELL_MM, spacing) & ~mask
    if not shell.any():
        return False
    values, counts = np.unique(data[~mask], return_counts=True)
    background = values[np.argmax(counts)]
    return bool(np.mean(data[shell] == background) >= STRIPPED_SHELL_FRACTION)


def resample_mask(
    mask: np.ndarray,
    mask_affine: np.ndarray,
    shape: Sequence[int],
    affine: np.ndarray,
) -> np.ndarray:
    """A mask moved onto another voxel grid through world space.

    Trilinear interpolation of the 0/1 mask, thresholded at 0.5, so the mask
    boundary moves by less than half a voxel of either grid. Points outside the
    mask's field of view are False. ``mask_affine`` must already include any
    registration transform (``geometry.compose``).
    """
    values = resample_to_grid(
        np.asarray(mask, dtype=np.float32), mask_affine, shape, affine, order=1, cval=0.0
    )
    return values > 0.5


def output_mask(
    masks_with_affines: Sequence[tuple[np.ndarray, np.ndarray]],
    out_shape: Sequence[int],
    out_affine: np.ndarray,
) -> np.ndarray:
    """Foreground on the output grid: the UNION of the input masks in world space.

    Union, not intersection: the contrasts often cover different fields of
    view (thick-slice stacks end at different heights), and a region imaged by
    any one contrast is still reconstructed and must take part in MI and QC;
    an intersection would also shrink the mask wherever one contrast is
    misregistered or has signal dropout.

    Parameters
    ----------
    masks_with_affines
        ``(mask, affine)`` per input; each affine maps that mask's voxels to the
        reference world (registration transform already composed).
    out_shape, out_affine
        The output grid.

    Returns
    -------
    ``out_shape`` bool.
    """
    out = np.zeros(tuple(out_shape[:3]), dtype=bool)
    for mask, affine in masks_with_affines:
        out |= resample_mask(mask, affine, out_shape, out_affine)
    return out


def grid_mismatch(
    shape: Sequence[int],
    affine: np.ndarray,
    ref_shape: Sequence[int],
    ref_affine: np.ndarray,
    atol: float = GRID_ATOL_MM,
) -> str | None:
    """Why a grid differs from a reference grid, or None when they match.

    Affines match when every entry agrees within ``atol`` (mm for the
    translations, mm per voxel for the columns).
    """
    if tuple(shape[:3]) != tuple(ref_shape[:3]):
        return f"shape {tuple(shape[:3])} != {tuple(ref_shape[:3])}"
    diff = np.abs(np.asarray(affine, dtype=float) - np.asarray(ref_affine, dtype=float)).max()
    if diff > atol:
        return f"affine differs by up to {diff:.3g} mm"
    return None


def load_mask(
    path: str | Path,
    ref_shape: Sequence[int],
    ref_affine: np.ndarray,
    ref_name: str = "the reference image",
) -> np.ndarray:
    """Read a user-given mask (``--mask``) that must lie on the reference grid.

    Any voxel > 0 is foreground. The mask must have the same shape and affine
    as the reference contrast (the first one), because it is a region of that
    image; it is moved to the other inputs and to the output grid in world space.

    Raises
    ------
    ValueError
        One line naming the file and the fix, when the file cannot be read, is
        not 3-D, is empty, or is on another grid.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise ValueError(
            f"--mask {path}: cannot read it as NIfTI ({exc}); give a .nii/.nii.gz file"
        ) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"--mask {path}: expected a 3-D mask, got shape {data.shape}")
    why = grid_mismatch(data.shape, img.affine, ref_shape, ref_affine)
    if why is not None:
        raise ValueError(
            f"--mask {path}: not on the grid of {ref_name} ({why}); "
            "resample the mask onto that image first (nearest neighbour)"
        )
    mask = np.nan_to_num(data.astype(np.float32)) > 0
    if not mask.any():
        raise ValueError(f"--mask {path}: the mask is empty (no voxel > 0)")
    return mask
