"""The prepared GPU check: inputs made here, the app run on a GPU host, scores made here.

A GPU host is at hand only for minutes and lacks most of the app's dependencies
(no nibabel, pybids, SimpleITK or network), so everything it needs travels in one
payload and everything it measures comes back in a few small files.
``python -m bids_mcsr.benchmark.gpu STEP``, where STEP is

``prepare`` (here, with ``../shared``)
    Simulate the check's cases (:data:`GPU_CASES`) as BIDS datasets and download
    the wheels the GPU host lacks into ``benchmarks/gpu/payload``.
``run`` (there, from ``benchmarks/gpu/check.sh``; here with ``--device cpu``)
    Run the app's participant level per case and preset, registration off, under
    a time budget; write ``summary.json`` and one quantised ``<run>.npz`` of the
    outputs per run (at most 8 files come back from the host).
``score`` (here)
    Score a ``run`` folder against the HR truth, against cubic spline and against
    a CPU ``run`` of the same seed, and write ``benchmarks/gpu.json``.

Registration is off on the GPU host: SimpleITK's wheel alone (53 MB) nearly fills
a 64 MiB shipment, registration runs on the CPU anyway, and the simulated inputs
are aligned (the header-trust rule keeps them as they are).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .runner import REPO, app_command, run_child

#: (case, simulation mode, partner view) of every dataset the check runs.
GPU_CASES = (("papersize", "profile", "sagittal"), ("ms-patient07", "profile", "sagittal"))
#: Preset name -> benchmark method (``runner.METHOD_ARGS``).
PRESETS = {"fast": "split-head", "paper": "paper"}
#: Distributions the GPU host lacks that a participant run imports (pybids and its
#: needs). The versions shipped are the ones installed here.
WHEELS = (
    "nibabel",
    "pybids",
    "SQLAlchemy",
    "num2words",
    "docopt",
    "bids-validator",
    "bidsschematools",
    "acres",
    "universal_pathlib",
    "pathlib_abc",
    "frozendict",
)
#: The GPU host's interpreter, for the wheels' tags.
HOST_PYTHON = "3.12"
#: A run is not started with less time than this left in the budget (s).
MIN_RUN_S = 30.0
PAYLOAD = REPO / "benchmarks" / "gpu" / "payload"
DATA_DIR = REPO.parent / "shared" / "data"


def run_name(key: str, preset: str) -> str:
    """File stem of one run's results: ``<dataset key>_<preset>``."""
    return f"{key}_{preset}"


# --- shipping outputs: int16 with an offset and a scale per volume ----------------


def pack(path: Path, volumes: dict[str, tuple[np.ndarray, np.ndarray]], sidecars: dict) -> None:
    """Save ``{contrast: (data (X, Y, Z), affine 4x4)}`` quantised to int16 in one ``.npz``.

    The step is the volume's range / 65535 (a PSNR of about 100 dB against that
    range), so the file is a third of the float32 NIfTI's size.
    """
    arrays: dict[str, np.ndarray] = {"sidecars": np.array(json.dumps(sidecars))}
    for name, (data, affine) in volumes.items():
        lo, hi = float(data.min()), float(data.max())
        step = (hi - lo) / 65535 or 1.0
        arrays[f"{name}__q"] = np.round((data - lo) / step - 32768).astype(np.int16)
        arrays[f"{name}__scale"] = np.array([lo, step])
        arrays[f"{name}__affine"] = np.asarray(affine, dtype=float)
    np.savez_compressed(path, **arrays)


