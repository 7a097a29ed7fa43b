"""Loading and validating the NIfTI inputs.

Every problem is reported as one :class:`~bids_mcsr.errors.ImageError` line of the
form ``<file>: <what is wrong>; fix: <what to do>``. Two levels of checking:

* :func:`header_problem` is cheap (header only) and lets discovery skip broken
  files (0-byte placeholders, non-NIfTI files, 2-D/4-D series) before choosing
  which contrasts to fuse.
* :func:`load_image` reads the voxels and checks them too (truncated gzip,
  NaN/Inf, all-zero, qform/sform disagreement).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import ImageError
from .geometry import corners_world, voxel_sizes

#: qform and sform may differ by rounding (the qform is stored as a float32
#: quaternion); beyond this many mm at a field-of-view corner they disagree.
QFORM_SFORM_TOLERANCE_MM = 0.1


@dataclass
class Image:
    """A validated 3-D input image.

    ``data`` is float32 ``(X, Y, Z)`` in the file's intensity scale (scl_slope/inter
    applied); ``affine`` is the 4x4 voxel->world (RAS mm) matrix nibabel selects
    (sform when its code is set, else qform).
    """

    path: Path
    data: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape[:3])  # type: ignore[return-value]

    @property
    def zooms(self) -> np.ndarray:
        """Voxel spacing (3,) in mm, from the affine."""
        return voxel_sizes(self.affine)


def _fail(path: Path, problem: str, fix: str) -> ImageError:
    return ImageError(f"{path}: {problem}; fix: {fix}")


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    # Trailing singleton dimensions (X, Y, Z, 1) are a 3-D image stored as 4-D.
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _open(path: Path) -> nib.Nifti1Image:
    """Open the header of a NIfTI-1/2 file or raise a one-line ImageError."""
    path = Path(path)
    if not path.exists():
        raise _fail(
            path,
            "file does not exist (a broken symlink or an unfetched annex file?)",
            "fetch the file (e.g. `datalad get`) or remove it from the dataset",
        )
    if path.stat().st_size == 0:
        raise _fail(
            path,
            "file is empty (0 bytes)",
            "replace the placeholder with the real image or remove it",
        )
    try:
        img = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise _fail(
            path,
            f"not a readable NIfTI image ({exc.__class__.__name__}: {exc})",
            "re-export the image as NIfTI (.nii or .nii.gz), e.g. with dcm2niix",
        ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise _fail(path, f"is a {type(img).__name__}, not NIfTI", "convert it to NIfTI (.nii.gz)")
    return img


def _check_shape(path: Path, img: nib.Nifti1Image) -> None:
    shape = _spatial_shape(img.shape)
    if len(shape) > 3:
        raise _fail(
            path,
            f"is {len(shape)}-D with shape {shape}, expected one 3-D volume",
            "split the series (e.g. `fslsplit`) and keep one volume per file",
        )
    if len(shape) < 3 or min(shape) < 2:
        raise _fail(
            path,
            f"has shape {shape}, expected a 3-D volume with >= 2 voxels per axis",
            "provide the full multi-slice volume, not a single slice",
        )
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise _fail(
            path,
            "has a singular or non-finite voxel-to-world affine",
            "repair the qform/sform (e.g. re-convert with dcm2niix)",
        )


def _check_qform_sform(path: Path, img: nib.Nifti1Image) -> None:
    qform, qcode = img.get_qform(coded=True)
    sform, scode = img.get_sform(coded=True)
    if qform is None or sform is None or not qcode or not scode:
        return
    shape = _spatial_shape(img.shape)[:3]
    gap = float(
        np.linalg.norm(corners_world(shape, qform) - corners_world(shape, sform), axis=1).max()
    )
    if gap > QFORM_SFORM_TOLERANCE_MM:
        raise _fail(
            path,
            f"qform and sform disagree by up to {gap:.1f} mm, so its position "
            "in the scanner is ambiguous",
            "make them agree, e.g. in nibabel `img.set_qform(img.get_sform())`, "
            "or set the wrong one's code to 0",
        )


def header_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an input (header checks only), or None.

    Cheap enough to run on every anatomical file during discovery.
    """
    try:
        img = _open(Path(path))
        _check_shape(Path(path), img)
        _check_qform_sform(Path(path), img)
    except ImageError as exc:
        return str(exc)
    return None


def load_image(path: Path | str) -> Image:
    """Read and validate a 3-D NIfTI image.

    Returns an :class:`Image` with float32 data. Raises :class:`ImageError`
    (one line naming the file and the fix) for empty/truncated/non-NIfTI files,
    4-D or 2-D data, qform/sform disagreement, NaN/Inf values or an all-zero image.
    """
    path = Path(path)
    img = _open(path)
    _check_shape(path, img)
    _check_qform_sform(path, img)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise _fail(
            path,
            f"voxel data cannot be read, the file is truncated or corrupt "
            f"({exc.__class__.__name__}: {exc})",
            "re-copy or re-export the image; `gzip -t` checks .nii.gz files",
        ) from None
    data = data.reshape(_spatial_shape(data.shape))
    bad = ~np.isfinite(data)
    if bad.any():
        raise _fail(
            path,
            f"contains {int(bad.sum())} NaN/Inf voxels",
            "replace them, e.g. `fslmaths in -nan out` or numpy.nan_to_num, before running mcsr",
        )
    if not np.any(data):
        raise _fail(
            path,
            "every voxel is zero",
            "check the conversion (scl_slope 0?) or remove the empty image",
        )
    return Image(path=path, data=data, affine=np.asarray(img.affine, dtype=float))
