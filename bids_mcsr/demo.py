"""Demo: ``python -m bids_mcsr.demo --out demo``.

Builds a one-subject BIDS dataset from data that ships inside nilearn (the
MNI152 2009 T1 template and its grey/white-matter probability maps, so nothing
is downloaded), runs the participant and group levels on it and prints where
the outputs are, plus how close each output is to the ground truth compared
with cubic-spline interpolation.

The dataset mimics a routine clinical pair: a T1w with thick axial slices and a
T2w-like contrast (synthesised from the tissue maps: CSF bright, grey matter
brighter than white matter) with thick sagittal slices, each acquired from the
ground truth with a box slice profile (``resample.acquire``) plus 1 % noise.

Size: to finish in a few minutes on 2 CPU cores the default demo is SHRUNK to
a 64 mm cube at the centre of the brain (``--crop 64``), keeping the real
geometry: T1w 1x1x4 mm axial and T2w 4x1x1 mm sagittal -> 1 mm isotropic.
``--crop 0`` runs the whole brain (about 30x the work; use a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from .geometry import voxel_sizes
from .resample import acquire, resample_to_grid

SUBJECT = "01"
#: Thick-slice factor: slice thickness / in-plane spacing.
FACTOR = 4
NOISE = 0.01
#: T2w-like synthesis: intensity of pure CSF, grey and white matter.
T2_TISSUE = {"csf": 1000.0, "gm": 600.0, "wm": 350.0}
#: mcsr options of the demo run (any other argument of the demo is passed on too).
#: None needed: the fast preset shrinks its batch for small volumes such as the
#: cropped demo (``min_steps_per_epoch``), so it gets enough optimiser steps.
DEMO_OPTIONS: tuple[str, ...] = ()
T1_SCALE = 1000.0  # nilearn's template is scaled to [0, 1]; MRI scanners give hundreds


def load_templates() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """nilearn's packaged MNI152 T1, GM and WM maps at 1 mm: ``(t1, gm, wm, affine)``."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    return (
        t1.get_fdata(dtype=np.float32),
        gm.get_fdata(dtype=np.float32),
        wm.get_fdata(dtype=np.float32),
        np.asarray(t1.affine, dtype=float),
    )


