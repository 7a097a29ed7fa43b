"""Robustness (issue 9): bad inputs, partial outputs, kills, parallel runs, no network.

Every bad input gives one ``mcsr: error:`` line naming the file and a fix, a
documented exit code, no outputs for the broken participant, and the other
participants still run. Runs use the spline method on the tiny phantoms of
``bidsdata`` unless a test is about the fit.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bidsdata import acquisition, make_dataset, pair

from bids_mcsr import derivatives, workflow
from bids_mcsr.cli import main
from bids_mcsr.discovery import validator_errors

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--method", "spline", "--skip_bids_validator", "--no-registration", "--quiet"]
TINY_INR = ["--override", "trunk_width=16", "--override", "batch_size=2048", "--nthreads", "1"]


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mcsr: error:")]


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _sagittal_t2(**change) -> bytes:
    """The phantom T2w of ``pair`` (4x1x1 mm sagittal) with data/affine/qform changed."""
    img = acquisition("sagittal", "t2")
    data = change.get("data", img.get_fdata(dtype=np.float32))
    affine = change.get("affine", img.affine)
    out = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    out.set_sform(affine, code=1)
    out.set_qform(change.get("qform", affine), code=1)
    return gzip.compress(out.to_bytes())


def _broken_inputs() -> dict[str, tuple[bytes, str]]:
    """sub-label -> (bytes of its T2w, what the error line must say)."""
    good = acquisition("sagittal", "t2")
    raw = gzip.compress(good.to_bytes())
    nan = good.get_fdata(dtype=np.float32)
    nan[5, 5, 5] = np.nan
    far = good.affine.copy()
    far[:3, 3] += [400.0, 0, 0]  # 40 cm away: no shared field of view
    moved_q = good.affine.copy()
    moved_q[:3, 3] += [0, 8.0, 0]
    return {
        "empty": (b"", "file is empty (0 bytes)"),
        "trunc": (raw[: len(raw) // 2], "truncated or corrupt"),
        "text": (gzip.compress(b"not an image " * 100), "not a readable NIfTI"),
        "nan": (_sagittal_t2(data=nan), "1 NaN/Inf voxels"),
        "zero": (_sagittal_t2(data=np.zeros(good.shape)), "every voxel is zero"),
        "fourd": (_sagittal_t2(data=np.ones((*good.shape, 3))), "4-D"),
        "twod": (_sagittal_t2(data=np.ones((6, 28))), "3-D volume"),
        "qsform": (_sagittal_t2(qform=moved_q), "qform and sform disagree"),
        "nooverlap": (_sagittal_t2(affine=far), "does not overlap"),
    }


def test_each_bad_input_fails_its_participant_only(tmp_path, capsys):
    broken = _broken_inputs()
    files = dict(pair("01"))
    for label, (blob, _) in broken.items():
        files[f"sub-{label}/anat/sub-{label}_T1w.nii.gz"] = ("axial", "t1")
        files[f"sub-{label}/anat/sub-{label}_T2w.nii.gz"] = blob
    bids = make_dataset(tmp_path / "bids", files)
    out = tmp_path / "out"
    # --contrasts makes the broken T2w count (discovery alone would skip unreadable files)
    assert main([str(bids), str(out), "participant", "--contrasts", "T1w", "T2w", *FAST]) == 1
    lines = _errors(capsys.readouterr().err)
    assert len(lines) == len(broken)
    for label, (_, problem) in broken.items():
        line = next(x for x in lines if f"sub-{label}_T2w.nii.gz" in x)
        assert problem in line and "; fix: " in line, line
        assert not (out / f"sub-{label}").exists()  # nothing partial
    assert _files(out / "sub-01") == [
        "anat/sub-01_desc-superres_T1w.json",
        "anat/sub-01_desc-superres_T1w.nii.gz",
        "anat/sub-01_desc-superres_T2w.json",
        "anat/sub-01_desc-superres_T2w.nii.gz",
    ]
    status = json.loads((out / "logs/sub-nan_status.json").read_text())
    assert status["status"] == "failed"


def test_failure_while_writing_leaves_no_partial_outputs(tmp_path, monkeypatch):
    bids = make_dataset(tmp_path / "bids", pair("01"))
    out = tmp_path / "out"
    real = workflow.qc.assess
    calls = []

    def flaky(*args, **kwargs):  # the first image is already written when this fails
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(workflow.qc, "assess", flaky)
    assert main([str(bids), str(out), "participant", *FAST]) == 1
    assert len(calls) == 2
    assert not (out / "sub-01").exists()
    assert not (out / "sub-01.html").exists()


def test_only_isotropic_contrasts_are_skipped_with_a_fix(tmp_path, capsys):
    iso = {
        "sub-01/anat/sub-01_T1w.nii.gz": ("iso", "t1"),
        "sub-01/anat/sub-01_T2w.nii.gz": ("iso", "t2"),
    }
    bids = make_dataset(tmp_path / "bids", iso)
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", *FAST]) == 65
    err = capsys.readouterr().err
    assert "fewer than two anisotropic contrasts" in err and "--contrasts" in err
    assert not (out / "sub-01").exists()
    # named explicitly, isotropic contrasts are fused
    assert main([str(bids), str(out), "participant", "--contrasts", "T1w", "T2w", *FAST]) == 0
    assert (out / "sub-01/anat/sub-01_desc-superres_T2w.json").is_file()


def test_partial_fov_overlap_warns_and_covers_the_union(tmp_path, capsys):
    img = acquisition("sagittal", "t2")
    shifted = img.affine.copy()
    shifted[:3, 3] += [14.0, 0, 0]  # 10 of its 24 mm overlap the T1w
    files = {
        "sub-01/anat/sub-01_T1w.nii.gz": ("axial", "t1"),
        "sub-01/anat/sub-01_T2w.nii.gz": _sagittal_t2(affine=shifted),
    }
    bids = make_dataset(tmp_path / "bids", files)
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", *FAST]) == 0
    assert re.search(r"sub-01_T2w.nii.gz: only 4\d% of its field of view", capsys.readouterr().err)
    t2 = nib.load(str(out / "sub-01/anat/sub-01_desc-superres_T2w.nii.gz"))
    assert t2.shape == (24 + 14, 28, 25)  # bidsdata.OUT_SHAPE, 14 mm wider


def test_left_handed_affines_give_the_same_output(tmp_path):
    """Left-handed (LAS, det < 0) files store the same scans as their RAS twins."""

    def las(img: nib.Nifti1Image) -> bytes:
        affine = img.affine @ _flip_x(img.shape[0])
        out = nib.Nifti1Image(img.get_fdata(dtype=np.float32)[::-1], affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        assert np.linalg.det(affine[:3, :3]) < 0
        return gzip.compress(out.to_bytes())

    files = pair("01")
    twin = {
        rel: las(acquisition(*kind, sum(map(ord, rel)) % 1000))  # bidsdata's seed
        for rel, kind in files.items()
    }
    for name, spec in (("ras", files), ("las", twin)):
        bids = make_dataset(tmp_path / name, spec)
        assert main([str(bids), str(tmp_path / f"out-{name}"), "participant", *FAST]) == 0
    for suffix in ("T1w", "T2w"):
        name = f"sub-01/anat/sub-01_desc-superres_{suffix}.nii.gz"
        ras = nib.load(str(tmp_path / "out-ras" / name))
        lhs = nib.load(str(tmp_path / "out-las" / name))
        # The output grid follows the reference's axes, flip included.
        assert np.linalg.det(lhs.affine[:3, :3]) < 0
        np.testing.assert_allclose(lhs.affine @ _flip_x(lhs.shape[0]), ras.affine, atol=1e-4)
        np.testing.assert_allclose(lhs.get_fdata()[::-1], ras.get_fdata(), atol=1e-2)


def _flip_x(n: int) -> np.ndarray:
    """Voxel map i -> n-1-i along the first axis."""
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = n - 1
    return flip


def test_missing_or_invalid_json_sidecar(tmp_path, capsys):
    bids = make_dataset(tmp_path / "bids", {**pair("01"), **pair("02")})
    (bids / "sub-01/anat/sub-01_T2w.json").unlink()
    (bids / "sub-02/anat/sub-02_T2w.json").write_text('{"MagneticFieldStrength": 3,')
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", *FAST]) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if "sub-02_T2w.json" in x]
    assert len(warnings) >= 1 and "not valid JSON" in warnings[0] and "fix:" in warnings[0]
    for sub in ("01", "02"):
        assert derivatives.is_complete(
            derivatives.expected_outputs(out, sub, None, _cands(bids, sub))
        )
    # With the validator on, the broken sidecar is a dataset error (exit 65).
    assert main([str(bids), str(out), "participant", *FAST[:1], "spline", "--quiet"]) == 65
    assert "sub-02_T2w.json" in capsys.readouterr().err


def _cands(bids: Path, sub: str):
    from bids_mcsr.discovery import classify

    return [classify(p) for p in sorted((bids / f"sub-{sub}/anat").glob("*.nii.gz"))]


@pytest.mark.parametrize(
    "option", [["--participant_label", "../x"], ["--participant_label", "01/.."],
               ["--session_label", "a b"], ["--participant_label", "sub-0_1"]]
)  # fmt: skip
def test_labels_with_path_characters_are_refused(tmp_path, capsys, option):
    bids = make_dataset(tmp_path / "bids", pair("01"))
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", *option, *FAST]) == 64
    (line,) = _errors(capsys.readouterr().err)
    assert f"{option[0]} {option[1]!r}: not a BIDS label" in line and "fix:" in line
    assert not out.exists()


def test_invalid_dataset_description_exits_65(tmp_path, capsys):
    bids = make_dataset(tmp_path / "bids", pair("01"))
    (bids / "dataset_description.json").write_text("{")
    assert main([str(bids), str(tmp_path / "out"), "participant", *FAST]) == 65
    (line,) = _errors(capsys.readouterr().err)
    assert "dataset_description.json: not a valid JSON object" in line and "fix:" in line


def test_dataset_description_is_created_once(tmp_path):
    bids = make_dataset(tmp_path / "bids", pair("01"))
    out = tmp_path / "out"
    path = out / "dataset_description.json"
    assert derivatives.create_once(path, "first\n")
    assert not derivatives.create_once(path, "second\n")
    assert path.read_text() == "first\n"
    assert [p.name for p in out.iterdir()] == ["dataset_description.json"]  # no temp left
    derivatives.write_dataset_files(out, bids)  # not a derivative description: replaced
    first = path.read_text()
    assert json.loads(first)["DatasetType"] == "derivative"
    os.utime(path, (1_000_000, 1_000_000))
    derivatives.write_dataset_files(out, bids)  # a valid one is kept as is
    assert path.stat().st_mtime == 1_000_000 and path.read_text() == first


def test_stale_temporary_files_are_removed_on_rerun(tmp_path):
    bids = make_dataset(tmp_path / "bids", pair("01"))
    out = tmp_path / "out"
    anat = out / "sub-01/anat"
    anat.mkdir(parents=True)
    stale = anat / ".sub-01_desc-superres_T1w.abc123.tmp.nii.gz"
    stale.write_bytes(b"half")
    report = out / ".sub-01.k7x2.tmp.html"
    other = out / ".sub-010.k7x2.tmp.html"  # another participant's, maybe being written
    report.write_text("<html>")
    other.write_text("<html>")
    assert derivatives.is_temp_file(stale)
    assert main([str(bids), str(out), "participant", *FAST]) == 0
    assert not stale.exists() and not report.exists()
    assert [p for p in out.rglob(".*") if derivatives.is_temp_file(p)] == [other]


def test_no_shell_anywhere():
    """No command line is ever built from user strings for a shell."""
    sources = [*sorted((ROOT / "bids_mcsr").rglob("*.py")), ROOT / "run.py"]
    assert len(sources) > 20
    pattern = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|commands\.getoutput")
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sources
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection attempt fails the test (loopback included)."""
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return attempts


