"""End to end on real clinical scans (../shared/data/clinical-ms-patient01).

Real 2-D clinical T1w (0.72x0.72x3 mm) and T2w (0.51x0.51x4 mm) on their own
scanner grids, with skull, not co-registered. To keep the test within a minute
or two on 2 cores, both are block-averaged in-plane (4x4 and 5x5 voxels, about
2.7 mm, which is what a coarser in-plane acquisition would integrate), and the
fit runs at 3 mm for two epochs. To model patient motion between the two
sequences, the T2w header is moved by a known rigid transform (3 degrees, 3 mm):
registration must then explain the data better than the headers do, which the
ground-truth-free consistency QC (re-acquired output vs input) and the MI between
the outputs have to show.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CLINICAL = REPO.parent / "shared" / "data" / "clinical-ms-patient01"

pytestmark = [pytest.mark.slow, pytest.mark.shared]


def _motion() -> np.ndarray:
    t = np.radians(3.0)
    m = np.eye(4)
    m[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]  # about x (L-R)
    m[:3, 3] = [0.0, 3.0, 0.0]
    return m


def _write(src: Path, dst: Path, factor: int, motion: np.ndarray | None) -> None:
    img = nib.load(src)
    data = np.asarray(img.dataobj, dtype=np.float32)
    nx, ny = data.shape[0] // factor, data.shape[1] // factor
    blocks = data[: nx * factor, : ny * factor].reshape(nx, factor, ny, factor, -1)
    small = blocks.mean(axis=(1, 3))
    # Block k covers input voxels [k * factor, (k + 1) * factor) in-plane.
    scale = np.diag([factor, factor, 1.0, 1.0])
    scale[:2, 3] = (factor - 1) / 2
    affine = img.affine @ scale
    if motion is not None:
        affine = motion @ affine
    out = nib.Nifti1Image(small, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, dst)
    dst.with_name(dst.name.replace(".nii.gz", ".json")).write_text("{}\n")


@pytest.fixture(scope="module")
def clinical_bids(tmp_path_factory) -> Path:
    if not (CLINICAL / "T1w.nii.gz").is_file():
        pytest.skip(f"needs the clinical scans in {CLINICAL} (../shared beside the repo)")
    root = tmp_path_factory.mktemp("clinical") / "bids"
    anat = root / "sub-01" / "anat"
    _write(CLINICAL / "T1w.nii.gz", anat / "sub-01_T1w.nii.gz", 4, None)
    _write(CLINICAL / "T2w.nii.gz", anat / "sub-01_T2w.nii.gz", 5, _motion())
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "clinical-ms-patient01 (reduced)", "BIDSVersion": "1.9.0"})
    )
    return root


def _run(bids: Path, out: Path, *extra: str) -> dict[str, dict]:
    cmd = [
        sys.executable,
        str(REPO / "run.py"),
        str(bids),
        str(out),
        "participant",
        "--skip_bids_validator",
        "--contrasts",
        "T1w",
        "T2w",
        "--resolution",
        "3",
        "--epochs",
        "2",
        # every epoch a full pass over every LR voxel (the measurements below); the fast
        # preset's quarter of the far background makes the runs noisier
        "--override",
        "far_background_fraction=1.0",
        "--quiet",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sidecars = sorted((out / "sub-01" / "anat").glob("*_desc-superres_*.json"))
    assert len(sidecars) == 2
    return {p.name.split("_")[-1][:-5]: json.loads(p.read_text()) for p in sidecars}


def test_registration_improves_consistency_on_clinical_scans(clinical_bids, tmp_path):
    registered = _run(clinical_bids, tmp_path / "reg")
    trusted = _run(clinical_bids, tmp_path / "noreg", "--no-registration")

    # The moved T2w must be found about 3 degrees / 3 mm away from its header.
    reg = registered["T2w"]["SuperResolution"]["Registration"]
    moved = next(v for v in reg["Inputs"].values() if "T2w" in json.dumps(v))
    assert 1.5 < moved["RotationDeg"] < 4.5
    assert registered["T1w"]["SkullStripped"] is False

    psnr = {
        name: (
            registered[name]["QC"]["Consistency"]["PSNR"],
            trusted[name]["QC"]["Consistency"]["PSNR"],
        )
        for name in ("T1w", "T2w")
    }
    mi = [run["T1w"]["SuperResolution"]["MICurve"]["T1w|T2w"][-1] for run in (registered, trusted)]
    print("consistency PSNR (registered, headers):", psnr, "final MI:", mi)
    # Measured (seeded, 2 threads): consistency T1w 24.9 vs 24.2 dB, T2w 22.5 vs 22.0 dB,
    # final MI 0.92 vs 0.38. A single epoch is too short a schedule for the MI: there it
    # moves by 0.2 when only the output grid's sub-voxel placement changes. After more
    # epochs the split-head fits each contrast on its own and the consistency gap closes
    # (3 epochs: 25.6 vs 25.4 / 23.2 vs 22.9 dB) while the MI still separates the runs.
    for reg_db, hdr_db in psnr.values():
        assert reg_db > hdr_db + 0.25, psnr
    assert mi[0] > mi[1] + 0.3, mi