def ground_truth(
    voxel_mm: float, crop_mm: float | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Ground-truth T1w and T2w on a brain-cropped isotropic ``voxel_mm`` grid.

    ``crop_mm`` limits the field of view to a cube of that side around the
    brain's centre (None: the whole brain). The grid's shape is a multiple of
    :data:`FACTOR` so that the thick-slice acquisitions cover exactly the same
    field of view. Returns ``({"T1w": (X,Y,Z), "T2w": (X,Y,Z)}, affine)``.
    """
    t1, gm, wm, aff = load_templates()
    brain = t1 > 0
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    t2 = T2_TISSUE["csf"] * csf + T2_TISSUE["gm"] * gm + T2_TISSUE["wm"] * wm
    # Crop to the brain's bounding box (+4 mm) on the target grid.
    idx = np.argwhere(brain)
    lo_mm = (idx.min(0) - 4) @ aff[:3, :3].T + aff[:3, 3]
    hi_mm = (idx.max(0) + 4) @ aff[:3, :3].T + aff[:3, 3]
    if crop_mm is not None:
        centre = (lo_mm + hi_mm) / 2
        lo_mm = np.maximum(lo_mm, centre - crop_mm / 2)
        hi_mm = np.minimum(hi_mm, centre + crop_mm / 2)
    step = voxel_mm * FACTOR
    shape = (np.ceil((hi_mm - lo_mm) / step) * FACTOR).astype(int)
    out_aff = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    out_aff[:3, 3] = (lo_mm + hi_mm) / 2 - (shape - 1) * voxel_mm / 2
    vols = {}
    for name, vol in (("T1w", t1 * T1_SCALE), ("T2w", t2)):
        # Box-average when coarsening so the ground truth is not aliased.
        src = vol if voxel_mm <= 1 else _box_smooth(vol, voxel_mm)
        vols[name] = np.clip(resample_to_grid(src, aff, shape, out_aff, order=1), 0, None)
    return vols, out_aff


def _box_smooth(vol: np.ndarray, width: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.uniform_filter(vol, size=max(1, int(round(width))), mode="nearest")


def thick_slice_grid(
    shape: tuple[int, ...], affine: np.ndarray, axis: int, factor: int = FACTOR
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Grid with ``factor``-times thicker voxels along ``axis``, same field of view."""
    lr_shape = list(shape[:3])
    lr_shape[axis] = shape[axis] // factor
    lr_aff = np.array(affine, dtype=float)
    lr_aff[:3, axis] *= factor
    # The first thick voxel covers the first `factor` fine voxels: its centre
    # sits (factor - 1) / 2 fine voxels further along the axis.
    lr_aff[:3, 3] = affine[:3, 3] + affine[:3, axis] * (factor - 1) / 2
    return tuple(lr_shape), lr_aff  # type: ignore[return-value]


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.to_filename(str(path))


def build_dataset(
    root: Path, voxel_mm: float = 1.0, seed: int = 0, crop_mm: float | None = None
) -> dict[str, Path]:
    """Write the demo BIDS dataset under ``root/bids`` and the ground truth under ``root/truth``.

    Returns the paths ``{"bids": ..., "T1w": truth file, "T2w": truth file}``.
    """
    root = Path(root)
    bids = root / "bids"
    truth, aff = ground_truth(voxel_mm, crop_mm)
    rng = np.random.default_rng(seed)
    anat = bids / f"sub-{SUBJECT}" / "anat"
    # T1w: thick axial slices (world z = voxel axis 2); T2w: thick sagittal (x = axis 0).
    for name, axis, plane in (("T1w", 2, "axial"), ("T2w", 0, "sagittal")):
        lr_shape, lr_aff = thick_slice_grid(truth[name].shape, aff, axis)
        lr = acquire(truth[name], aff, lr_shape, lr_aff, profile="box")
        lr += rng.normal(0.0, NOISE * float(truth[name].max()), lr.shape).astype(np.float32)
        _save(anat / f"sub-{SUBJECT}_{name}.nii.gz", np.clip(lr, 0, None), lr_aff)
        sidecar = {
            "MagneticFieldStrength": 3,
            "MRAcquisitionType": "2D",
            "SliceThickness": float(voxel_sizes(lr_aff)[axis]),
            "Description": f"synthetic {plane} thick-slice acquisition from nilearn's MNI152",
        }
        (anat / f"sub-{SUBJECT}_{name}.json").write_text(json.dumps(sidecar, indent=2))
        _save(root / "truth" / f"sub-{SUBJECT}_{name}_truth.nii.gz", truth[name], aff)
    (bids / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "mcsr demo (synthetic, from nilearn's MNI152 2009 template)",
                "BIDSVersion": "1.9.0",
                "DatasetType": "raw",
                "License": "CC0",
                "Authors": ["mcsr demo generator"],
            },
            indent=2,
        )
    )
    (bids / "README").write_text(
        "Synthetic demo dataset made by `python -m bids_mcsr.demo` from the MNI152 2009 "
        "template packaged with nilearn: one subject, T1w with thick axial slices and a "
        "synthetic T2w with thick sagittal slices.\n"
    )
    (bids / "participants.tsv").write_text(f"participant_id\nsub-{SUBJECT}\n")
    return {
        "bids": bids,
        "T1w": root / "truth" / f"sub-{SUBJECT}_T1w_truth.nii.gz",
        "T2w": root / "truth" / f"sub-{SUBJECT}_T2w_truth.nii.gz",
    }