@pytest.mark.slow
def test_no_network_at_run_time(tmp_path, no_network):
    bids = make_dataset(tmp_path / "bids", pair("01"))
    spline = [str(bids), str(tmp_path / "spline"), "participant", "--method", "spline"]
    inr = [str(bids), str(tmp_path / "inr"), "participant", "--epochs", "1", *TINY_INR]
    for argv in (spline, inr):
        assert main([*argv, "--skip_bids_validator", "--quiet"]) == 0
    assert main([str(bids), str(tmp_path / "inr"), "group"]) == 0
    assert no_network == []
    meta = json.loads((tmp_path / "inr/sub-01/anat/sub-01_desc-superres_T2w.json").read_text())
    assert meta["SuperResolution"]["EpochsRun"] == 1


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _mcsr(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kwargs,
    )


@pytest.mark.slow
def test_parallel_participants_share_output_dir(tmp_path):
    bids = make_dataset(tmp_path / "bids", {**pair("01"), **pair("02")})
    before = _digest(bids)
    out, db = tmp_path / "out", tmp_path / "db"
    common = [*FAST[:-1], "--bids-database-dir", str(db)]
    procs = [
        _mcsr(str(bids), str(out), "participant", "--participant_label", sub, *common)
        for sub in ("01", "02")
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert (db / "layout_index.sqlite").is_file()
    assert not [p for p in db.parent.iterdir() if p.name.startswith(".db.")]  # private indexes
    for sub in ("01", "02"):
        assert (out / f"sub-{sub}/anat/sub-{sub}_desc-superres_T2w.json").is_file()
    assert validator_errors(out) == []
    assert _digest(bids) == before  # the input dataset is never modified
    # The published index is reused, read only, by a later run.
    assert main([str(bids), str(out), "participant", *common, "--quiet"]) == 0


@pytest.mark.slow
def test_sigkill_during_fit_then_rerun_completes(tmp_path):
    bids = make_dataset(tmp_path / "bids", pair("01"))
    out = tmp_path / "out"
    base = [str(bids), str(out), "participant", "--skip_bids_validator", "--no-registration"]
    # Many epochs of a tiny network, MI stopping off: the fit runs until killed.
    slow = [
        *TINY_INR,
        "--epochs",
        "500",
        "--override",
        "patience=1000",
        "--override",
        "min_epochs=1000",
    ]
    proc = _mcsr(*base, *slow, start_new_session=True)
    deadline = time.monotonic() + 120
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if re.search(r"epoch\s+2\b", line, re.IGNORECASE) or not line:
            break
    assert proc.poll() is None, seen
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "sub-01/anat/sub-01_desc-superres_T1w.json").exists()

    assert main([*base, *TINY_INR, "--epochs", "1", "--quiet"]) == 0
    files = [f for f in _files(out) if not f.startswith("logs/")]
    assert files == [
        ".bidsignore",
        "dataset_description.json",
        "sub-01.html",
        "sub-01/anat/sub-01_desc-superres_T1w.json",
        "sub-01/anat/sub-01_desc-superres_T1w.nii.gz",
        "sub-01/anat/sub-01_desc-superres_T2w.json",
        "sub-01/anat/sub-01_desc-superres_T2w.nii.gz",
    ]
    assert validator_errors(out) == []


