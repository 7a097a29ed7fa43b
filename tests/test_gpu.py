"""The GPU path: devices, precisions, the app without SimpleITK, and the prepared GPU check.

Tests marked ``cuda`` need a CUDA GPU and skip without one; ``benchmarks/gpu/check.sh``
runs them first on the GPU host. The rest run on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bidsdata import make_dataset, pair

from bids_mcsr.benchmark import gpu

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TINY_INR = ["--epochs", "2", "--override", "trunk_width=16", "--override", "batch_size=2048"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# A run of the CLI in a fresh interpreter that lacks what the GPU host lacks (the
# payload's wheels bring nibabel and pybids, not these): each import of them fails.
_NO_SITK = (
    "import sys; sys.modules.update(dict.fromkeys("
    "['SimpleITK', 'nilearn', 'templateflow', 'bids_validator_deno'])); "
    "from bids_mcsr.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _run_without_sitk(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", _NO_SITK, *args], capture_output=True, text=True, env=env
    )


@pytest.mark.slow
def test_app_runs_without_simpleitk_when_registration_is_off(tmp_path):
    bids = make_dataset(tmp_path / "bids", pair("01"))
    out = tmp_path / "out"
    base = [str(bids), str(out), "participant", "--skip_bids_validator", *TINY_INR]
    done = _run_without_sitk(*base, "--no-registration", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(out.glob("sub-01/anat/*_desc-superres_*.nii.gz"))) == 2
    # With registration on, the missing package is a usage error at start, not a
    # traceback per participant.
    refused = _run_without_sitk(*base[:1], str(tmp_path / "o2"), *base[2:])
    assert refused.returncode == 64
    assert (
        "registration needs SimpleITK" in refused.stderr and "--no-registration" in refused.stderr
    )
    assert not (tmp_path / "o2" / "sub-01").exists()


def test_pack_keeps_volumes_within_one_quantisation_step(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.normal(300, 120, (20, 24, 18)) * (rng.random((20, 24, 18)) > 0.3)).astype(
        np.float32
    )
    affine = np.diag([0.9, 1.0, 1.1, 1.0])
    affine[:3, 3] = [-9.0, 12.5, 3.0]
    flat = np.full((4, 4, 4), 7.0, np.float32)
    sidecars = {"T1w": {"SuperResolution": {"Device": "cuda:0"}}}
    gpu.pack(tmp_path / "r.npz", {"T1w": (data, affine), "FLAIR": (flat, np.eye(4))}, sidecars)
    volumes, back = gpu.unpack(tmp_path / "r.npz")
    assert back == sidecars and set(volumes) == {"T1w", "FLAIR"}
    got, got_affine = volumes["T1w"]
    step = (data.max() - data.min()) / 65535
    assert got.dtype == np.float32 and got.shape == data.shape
    assert np.abs(got - data).max() <= 0.51 * step + 1e-4
    np.testing.assert_array_equal(got_affine, affine)
    np.testing.assert_allclose(volumes["FLAIR"][0], flat)  # a constant volume survives


@pytest.mark.slow
@pytest.mark.shared
def test_check_script_runs_and_scores_on_cpu(tmp_path):
    if not (SHARED / "icbm2009c" / "T1w.nii.gz").is_file():
        pytest.skip(f"needs the shared data at {SHARED}")
    payload = tmp_path / "payload"
    prep = subprocess.run(
        [sys.executable, "-m", "bids_mcsr.benchmark.gpu", "prepare", "--payload", str(payload)]
        + ["--cases", "icbm-quick", "--no-wheels"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert prep.returncode == 0, prep.stderr[-2000:]
    # check.sh reads the payload from the checkout: point a copy of the script at it.
    script = tmp_path / "repo" / "benchmarks" / "gpu" / "check.sh"
    script.parent.mkdir(parents=True)
    script.write_text((REPO / "benchmarks/gpu/check.sh").read_text())
    (script.parent / "payload").symlink_to(payload)
    for name in ("bids_mcsr", "run.py", "tests", "pyproject.toml"):
        (tmp_path / "repo" / name).symlink_to(REPO / name)
    out = tmp_path / "gpu-out"
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "PRESETS": "fast", "BUDGET": "300"}
    env["EPOCHS"] = "2"  # a smoke run: the test checks the plumbing, not the fidelity
    env["OVERRIDES"] = "precision=tf32"  # = float32 on the CPU: parity must still hold
    env["PYTHON"] = sys.executable
    check = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["preset"] == "fast" and run["returncode"] == 0 and run["app_device"] == "cpu"
    assert run["fit_s"] > 0 and run["samples_per_s"] > 0 and run["peak_gpu_mb"] is None
    assert summary["epochs"] == 2 and run["epochs"] <= 2
    assert summary["overrides"] == ["precision=tf32"]
    _, sidecars = gpu.unpack(out / run["file"])
    assert {sc["SuperResolution"]["Config"]["precision"] for sc in sidecars.values()} == {"tf32"}
    assert summary["sources"] == summary["prepared_sources"]
    assert sorted(p.name for p in out.iterdir()) == [
        "check.log",
        "icbm-quick_profile_sagittal_fast.npz",
        "summary.json",
    ]
    assert (
        "passed" in (out / "check.log").read_text() or "skipped" in (out / "check.log").read_text()
    )  # the CUDA tests ran (or skipped cleanly) before the app

    # The CPU reference of the same seed, with the spline baseline, then the score.
    cpu_out = tmp_path / "cpu-out"
    assert gpu.main(["run", "--payload", str(payload), "--out", str(cpu_out), "--device", "cpu"]
                    + ["--presets", "fast", "--spline", "--epochs", "2"]) == 0  # fmt: skip
    result_json = tmp_path / "gpu.json"
    assert gpu.main(["score", str(out), str(cpu_out), "--json", str(result_json)]) == 0
    result = json.loads(result_json.read_text())
    (entry,) = result["runs"]
    assert result["same_sources_as_cpu"] and result["seed"] == 0 and result["epochs"] == 2
    assert set(entry["psnr_tr"]) == {"T1w", "T2w"}
    # Same device, same seed, same threads: the two runs agree to quantisation.
    assert all(abs(v) < 0.01 for v in entry["cpu_parity_db"].values()), entry
    assert all(v > 0 for v in entry["psnr_tr_gain"].values()), entry


# --- on a CUDA GPU ---------------------------------------------------------------------


def _phantom_contrasts():
    """A two-tissue ball (24 mm) seen as 1x1x4 (A) and 4x1x1 mm (B) box-profile stacks.

    Returns the contrasts, the 1 mm output grid's shape and affine, and the truth.
    """
    from bids_mcsr.inr.fit import Contrast

    n = 24
    ijk = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1)
    r = np.linalg.norm(ijk - (n - 1) / 2, axis=-1) / (0.4 * n)
    hr = {"A": np.where(r < 1, 1.0 + (r < 0.5), 0.0), "B": np.where(r < 1, 2.0 - (r < 0.5), 0.0)}
    out = []
    for name, axis in (("A", 2), ("B", 0)):
        factors = [4 if a == axis else 1 for a in range(3)]
        blocks = [d for n_f in zip([n // f for f in factors], factors, strict=True) for d in n_f]
        data = hr[name].reshape(blocks).mean(axis=(1, 3, 5))
        affine = np.diag([*factors, 1.0]).astype(float)
        affine[:3, 3] = (np.asarray(factors) - 1) / 2  # LR voxel k covers HR 4k .. 4k+3
        out.append(Contrast(name, data.astype(np.float32), affine))
    return out, (n, n, n), np.eye(4), hr


def _rmse(volumes: dict, truth: dict) -> dict[str, float]:
    return {k: float(np.sqrt(((volumes[k] - truth[k]) ** 2).mean())) for k in truth}


def test_bfloat16_fit_on_cpu_is_about_as_close_to_the_truth_as_float32():
    from bids_mcsr.inr.fit import fit_contrasts

    contrasts, shape, affine, truth = _phantom_contrasts()
    errors = {}
    for precision in ("float32", "bfloat16"):
        overrides = {"epochs": 6, "trunk_width": 32, "early_stopping": False}
        res = fit_contrasts(
            contrasts, shape, affine, device="cpu", seed=0, nthreads=1,
            overrides={**overrides, "precision": precision},
        )  # fmt: skip
        assert res.config["precision"] == precision
        errors[precision] = _rmse(res.volumes, truth)
    for name, fp32 in errors["float32"].items():
        assert fp32 < 0.15, errors  # both fits learned the ball ...
        bf16 = errors["bfloat16"][name]
        assert bf16 != fp32 and bf16 < 1.3 * fp32, errors  # ... bf16 ran, and no worse


def test_tf32_is_cuda_only_and_its_switch_is_restored():
    import torch

    from bids_mcsr.inr.fit import fit_contrasts

    contrasts, shape, affine, _ = _phantom_contrasts()
    overrides = {"epochs": 2, "trunk_width": 16, "early_stopping": False}
    before = torch.backends.cuda.matmul.allow_tf32
    runs = [
        fit_contrasts(
            contrasts,
            shape,
            affine,
            device="cpu",
            seed=0,
            nthreads=1,
            overrides={**overrides, "precision": p},
        )  # fmt: skip
        for p in ("float32", "tf32")
    ]
    assert torch.backends.cuda.matmul.allow_tf32 == before
    for name, volume in runs[0].volumes.items():
        np.testing.assert_array_equal(runs[1].volumes[name], volume)


def test_unknown_precision_is_refused():
    from bids_mcsr.inr.presets import Preset, validate

    with pytest.raises(ValueError, match="precision must be one of"):
        validate(Preset(precision="float16"))


@cuda
@pytest.mark.cuda
def test_fit_on_cuda_matches_cpu_and_reports_gpu_memory():
    from bids_mcsr.inr.fit import fit_contrasts

    contrasts, shape, affine, _ = _phantom_contrasts()
    overrides = {"epochs": 3, "trunk_width": 32, "early_stopping": False}
    on_gpu = fit_contrasts(contrasts, shape, affine, device="cuda", seed=0, overrides=overrides)
    on_cpu = fit_contrasts(contrasts, shape, affine, device="cpu", seed=0, overrides=overrides)
    assert on_gpu.device.startswith("cuda") and on_gpu.peak_gpu_mb > 0
    assert 0 < on_gpu.peak_gpu_allocated_mb <= on_gpu.peak_gpu_mb
    for name, volume in on_cpu.volumes.items():
        diff = np.abs(on_gpu.volumes[name] - volume).max()
        assert diff < 0.05 * np.abs(volume).max(), (name, diff)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["tf32", "bfloat16"])
def test_reduced_precision_on_cuda_is_about_as_close_to_the_truth(precision):
    from bids_mcsr.inr.fit import fit_contrasts

    contrasts, shape, affine, truth = _phantom_contrasts()
    overrides = {"epochs": 6, "trunk_width": 32, "early_stopping": False}
    errors = {}
    for p in ("float32", precision):
        res = fit_contrasts(
            contrasts, shape, affine, device="cuda", seed=0,
            overrides={**overrides, "precision": p},
        )  # fmt: skip
        errors[p] = _rmse(res.volumes, truth)
    for name, fp32 in errors["float32"].items():
        assert errors[precision][name] < 1.3 * fp32 + 0.01, errors


@cuda
@pytest.mark.cuda
def test_auto_device_is_cuda_when_there_is_one(tmp_path):
    from bids_mcsr.cli import main

    bids = make_dataset(tmp_path / "bids", pair("01"))
    out = tmp_path / "out"
    args = [str(bids), str(out), "participant", "--skip_bids_validator", "--no-registration"]
    assert main([*args, *TINY_INR, "--device", "auto"]) == 0
    sidecar = json.loads(next(out.glob("sub-01/anat/*_desc-superres_T1w.json")).read_text())
    assert sidecar["SuperResolution"]["Device"].startswith("cuda")