def psnr(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) inside ``mask``, peak = the truth's maximum there."""
    mse = float(np.mean((estimate[mask] - truth[mask]) ** 2))
    return 10 * np.log10(float(truth[mask].max()) ** 2 / max(mse, 1e-12))


def compare(out_dir: Path, paths: dict[str, Path]) -> list[tuple[str, float, float]]:
    """``(contrast, PSNR of cubic spline, PSNR of mcsr)`` inside the brain, per contrast."""
    rows = []
    anat_in = paths["bids"] / f"sub-{SUBJECT}" / "anat"
    for name in ("T1w", "T2w"):
        gt = nib.load(str(paths[name]))
        truth, aff = gt.get_fdata(dtype=np.float32), gt.affine
        mask = truth > 0.05 * truth.max()
        out = nib.load(
            str(out_dir / f"sub-{SUBJECT}" / "anat" / f"sub-{SUBJECT}_desc-superres_{name}.nii.gz")
        )
        sr = resample_to_grid(
            out.get_fdata(dtype=np.float32), out.affine, truth.shape, aff, order=1
        )
        lr = nib.load(str(anat_in / f"sub-{SUBJECT}_{name}.nii.gz"))
        spline = resample_to_grid(
            lr.get_fdata(dtype=np.float32), lr.affine, truth.shape, aff, order=3
        )
        rows.append((name, psnr(spline, truth, mask), psnr(sr, truth, mask)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bids_mcsr.demo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="folder for the demo")
    p.add_argument(
        "--voxel",
        type=float,
        default=1.0,
        help="in-plane / output voxel size in mm (slices are 4x thicker)",
    )
    p.add_argument(
        "--crop",
        type=float,
        metavar="MM",
        default=64.0,
        help="only a cube of this side (mm) around the brain centre; 0 = whole brain",
    )
    p.add_argument("--nthreads", type=int, default=2, help="CPU threads for the fit")
    p.add_argument("--epochs", type=int, help="override the preset's epoch budget")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args, extra = p.parse_known_args(argv)

    from .cli import main as mcsr

    start = time.perf_counter()
    print(
        f"mcsr demo: building the dataset in {args.out / 'bids'} "
        f"({args.voxel:g} mm in-plane, {FACTOR * args.voxel:g} mm slices)",
        flush=True,
    )
    paths = build_dataset(args.out, args.voxel, crop_mm=args.crop or None)
    out_dir = paths["bids"] / "derivatives" / "mcsr"
    common = ["--nthreads", str(args.nthreads), "--device", args.device, *DEMO_OPTIONS, *extra]
    if args.epochs:
        common += ["--epochs", str(args.epochs)]
    code = mcsr([str(paths["bids"]), str(out_dir), "participant", *common])
    if code != 0:
        print(f"mcsr demo: participant level failed (exit {code})", file=sys.stderr)
        return code
    code = mcsr([str(paths["bids"]), str(out_dir), "group"])
    if code != 0:
        print(f"mcsr demo: group level failed (exit {code})", file=sys.stderr)
        return code

    print("\nmcsr demo: PSNR inside the brain against the ground truth (higher is better)")
    print(f"  {'contrast':<9}{'cubic spline':>14}{'mcsr (INR)':>12}")
    for name, p_spline, p_sr in compare(out_dir, paths):
        print(f"  {name:<9}{p_spline:>11.2f} dB{p_sr:>9.2f} dB")
    outputs = sorted(out_dir.rglob("*_desc-superres_*.nii.gz"))
    print(f"\nmcsr demo: done in {time.perf_counter() - start:.0f} s")
    print(f"  input BIDS dataset : {paths['bids']}")
    print(f"  derivatives        : {out_dir}")
    for path in outputs:
        print(f"    {path.relative_to(out_dir)}")
    print(f"  group table        : {out_dir / 'group_qc.tsv'}")
    reports = sorted(out_dir.glob("*.html"))
    for path in reports:
        print(f"  report             : {path}")
    print(f"  ground truth       : {args.out / 'truth'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