#: README "Memory": documented peak RSS bound of the spline path for the
#: 512x512x60 pair below at 1 mm (measured 1.38 GiB).
MEMORY_LIMIT_GIB = 2.0


def _large_pair(root: Path) -> Path:
    """512x512x60 axial T1w (0.5x0.5x3 mm) + 512x60x512 coronal T2w (0.5x3x0.35 mm), int16."""

    def scan(shape, spacing, values, seed) -> bytes:
        axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
        x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
        r = np.sqrt((x / 90) ** 2 + (y / 110) ** 2 + (z / 80) ** 2)
        data = np.where(r < 1, values[0], 0) + np.where(r < 0.7, values[1], 0)
        data = data + np.random.default_rng(seed).normal(0, 5, shape) * (r < 1)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
        img = nib.Nifti1Image(data.astype(np.int16), affine)
        img.set_qform(affine, code=1)
        return img.to_bytes()

    return make_dataset(
        root,
        {
            "sub-01/anat/sub-01_T1w.nii": scan((512, 512, 60), (0.5, 0.5, 3.0), (300, 400), 0),
            "sub-01/anat/sub-01_T2w.nii": scan((512, 60, 512), (0.5, 3.0, 0.35), (900, -500), 1),
        },
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("MCSR_MEMORY_TEST"),
    reason="3-5 min on 2 cores: run with MCSR_MEMORY_TEST=1 (README 'Memory')",
)
def test_memory_bound_512x512x60(tmp_path):
    bids = _large_pair(tmp_path / "bids")
    code = (
        "import resource, sys\n"
        "from bids_mcsr.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    argv = [str(bids), str(tmp_path / "out"), "participant", "--resolution", "1", *FAST]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv, "--nthreads", "1"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_gib = int(proc.stdout.split("peak_kib")[-1]) / 2**20
    assert peak_gib < MEMORY_LIMIT_GIB, peak_gib
