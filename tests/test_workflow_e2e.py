"""End to end on tiny phantoms: participant + group level, validator-clean derivatives.

Every test here runs whole participants (fit, QC, report): marked slow.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bidsdata import OUT_SHAPE, hr_affine, make_dataset, pair, phantom

from bids_mcsr.cli import main
from bids_mcsr.discovery import validator_errors
from bids_mcsr.resample import resample_to_grid

pytestmark = pytest.mark.slow

# A small INR: two epochs of a narrow network, enough to exercise the engine path.
TINY_INR = [
    "--epochs", "2",
    "--override", "trunk_width=16",
    "--override", "batch_size=2048",
    "--nthreads", "1",
]  # fmt: skip


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "derivatives" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def spline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    bids = make_dataset(root / "bids", {**pair("01"), **pair("02", "a", "T1w", "FLAIR")})
    before = _tree_digest(bids)
    out = bids / "derivatives" / "mcsr"
    code = main([str(bids), str(out), "participant", "--method", "spline", "--no-registration"])
    group = main([str(bids), str(out), "group"])
    return bids, out, code, group, before


def test_spline_run_writes_expected_files(spline_run):
    bids, out, code, group, before = spline_run
    assert (code, group) == (0, 0)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        ".bidsignore",
        "dataset_description.json",
        "group_qc.tsv",
        "group_report.html",
        "logs/sub-01_status.json",
        "logs/sub-02_ses-a_status.json",
        "sub-01.html",
        "sub-01/anat/sub-01_desc-superres_T1w.json",
        "sub-01/anat/sub-01_desc-superres_T1w.nii.gz",
        "sub-01/anat/sub-01_desc-superres_T2w.json",
        "sub-01/anat/sub-01_desc-superres_T2w.nii.gz",
        "sub-02/ses-a/anat/sub-02_ses-a_desc-superres_FLAIR.json",
        "sub-02/ses-a/anat/sub-02_ses-a_desc-superres_FLAIR.nii.gz",
        "sub-02/ses-a/anat/sub-02_ses-a_desc-superres_T1w.json",
        "sub-02/ses-a/anat/sub-02_ses-a_desc-superres_T1w.nii.gz",
        "sub-02_ses-a.html",
    ]
    # bids_dir is read-only for mcsr (apart from the derivatives folder we asked for)
    assert _tree_digest(bids) == before


def test_outputs_are_isotropic_in_input_scale(spline_run):
    _, out, *_ = spline_run
    img = nib.load(str(out / "sub-01/anat/sub-01_desc-superres_T2w.nii.gz"))
    assert img.shape == OUT_SHAPE
    np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 1.0))
    data = img.get_fdata()
    # The output lies on the reference's lattice, half a voxel off the phantom's
    # through the slices: bring the truth there (linear, so no ringing).
    truth = resample_to_grid(phantom("t2"), hr_affine(), img.shape, img.affine, order=1)
    inside = truth > 0
    # Intensities stay in the input scale (hundreds, not [0, 1]) and follow the phantom.
    assert 500 < data[inside].mean() < 800
    # 4 mm slices blur the 1 mm phantom ring: agreement is partial but clear
    # (the same output shifted by 3 mm gives about 0.1).
    assert np.corrcoef(data[inside], truth[inside])[0, 1] > 0.5


def test_derivatives_validate(spline_run):
    _, out, *_ = spline_run
    assert validator_errors(out) == []


def test_group_table(spline_run):
    _, out, *_ = spline_run
    with open(out / "group_qc.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [(r["participant_id"], r["session_id"], r["contrast"]) for r in rows] == [
        ("sub-01", "n/a", "T1w"),
        ("sub-01", "n/a", "T2w"),
        ("sub-02", "ses-a", "FLAIR"),
        ("sub-02", "ses-a", "T1w"),
    ]
    assert {r["method"] for r in rows} == {"spline"}
    assert rows[1]["input_voxel_sizes_mm"] == "4x1x1"
    assert rows[1]["output_shape"] == "x".join(map(str, OUT_SHAPE))
    assert float(rows[0]["qc_psnr_db"]) > 20
    # CPU fits hold no GPU memory: the column is there, its value n/a
    assert {r["device"] for r in rows} == {"cpu"}
    assert {r["peak_gpu_memory_mb"] for r in rows} == {"n/a"}


def test_inr_path(tmp_path):
    bids = make_dataset(tmp_path / "bids", pair("01", None, "T1w", "FLAIR"))
    out = tmp_path / "out"
    argv = [str(bids), str(out), "participant", "--no-registration", "--seed", "7", *TINY_INR]
    assert main(argv) == 0
    anat = out / "sub-01" / "anat"
    meta = json.loads((anat / "sub-01_desc-superres_FLAIR.json").read_text())
    sr = meta["SuperResolution"]
    assert sr["Method"] == "inr" and sr["Preset"] == "fast"
    assert sr["Architecture"] == "split-head"
    assert sr["PartnerContrasts"] == ["T1w"]
    assert sr["EpochsRun"] == 2 and 1 <= sr["SelectedEpoch"] <= 2
    assert sr["Config"]["trunk_width"] == 16 and sr["Config"]["batch_size"] == 2048
    # contiguous slices (no SliceThickness: the spacing) leave no grid node to fill
    assert sr["Config"]["diffusion_reach"] == 1.0 and sr["Config"]["diffusion_applied"] is False
    assert sr["Seed"] == 7 and sr["Device"] == "cpu"
    assert list(sr["MICurve"]) == ["T1w|FLAIR"] and len(sr["MICurve"]["T1w|FLAIR"]) == 2
    assert sorted(sr["LossCurve"]) == ["FLAIR", "T1w"]
    assert sr["WallTimeS"] > 0
    assert sr["Registration"]["Method"] == "none"
    assert "QC" in meta
    data = nib.load(str(anat / "sub-01_desc-superres_FLAIR.nii.gz")).get_fdata()
    assert data.shape == OUT_SHAPE
    assert data.max() > 100  # input scale, not [0, 1]
    assert validator_errors(out) == []
    assert main([str(bids), str(out), "group"]) == 0
    with open(out / "group_qc.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["epochs_run"] for r in rows] == ["2", "2"]
    assert float(rows[0]["final_mi"]) == pytest.approx(sr["MICurve"]["T1w|FLAIR"][-1], abs=1e-4)


def test_point_sampled_slices_get_their_gaps_filled(tmp_path):
    """Sidecars saying the 4 mm slices are 1 mm thin: the engine's reach-limited grid
    diffusion runs (and the sidecar says so), where contiguous slices skip it."""
    bids = make_dataset(tmp_path / "bids", pair("01"))
    for sidecar in (bids / "sub-01" / "anat").glob("*.json"):
        sidecar.write_text(json.dumps({"MagneticFieldStrength": 3, "SliceThickness": 1.0}))
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", "--no-registration", *TINY_INR]) == 0
    meta = json.loads((out / "sub-01" / "anat" / "sub-01_desc-superres_T1w.json").read_text())
    config = meta["SuperResolution"]["Config"]
    assert [c["profile_points"] for c in config["contrasts"]] == [1, 1]
    assert config["diffusion_reach"] == 1.0 and config["diffusion_applied"] is True


def _mni_pair(shift_mm) -> dict[str, bytes]:
    """A head-sized subject: nilearn's 2 mm MNI152 as a 2x2x6 mm axial T1w and an
    inverted-contrast 6x2x2 mm sagittal "T2w" (3-voxel block means), both in a
    scanner world shifted by ``shift_mm`` from the template's."""
    from nilearn.datasets import load_mni152_template

    mni = load_mni152_template(resolution=2)
    data = np.asarray(mni.get_fdata(dtype=np.float32))
    t2 = np.where(data > 0.05 * data.max(), data.max() * 1.2 - data, 0.0)
    files = {}
    for name, vol, axis in (("T1w", data, 2), ("T2w", t2, 0)):
        n = vol.shape[axis] // 3 * 3
        vol = np.take(vol, range(n), axis=axis)
        shape = list(vol.shape)
        shape[axis : axis + 1] = [n // 3, 3]
        lr = (vol.reshape(shape).mean(axis=axis + 1) * 1000).astype(np.float32)
        affine = mni.affine.copy()
        affine[:3, axis] *= 3
        affine[:3, 3] += mni.affine[:3, axis] + np.asarray(shift_mm)  # block centre, moved
        img = nib.Nifti1Image(lr, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        files[f"sub-01/anat/sub-01_{name}.nii.gz"] = gzip.compress(img.to_bytes())
    return files


def test_template_space_output(tmp_path, monkeypatch):
    from bids_mcsr import templates
    from bids_mcsr.geometry import output_grid
    from bids_mcsr.report.participant import ContrastEntry

    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "templateflow"))  # empty: nilearn
    space = "MNI152NLin2009cAsym"
    shift = np.array([10.0, -8.0, 12.0])
    bids = make_dataset(tmp_path / "bids", _mni_pair(shift))
    out = tmp_path / "out"
    argv = [str(bids), str(out), "participant", "--method", "spline", "--skip_bids_validator"]
    argv += ["--output-space", space, "--resolution", "4", "--quiet"]
    assert main(argv) == 0
    anat = out / "sub-01" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == [
        "sub-01_from-T2w_to-T1w_mode-image_xfm.txt",
        f"sub-01_space-{space}_desc-superres_T1w.json",
        f"sub-01_space-{space}_desc-superres_T1w.nii.gz",
        f"sub-01_space-{space}_desc-superres_T2w.json",
        f"sub-01_space-{space}_desc-superres_T2w.nii.gz",
    ]
    meta = json.loads((anat / f"sub-01_space-{space}_desc-superres_T2w.json").read_text())
    assert meta["SpatialReference"] == f"{space} (approximated by {templates.NILEARN_SOURCE})"
    reg = meta["SuperResolution"]["Registration"]
    assert reg["Template"]["Space"] == space
    # Rigid, and it undoes the scanner shift (the subject is the template itself).
    to_template = np.asarray(reg["Template"]["Matrix"])
    assert reg["Template"]["RotationDeg"] < 1.0
    np.testing.assert_allclose(to_template[:3, 3], -shift, atol=1.5)
    # The grid covers the template's field of view at 4 mm.
    tpl = templates.load_template(space)
    nii = anat / f"sub-01_space-{space}_desc-superres_T1w.nii.gz"
    img = nib.load(str(nii))
    shape, affine = output_grid([(tpl.data.shape, tpl.affine)], 4.0)
    assert img.shape == shape
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    # ... and the output is the template: correlation with it on the same grid.
    truth = resample_to_grid(tpl.data, tpl.affine, shape, affine, order=1)
    assert np.corrcoef(img.get_fdata().ravel(), truth.ravel())[0, 1] > 0.9
    # The report reads the transform the workflow wrote: registration, then template.
    t2_out = str(nii).replace("_T1w.nii.gz", "_T2w.nii.gz")
    entry = ContrastEntry.from_files(bids / "sub-01/anat/sub-01_T2w.nii.gz", t2_out)
    moving = np.asarray(reg["Inputs"]["sub-01_T2w.nii.gz"]["Matrix"])
    np.testing.assert_allclose(entry.transform, to_template @ moving)
    assert validator_errors(out) == []
    # A re-run finds the space- outputs complete and leaves them alone.
    os.utime(nii, (1_000_000, 1_000_000))
    assert main(argv) == 0
    assert nii.stat().st_mtime == 1_000_000


def test_changed_settings_names_what_differs_from_the_sidecar(tmp_path):
    from bids_mcsr import __version__
    from bids_mcsr.workflow import Options, changed_settings

    sidecar = tmp_path / "sub-01_desc-superres_T1w.json"
    sr = {
        "SoftwareVersion": f"mcsr {__version__}",
        "Method": "inr",
        "Preset": "fast",
        "Architecture": "split-head",
        "Seed": 0,
        "Config": {"overrides": {"epochs": 2}},
    }
    sidecar.write_text(json.dumps({"SuperResolution": sr}))
    assert changed_settings(sidecar, Options(epochs=2)) == ""
    assert changed_settings(sidecar, Options()) == "overrides {'epochs': 2} -> {}"
    sr["SoftwareVersion"] = "mcsr 0.0.1"
    sidecar.write_text(json.dumps({"SuperResolution": sr}))
    assert changed_settings(sidecar, Options(epochs=2, preset="paper")) == (
        f"SoftwareVersion 'mcsr 0.0.1' -> 'mcsr {__version__}'; Preset 'fast' -> 'paper'"
    )
    sidecar.write_text("{")
    assert changed_settings(sidecar, Options()) == f"{sidecar.name} unreadable"
