"""Output names, sidecars, dataset_description, .bidsignore and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_mcsr import __version__, derivatives
from bids_mcsr.discovery import Candidate, parse_entities, validator_errors


def _cand(bids: Path, rel: str, plane="axial", spacing=(1.0, 1.0, 4.0)) -> Candidate:
    ents, suffix = parse_entities(rel)
    return Candidate(
        path=bids / rel,
        suffix=suffix,
        entities=ents,
        shape=(24, 28, 6),
        spacing=spacing,
        anisotropic=True,
        plane=plane,
    )


@pytest.mark.parametrize(
    ("subject", "session", "entities", "suffix", "expected"),
    [
        ("01", None, {}, "T1w", "sub-01_desc-superres_T1w"),
        ("01", "pre", {}, "FLAIR", "sub-01_ses-pre_desc-superres_FLAIR"),
        (
            "A",
            "2",
            {"run": "02", "rec": "norm", "ce": "gad", "acq": "fast", "sub": "A", "ses": "2"},
            "T1w",
            "sub-A_ses-2_acq-fast_ce-gad_rec-norm_run-02_desc-superres_T1w",
        ),
    ],
)
def test_output_stem(subject, session, entities, suffix, expected):
    assert derivatives.output_stem(subject, session, entities, suffix) == expected


def test_output_paths(tmp_path):
    cand = _cand(tmp_path, "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_run-1_T2w.nii.gz")
    nii, js = derivatives.output_paths(tmp_path / "out", "01", "1", cand)
    assert (
        nii == tmp_path / "out/sub-01/ses-1/anat/sub-01_ses-1_acq-ax_run-1_desc-superres_T2w.nii.gz"
    )
    assert js == nii.with_name(nii.name.replace(".nii.gz", ".json"))


def test_atomic_nifti_roundtrip_leaves_no_temp(tmp_path):
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [-10, 5, 2]
    data = np.random.default_rng(0).normal(500, 50, (8, 9, 10)).astype(np.float32)
    path = derivatives.atomic_write_nifti(tmp_path / "a/b/x_T1w.nii.gz", data, aff)
    img = nib.load(str(path))
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), data)
    np.testing.assert_allclose(img.get_qform(), aff)
    np.testing.assert_allclose(img.get_sform(), aff)
    assert img.header.get_xyzt_units()[0] == "mm"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x_T1w.nii.gz"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = derivatives.atomic_write_json(tmp_path / "x.json", {"a": 1})
    with pytest.raises(TypeError):
        derivatives.atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_is_complete(tmp_path):
    a, b = tmp_path / "a.nii.gz", tmp_path / "a.json"
    assert not derivatives.is_complete([a, b])
    a.write_bytes(b"x")
    b.write_bytes(b"")
    assert not derivatives.is_complete([a, b])
    b.write_text("{}")
    assert derivatives.is_complete([a, b])


def test_bidsignore_merges(tmp_path):
    (tmp_path / ".bidsignore").write_text("extra/\n*.html\n")
    derivatives.ensure_bidsignore(tmp_path, derivatives.BIDSIGNORE_PATTERNS)
    derivatives.ensure_bidsignore(tmp_path, derivatives.BIDSIGNORE_PATTERNS)
    lines = (tmp_path / ".bidsignore").read_text().splitlines()
    assert lines == ["extra/", "*.html", "figures/", "group_qc.tsv", "logs/", "*_xfm.txt"]


def test_dataset_description(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(
        json.dumps({"Name": "Study X", "BIDSVersion": "1.9.0", "DatasetDOI": "doi:10.1/abc"})
    )
    monkeypatch.delenv("MCSR_CONTAINER", raising=False)
    desc = derivatives.dataset_description(raw)
    assert desc["DatasetType"] == "derivative"
    assert desc["Name"] == "mcsr super-resolution of Study X"
    assert desc["GeneratedBy"] == [
        {"Name": "mcsr", "Version": __version__, "CodeURL": derivatives.CODE_URL}
    ]
    assert desc["SourceDatasets"] == [{"URL": raw.resolve().as_uri(), "DOI": "doi:10.1/abc"}]
    assert desc["DatasetLinks"]["raw"] == raw.resolve().as_uri()
    monkeypatch.setenv("MCSR_CONTAINER", "docker://mcsr:0.1.0")
    assert derivatives.dataset_description(raw)["GeneratedBy"][0]["Container"] == {
        "Type": "docker",
        "Tag": "docker://mcsr:0.1.0",
    }


def _sr_fields(method="inr", **changes):
    args = dict(
        method=method,
        preset="fast",
        architecture="split-head",
        config={"trunk_width": 256, "encoding": "fourier"},
        seed=3,
        device="cpu",
        epochs_run=4,
        selected_epoch=3,
        stop_reason="mi-plateau",
        mi_curve={"T1w|T2w": [0.1, 0.2, 0.3, 0.29]},
        loss_curve={"T1w": [0.5, 0.4, 0.3, 0.2], "T2w": [0.6, 0.5, 0.4, 0.3]},
        wall_time_s=12.34567,
        samples_per_s=1000.0,
        resolution=1.0,
    )
    return derivatives.super_resolution_fields(**{**args, **changes})


def test_sidecar_content(tmp_path):
    bids = tmp_path / "bids"
    t1 = _cand(bids, "sub-01/anat/sub-01_T1w.nii.gz")
    t2 = _cand(bids, "sub-01/anat/sub-01_T2w.nii.gz", "sagittal", (4.0, 1.0, 1.0))
    meta = derivatives.sidecar(t2, [t1, t2], bids, 1.0, (24, 28, 24), _sr_fields(), True)
    assert meta["Sources"] == [
        "bids:raw:sub-01/anat/sub-01_T1w.nii.gz",
        "bids:raw:sub-01/anat/sub-01_T2w.nii.gz",
    ]
    assert meta["SkullStripped"] is True
    assert meta["Resolution"] == "1 mm isotropic"
    sr = meta["SuperResolution"]
    assert sr["Method"] == "inr" and sr["Preset"] == "fast"
    assert sr["Contrast"] == "T2w"
    assert sr["PartnerContrasts"] == ["T1w"]
    assert [i["ThroughPlane"] for i in sr["Inputs"]] == ["axial", "sagittal"]
    assert sr["Inputs"][1]["VoxelSizeMM"] == [4.0, 1.0, 1.0]
    assert sr["Config"]["trunk_width"] == 256
    assert (sr["Seed"], sr["Device"], sr["EpochsRun"], sr["SelectedEpoch"]) == (3, "cpu", 4, 3)
    assert sr["StopReason"] == "mi-plateau"
    assert sr["MICurve"]["T1w|T2w"] == [0.1, 0.2, 0.3, 0.29]
    assert sr["LossCurve"]["T2w"][-1] == 0.3
    assert sr["WallTimeS"] == 12.346
    assert sr["PeakGPUMemoryMB"] is None and sr["PeakGPUAllocatedMB"] is None  # a CPU fit
    assert sr["SoftwareVersion"] == f"mcsr {__version__}"
    assert sr["OutputShape"] == [24, 28, 24]
    # the spline baseline uses only the contrast's own input
    spline = derivatives.sidecar(t2, [t1, t2], bids, 1.0, (24, 28, 24), _sr_fields("spline"), False)
    assert spline["Sources"] == ["bids:raw:sub-01/anat/sub-01_T2w.nii.gz"]
    assert spline["SuperResolution"]["PartnerContrasts"] == []


def test_peak_gpu_memory_is_recorded_in_mb():
    fields = _sr_fields(
        device="cuda:0 (NVIDIA H100)", peak_gpu_mb=812.3456, peak_gpu_allocated_mb=640.06
    )
    assert fields["PeakGPUMemoryMB"] == 812.3 and fields["Device"].startswith("cuda:0")
    assert fields["PeakGPUAllocatedMB"] == 640.1


def test_written_derivatives_are_validator_clean(tmp_path):
    bids = tmp_path / "bids"
    (bids / "sub-01/anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    out = tmp_path / "out"
    t1 = _cand(bids, "sub-01/anat/sub-01_acq-ax_run-1_T1w.nii.gz")
    t2 = _cand(bids, "sub-01/anat/sub-01_FLAIR.nii.gz", "sagittal")
    derivatives.write_dataset_files(out, bids)
    for c in (t1, t2):
        nii, js = derivatives.output_paths(out, "01", None, c)
        derivatives.atomic_write_nifti(nii, np.ones((6, 7, 8)), np.eye(4))
        derivatives.atomic_write_json(
            js, derivatives.sidecar(c, [t1, t2], bids, 1.0, (6, 7, 8), _sr_fields(), False)
        )
    (out / "group_qc.tsv").write_text("participant_id\nsub-01\n")
    (out / "sub-01.html").write_text("<html></html>")
    assert validator_errors(out) == []
