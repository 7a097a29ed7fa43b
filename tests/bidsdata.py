"""Tiny synthetic BIDS datasets for the application tests (fixed seeds, < 20 kB per image).

A phantom "head" (an ellipsoid with a brighter core and a dark ring) is
simulated at 1 mm on a 24 x 28 x 24 mm field of view and re-acquired with thick
slices: ``axial`` = 1x1x4 mm (24x28x6 voxels), ``sagittal`` = 4x1x1 mm,
``coronal`` = 1x4x1 mm, ``iso`` = 1 mm. Contrast ``t1`` and ``t2`` invert the
tissue ordering so the two contrasts are different but share edges.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_mcsr.resample import acquire

HR_SHAPE = (24, 28, 24)
#: The app's 1 mm output grid for an axial 1x1x4 reference of the phantom: on the
#: reference's lattice, whose slice centres (-10 + 4k mm) sit half a voxel off the HR
#: lattice, the union FOV [-12, 12] mm needs 25 whole voxels through the slices.
OUT_SHAPE = (24, 28, 25)
SPACINGS = {
    "axial": (1.0, 1.0, 4.0),
    "sagittal": (4.0, 1.0, 1.0),
    "coronal": (1.0, 4.0, 1.0),
    "iso": (1.0, 1.0, 1.0),
}


def hr_affine() -> np.ndarray:
    aff = np.eye(4)
    aff[:3, 3] = -(np.asarray(HR_SHAPE) - 1) / 2  # centred on the world origin
    return aff


def phantom(contrast: str = "t1", seed: int = 0) -> np.ndarray:
    """(24, 28, 24) float32 phantom; ``contrast`` t1 | t2."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in HR_SHAPE], indexing="ij"), -1)
    r = np.sqrt(
        (((ijk - (np.asarray(HR_SHAPE) - 1) / 2) / (np.asarray(HR_SHAPE) * 0.4)) ** 2).sum(-1)
    )
    vals = {"t1": (300.0, 800.0, 500.0), "t2": (900.0, 350.0, 600.0)}[contrast]
    img = np.where(r < 1.0, vals[2], 0.0)
    img = np.where(r < 0.75, vals[0], img)
    img = np.where((r > 0.35) & (r < 0.55), vals[1], img)
    rng = np.random.default_rng(seed)
    img = img + rng.normal(0, 5, img.shape) * (r < 1.0)
    return img.astype(np.float32)


def lr_geometry(kind: str) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a thick-slice (or 1 mm) acquisition of the phantom FOV."""
    sp = np.asarray(SPACINGS[kind])
    shape = tuple(int(round(n / s)) for n, s in zip(HR_SHAPE, sp, strict=True))
    aff = np.diag([*sp, 1.0])
    # Same FOV as the HR grid: first voxel centre half a thick voxel inside.
    aff[:3, 3] = -np.asarray(HR_SHAPE) / 2 + sp / 2
    return shape, aff  # type: ignore[return-value]


def acquisition(kind: str, contrast: str, seed: int = 0) -> nib.Nifti1Image:
    """A NIfTI of the phantom in ``contrast`` acquired with geometry ``kind``."""
    shape, aff = lr_geometry(kind)
    data = acquire(phantom(contrast, seed), hr_affine(), shape, aff)
    img = nib.Nifti1Image(data.astype(np.float32), aff)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    return img


def make_dataset(root: Path, files: dict[str, tuple[str, str] | bytes], name: str = "test") -> Path:
    """Write a BIDS dataset.

    ``files`` maps paths relative to ``root`` (e.g. ``sub-01/anat/sub-01_T1w.nii.gz``)
    to ``(kind, contrast)`` for a phantom image or to raw bytes (placeholders,
    corrupt files). Adds dataset_description.json, README, participants.tsv and a
    minimal sidecar per image so the validator reports no errors.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": name, "BIDSVersion": "1.9.0", "Authors": ["mcsr tests"]})
    )
    (root / "README").write_text("Synthetic phantom dataset for mcsr tests.\n")
    subjects = sorted({p.split("/")[0] for p in files})
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"{s}\n" for s in subjects))
    for rel, spec in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, bytes):
            path.write_bytes(spec)
            continue
        kind, contrast = spec
        seed = sum(map(ord, rel)) % 1000
        acquisition(kind, contrast, seed).to_filename(str(path))
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(
            json.dumps({"MagneticFieldStrength": 3})
        )
    return root


def pair(sub: str = "01", ses: str | None = None, a: str = "T1w", b: str = "T2w") -> dict:
    """The standard pair: ``a`` axial (t1 contrast) + ``b`` sagittal (t2 contrast)."""
    folder = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + "anat/"
    prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    return {
        f"{folder}{prefix}_{a}.nii.gz": ("axial", "t1"),
        f"{folder}{prefix}_{b}.nii.gz": ("sagittal", "t2"),
    }