def unpack(path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """The volumes (float32) and sidecars that :func:`pack` saved."""
    with np.load(path) as z:
        names = sorted({k.split("__")[0] for k in z.files if k.endswith("__q")})
        volumes = {}
        for n in names:
            lo, step = z[f"{n}__scale"]
            data = (z[f"{n}__q"].astype(np.float32) + 32768) * np.float32(step) + np.float32(lo)
            volumes[n] = (data, z[f"{n}__affine"])
        return volumes, json.loads(str(z["sidecars"]))


# --- prepare (here) ----------------------------------------------------------------


def _download_wheels(dest: Path) -> list[str]:
    """Wheels of :data:`WHEELS` for the GPU host's Python; sdist-only ones are built."""
    dest.mkdir(parents=True, exist_ok=True)
    tags = ["--python-version", HOST_PYTHON, "--implementation", "cp"]
    for plat in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
        tags += ["--platform", plat]
    pip = [sys.executable, "-m", "pip", "-q"]
    for dist in WHEELS:
        spec = f"{dist}=={importlib.metadata.version(dist)}"
        got = subprocess.run(
            [*pip, "download", "--no-deps", "--only-binary=:all:", *tags, "-d", str(dest), spec],
            capture_output=True,
            text=True,
        )
        if got.returncode != 0:  # pure-Python sdist (docopt): build its wheel here
            subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), spec], check=True)
    return sorted(p.name for p in dest.glob("*.whl"))


