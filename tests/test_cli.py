"""Command line: argument handling and every documented exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bidsdata import make_dataset, pair

from bids_mcsr import __version__
from bids_mcsr.cli import build_parser, main

FAST = ["--method", "spline", "--skip_bids_validator", "--no-registration", "--quiet"]


@pytest.fixture
def bids(tmp_path):
    return make_dataset(tmp_path / "bids", {**pair("01"), **pair("02")})


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["-v"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mcsr {__version__}"


def test_run_py_and_help():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "run.py"), "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for option in ("--participant_label", "--contrasts", "--resolution", "--bids-database-dir"):
        assert option in proc.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bids", "out"],
        ["bids", "out", "subject"],
        ["bids", "out", "participant", "--no-such-option"],
        ["bids", "out", "participant", "--resolution", "-1"],
        ["bids", "out", "participant", "--resolution", "abc"],
        ["bids", "out", "participant", "--epochs", "0"],
        ["bids", "out", "participant", "--method", "magic"],
        ["bids", "out", "participant", "--override", "no_equals_sign"],
        ["bids", "out", "participant", "--verbose", "--quiet"],
    ],
)
def test_bad_usage_exits_64(argv, capsys):
    assert main(argv) == 64
    assert "mcsr: error:" in _err(capsys)


def test_options_parse():
    args = build_parser().parse_args(
        [
            "b",
            "o",
            "participant",
            "--participant_label",
            "sub-01",
            "02",
            "--override",
            "batch_size=2048",
            "--override",
            "encoding=hash",
            "--epochs",
            "3",
            "--no-registration",
        ]
    )
    assert args.participant_label == ["sub-01", "02"]
    assert dict(args.override) == {"batch_size": 2048, "encoding": "hash"}
    assert (args.epochs, args.no_registration, args.method, args.preset) == (3, True, "inr", "fast")


def test_output_inside_bids_dir_is_refused(bids, capsys):
    assert main([str(bids), str(bids / "out"), "participant", *FAST]) == 64
    assert "inside bids_dir" in _err(capsys)
    assert main([str(bids), str(bids), "participant", *FAST]) == 64
    assert not (bids / "out").exists()


def test_missing_or_non_bids_input_exits_65(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant", *FAST]) == 65
    (tmp_path / "plain").mkdir()
    assert main([str(tmp_path / "plain"), str(tmp_path / "out"), "participant", *FAST]) == 65
    assert "dataset_description.json" in _err(capsys)


def test_validator_errors_exit_65(tmp_path, capsys):
    files = {**pair("01"), "sub-01/anat/sub-01_FLAIR.nii.gz": b""}
    bids = make_dataset(tmp_path / "bids", files)
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", *FAST[:2], "--no-registration"]) == 65
    err = _err(capsys)
    assert "fails BIDS validation" in err
    assert "sub-01_FLAIR.nii.gz" in err and "--skip_bids_validator" in err
    # skipping the validator processes the usable pair (the placeholder is skipped)
    assert main([str(bids), str(out), "participant", *FAST]) == 0
    assert (out / "sub-01/anat/sub-01_desc-superres_T2w.nii.gz").is_file()


def test_unknown_participant_exits_65(bids, tmp_path, capsys):
    assert (
        main([str(bids), str(tmp_path / "o"), "participant", "--participant_label", "9", *FAST])
        == 65
    )
    assert "participant(s) 9 not in" in _err(capsys)


def test_unwritable_output_exits_73(bids, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([str(bids), str(blocker / "out"), "participant", *FAST]) == 73
    assert "not writable" in _err(capsys)


def test_nothing_to_fuse_exits_65(tmp_path, capsys):
    bids = make_dataset(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": ("axial", "t1")})
    assert main([str(bids), str(tmp_path / "out"), "participant", *FAST]) == 65
    assert "no participant/session" in _err(capsys)


def test_partial_failure_exits_1_and_keeps_the_rest(bids, tmp_path, capsys):
    # Truncate one image of sub-02: its header still reads, its data does not.
    bad = bids / "sub-02/anat/sub-02_T2w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:400])
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", *FAST]) == 1
    err = _err(capsys)
    assert "sub-02_T2w.nii.gz" in err and "fix:" in err
    assert len(list((out / "sub-01/anat").glob("*"))) == 4
    assert not (out / "sub-02").exists() or not list((out / "sub-02").rglob("*.json"))


@pytest.mark.slow
def test_rerun_skips_complete_and_overwrite_recomputes(bids, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(bids), str(out), "participant", "--participant_label", "sub-01", *FAST]
    assert main(argv) == 0
    nii = out / "sub-01/anat/sub-01_desc-superres_T1w.nii.gz"
    os.utime(nii, (1_000_000, 1_000_000))
    _err(capsys)
    assert main(argv) == 0
    assert nii.stat().st_mtime == 1_000_000
    assert "other settings" not in _err(capsys)
    # other settings: still kept, with a warning that names what differs
    assert main([*argv, "--seed", "7"]) == 0
    assert nii.stat().st_mtime == 1_000_000
    assert "made with other settings: Seed 0 -> 7; kept (use --overwrite" in _err(capsys)
    assert not (out / "sub-02").exists()
    # a missing sidecar makes the participant incomplete: recomputed without --overwrite
    (out / "sub-01/anat/sub-01_desc-superres_T2w.json").unlink()
    assert main(argv) == 0
    assert nii.stat().st_mtime > 1_000_000
    os.utime(nii, (1_000_000, 1_000_000))
    assert main([*argv, "--overwrite"]) == 0
    assert nii.stat().st_mtime > 1_000_000


def test_group_without_outputs_exits_65(tmp_path, capsys):
    (tmp_path / "bids").mkdir()
    (tmp_path / "out").mkdir()
    assert main([str(tmp_path / "bids"), str(tmp_path / "out"), "group"]) == 65
    assert "run the participant level" in _err(capsys)


def test_cuda_without_gpu_exits_64(bids, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    assert main([str(bids), str(tmp_path / "o"), "participant", "--device", "cuda", *FAST]) == 64
    assert "--device cuda" in _err(capsys)


def test_unknown_output_space_exits_64(bids, tmp_path, capsys):
    argv = [str(bids), str(tmp_path / "o"), "participant", "--output-space", "MNI305"]
    assert main([*argv, *FAST]) == 64
    assert "--output-space: invalid choice: 'MNI305'" in _err(capsys)


def test_missing_template_fails_the_participant_with_a_fix(bids, tmp_path, capsys, monkeypatch):
    from bids_mcsr import templates

    def missing(name, **kwargs):
        raise ValueError(f"--output-space {name}: template not found in /nowhere")

    monkeypatch.setattr(templates, "load_template", missing)
    out = tmp_path / "o"
    argv = [str(bids), str(out), "participant", "--output-space", "MNI152NLin2009cAsym"]
    assert main([*argv, *FAST]) == 1
    lines = [x for x in _err(capsys).splitlines() if x.startswith("mcsr: error:")]
    assert len(lines) == 2  # one per participant
    assert "template not found in /nowhere; fix: pre-fetch the template" in lines[0]
    assert not (out / "sub-01").exists()


def test_user_mask(bids, tmp_path, capsys):
    import nibabel as nib

    ref = nib.load(str(bids / "sub-01/anat/sub-01_T1w.nii.gz"))
    good = tmp_path / "mask.nii.gz"
    nib.Nifti1Image((ref.get_fdata() > 100).astype("uint8"), ref.affine).to_filename(str(good))
    out = tmp_path / "out"
    argv = [str(bids), str(out), "participant", "--participant_label", "01", *FAST]
    assert main([*argv, "--mask", str(good)]) == 0
    # a mask on another grid fails that participant with a one-line fix
    wrong = tmp_path / "wrong.nii.gz"
    nib.Nifti1Image(np.ones((5, 5, 5), "uint8"), np.eye(4)).to_filename(str(wrong))
    assert main([*argv, "--mask", str(wrong), "--overwrite"]) == 1
    assert "resample the mask" in _err(capsys)
    assert main([*argv, "--mask", str(tmp_path / "none.nii.gz")]) == 64