def prepare(
    payload: Path = PAYLOAD,
    data_dir: Path = DATA_DIR,
    cases: Sequence[tuple[str, str, str]] = GPU_CASES,
    wheels: bool = True,
) -> dict:
    """Write the payload: ``bids/<key>`` per case, ``wheels/``, ``manifest.json``."""
    from .bench import setting_key
    from .cases import load_case
    from .dataset import write_case_dataset

    if payload.exists():
        shutil.rmtree(payload)
    datasets = []
    for name, mode, view in cases:
        case = load_case(name, data_dir)
        key = setting_key(case.name, mode, view, "none")
        write_case_dataset(case, payload / "bids" / key, mode, view)
        datasets.append({"case": name, "mode": mode, "view": view, "key": key, "label": case.label})
    manifest = {
        "commit": _commit(),
        "sources": source_digest(),
        "datasets": datasets,
        "wheels": _download_wheels(payload / "wheels") if wheels else [],
    }
    (payload / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _commit() -> str:
    got = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return got.stdout.strip() or "unknown"


def source_digest() -> str:
    """SHA-256 over the package's Python sources: the code a run used, without git."""
    h = hashlib.sha256()
    for p in sorted((REPO / "bids_mcsr").rglob("*.py")):
        h.update(p.relative_to(REPO).as_posix().encode() + p.read_bytes())
    return h.hexdigest()[:16]


# --- run (there) ---------------------------------------------------------------------


def _device_facts(device: str) -> dict:
    import torch

    facts = {"torch": torch.__version__, "python": platform.python_version()}
    if device != "cpu" and torch.cuda.is_available():
        facts["device_name"] = torch.cuda.get_device_name(0)
    else:
        facts["device_name"] = platform.processor() or platform.machine()
    return facts


def run_check(
    payload: Path,
    out: Path,
    device: str = "cuda",
    presets: Sequence[str] = tuple(PRESETS),
    budget_s: float = 420.0,
    seed: int = 0,
    spline: bool = False,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    """Run the app on every payload dataset per preset (fast first); ``out/summary.json``.

    A run gets what is left of ``budget_s`` as its timeout; one that would start
    with less than :data:`MIN_RUN_S` left is recorded as skipped. ``spline`` adds
    the cubic-spline baseline (CPU; for the gains, so not on the GPU host);
    ``epochs`` overrides the presets' epoch budgets (a smoke run; ``None`` = theirs);
    ``overrides`` (``KEY=VALUE``) go to every INR run's ``--override``, e.g.
    ``precision=bfloat16``.
    """
    # The app runs from the repository root: relative paths would point elsewhere.
    payload, out = payload.resolve(), out.resolve()
    manifest = json.loads((payload / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    methods = (["spline"] if spline else []) + list(presets)
    summary = {
        "commit": manifest["commit"],
        "sources": source_digest(),
        "prepared_sources": manifest["sources"],
        "device": device,
        "seed": seed,
        "epochs": epochs,
        "overrides": list(overrides),
        **_device_facts(device),
        "runs": [],
    }
    start = time.monotonic()
    for preset in methods:
        for ds in manifest["datasets"]:
            record = {"case": ds["case"], "key": ds["key"], "preset": preset}
            left = budget_s - (time.monotonic() - start)
            if left < MIN_RUN_S:
                summary["runs"].append({**record, "skipped": f"time budget ({budget_s:.0f} s)"})
                continue
            record.update(_run_one(payload, out, ds, preset, device, seed, left, epochs, overrides))
            summary["runs"].append(record)
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["total_s"] = round(time.monotonic() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run_one(
    payload: Path,
    out: Path,
    ds: dict,
    preset: str,
    device: str,
    seed: int,
    timeout_s: float,
    epochs: int | None,
    overrides: Sequence[str],
) -> dict:
    method = PRESETS.get(preset, preset)
    with tempfile.TemporaryDirectory(prefix="mcsr-gpu-") as tmp:
        work = Path(tmp)
        cmd = app_command(
            payload / "bids" / ds["key"],
            work / "out",
            ds["label"],
            method,
            work_dir=work / "work",
            device=device,
            seed=seed,
            epochs=None if method == "spline" else epochs,
        )
        cmd.append("--no-registration")
        if method != "spline":
            for item in overrides:
                cmd += ["--override", item]
        run = run_child(cmd, work / "app.log", timeout_s)
        log = run.log.read_text(errors="replace")
        with open(out / "check.log", "a") as fh:
            fh.write(f"\n=== {ds['key']} {preset} (exit {run.returncode}) ===\n")
            fh.write("\n".join(log.splitlines()[-15:]) + "\n")
        record = {"returncode": run.returncode, "wall_s": round(run.wall_s, 2)}
        record["peak_rss_mb"] = round(run.max_rss_mb, 1)
        outputs = sorted((work / "out").rglob("*_desc-superres_*.nii.gz"))
        if run.returncode != 0 or not outputs:
            return {**record, "error": f"exit {run.returncode}; see check.log"}
        import nibabel as nib

        volumes, sidecars = {}, {}
        for path in outputs:
            contrast = path.name[: -len(".nii.gz")].split("_")[-1]
            img = nib.load(str(path))
            volumes[contrast] = (np.asarray(img.dataobj, dtype=np.float32), img.affine)
            sidecars[contrast] = json.loads(path.with_name(path.name[:-7] + ".json").read_text())
        name = run_name(ds["key"], preset)
        pack(out / f"{name}.npz", volumes, sidecars)
        sr = next(iter(sidecars.values())).get("SuperResolution", {})
        record.update(
            file=f"{name}.npz",
            fit_s=sr.get("WallTimeS"),
            peak_gpu_mb=sr.get("PeakGPUAllocatedMB"),
            peak_gpu_reserved_mb=sr.get("PeakGPUMemoryMB"),
            samples_per_s=sr.get("SamplesPerS"),
            epochs=sr.get("EpochsRun"),
            app_device=sr.get("Device"),
        )
        return record


# --- score (here) --------------------------------------------------------------------


def _scores(run_dir: Path, record: dict, case) -> dict[str, float]:
    from .bench import _white_matter, on_case_grid, score

    volumes, _ = unpack(run_dir / record["file"])
    preds = {c: on_case_grid(data, affine, case)[0] for c, (data, affine) in volumes.items()}
    return {c: s["psnr_tr"] for c, s in score(case, preds, _white_matter(case)).items()}


def score_check(gpu_dir: Path, cpu_dir: Path, data_dir: Path = DATA_DIR) -> dict:
    """The ``gpu.json`` record: GPU facts per case and preset, gains and CPU parity.

    ``cpu_dir`` holds a ``run --device cpu --spline`` of the same payload and seed:
    its spline rows give the gains, its preset rows the parity (GPU minus CPU
    truth-range PSNR per contrast, dB). Missing CPU rows, or a CPU run with
    another ``--epochs``, leave ``null``.
    """
    from .cases import load_case

    gpu = json.loads((gpu_dir / "summary.json").read_text())
    cpu = json.loads((cpu_dir / "summary.json").read_text())
    cpu_rows = {(r["key"], r["preset"]): r for r in cpu["runs"] if "file" in r}
    comparable = gpu.get("epochs") == cpu.get("epochs")
    cases: dict = {}
    entries = []
    for r in gpu["runs"]:
        keys = ("case", "preset", "wall_s", "fit_s", "peak_gpu_mb", "peak_gpu_reserved_mb")
        entry = {k: r.get(k) for k in keys}
        entry["samples_per_s"] = r.get("samples_per_s")
        if "file" not in r:
            entries.append({**entry, "error": r.get("error") or r.get("skipped")})
            continue
        case = cases.setdefault(r["case"], load_case(r["case"], data_dir))
        mine = _scores(gpu_dir, r, case)
        spline = cpu_rows.get((r["key"], "spline"))
        ref = cpu_rows.get((r["key"], r["preset"])) if comparable else None
        base = _scores(cpu_dir, spline, case) if spline else {}
        other = _scores(cpu_dir, ref, case) if ref else {}
        entry["psnr_tr"] = {c: round(v, 3) for c, v in mine.items()}
        entry["psnr_tr_gain"] = {c: _diff(v, base.get(c)) for c, v in mine.items()}
        entry["cpu_parity_db"] = {c: _diff(v, other.get(c)) for c, v in mine.items()}
        entry["cpu_wall_s"] = ref.get("wall_s") if ref else None
        entries.append(entry)
    return {
        "device_name": gpu.get("device_name"),
        "torch": gpu.get("torch"),
        "commit": gpu.get("commit"),
        "sources": gpu.get("sources"),
        "same_sources_as_cpu": gpu.get("sources") == cpu.get("sources"),
        "cpu_device_name": cpu.get("device_name"),
        "seed": gpu.get("seed"),
        "epochs": gpu.get("epochs"),
        "overrides": gpu.get("overrides", []),
        "cpu_overrides": cpu.get("overrides", []),
        "runs": entries,
    }


def _diff(a: float, b: float | None) -> float | None:
    return None if b is None else round(a - b, 3)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bids_mcsr.benchmark.gpu", description=__doc__)
    sub = p.add_subparsers(dest="step", required=True)
    pr = sub.add_parser("prepare", help="simulate the inputs and fetch the wheels (here)")
    pr.add_argument("--payload", type=Path, default=PAYLOAD)
    pr.add_argument("--data-dir", type=Path, default=DATA_DIR)
    pr.add_argument("--cases", nargs="+", help="case names (default: papersize ms-patient07)")
    pr.add_argument("--no-wheels", dest="wheels", action="store_false")
    ru = sub.add_parser("run", help="run the app per case and preset (on the GPU host)")
    ru.add_argument("--payload", type=Path, default=PAYLOAD)
    ru.add_argument("--out", type=Path, required=True)
    ru.add_argument("--device", default="cuda", choices=("cuda", "cpu", "auto"))
    ru.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ru.add_argument("--budget", type=float, default=420.0, help="seconds for all runs")
    ru.add_argument("--seed", type=int, default=0)
    ru.add_argument("--spline", action="store_true", help="also the cubic-spline baseline")
    ru.add_argument("--epochs", type=int, help="epoch budget of every run (default: presets')")
    ru.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="engine override of every INR run, e.g. precision=bfloat16")  # fmt: skip
    sc = sub.add_parser("score", help="score a GPU run against the truth and a CPU run (here)")
    sc.add_argument("gpu_dir", type=Path)
    sc.add_argument("cpu_dir", type=Path)
    sc.add_argument("--data-dir", type=Path, default=DATA_DIR)
    sc.add_argument("--json", type=Path, default=REPO / "benchmarks" / "gpu.json")
    a = p.parse_args(argv)
    if a.step == "prepare":
        cases = GPU_CASES
        if a.cases:
            cases = tuple((c, "profile", "sagittal") for c in a.cases)
        manifest = prepare(a.payload, a.data_dir, cases, a.wheels)
        size = sum(f.stat().st_size for f in a.payload.rglob("*") if f.is_file()) / 2**20
        print(f"payload {a.payload}: {len(manifest['datasets'])} datasets, "
              f"{len(manifest['wheels'])} wheels, {size:.1f} MiB")  # fmt: skip
        return 0
    if a.step == "run":
        summary = run_check(
            a.payload, a.out, a.device, a.presets, a.budget, a.seed, a.spline, a.epochs,
            a.override,
        )  # fmt: skip
        failed = [r for r in summary["runs"] if "error" in r]
        for r in summary["runs"]:
            print(json.dumps(r))
        return 1 if failed else 0
    result = score_check(a.gpu_dir, a.cpu_dir, a.data_dir)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
