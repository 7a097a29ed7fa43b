"""The benchmark loop: simulate -> write BIDS -> run the CLI per method -> score -> tabulate.

Work layout under ``out``::

    bids/<key>/                 simulated raw BIDS dataset
    derivatives/<key>/<method>/  the app's output_dir
    work/<key>/<method>/         the app's --work-dir
    logs/<key>_<method>_<repeat>.log
    results.json, results.md

where ``<key>`` is ``<case>_<mode>_<view>``, plus ``_moved`` for the cases whose
partner contrast was acquired after a rigid head motion (``setting_key``).

The headline mode is the user's path: the app runs with its default options,
registration included, and every row also scores that registration against the
known truth (``registration_error``). ``--no-registration`` is the engine-only
diagnostic.

With several seeds, every INR method runs once per seed into ``<method>_seed-<S>``
(and ``..._<method>_seed-<S>_<repeat>.log``); its table row holds the median of each
metric over the seeds, and ``seed_runs`` keeps every seed's own scores
(``seeds.py``; ``merge`` folds runs of one seed each into the same rows).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..derivatives import output_stem
from ..resample import resample_to_grid
from . import metrics
from .cases import QUICK_CASE, Case, brain_points, case_motion, load_case, user_case
from .dataset import bids_stem, write_case_dataset
from .runner import INR_METHODS, METHODS, REPO, app_command, run_child
from .seeds import add_seed_gains, combine_seeds, fold_seeds, seed_medians
from .simulate import displacement_error_mm
from .table import render


@dataclass
class Settings:
    """Everything that defines one benchmark run (saved into results.json)."""

    cases: list[str]
    methods: list[str]
    modes: list[str]
    views: list[str]
    data_dir: Path
    out: Path
    hr: list[str] = field(default_factory=list)
    hr_mask: str | None = None
    repeats: int = 1
    epochs: int | None = None  # all INR methods but ``paper``; None = preset default
    paper_epochs: int = 1
    device: str = "auto"
    # INR methods run once per seed (the table gives medians); a deterministic method
    # (spline without registration) runs with the first only
    seeds: list[int] = field(default_factory=lambda: [0])
    registration: bool = True
    motions: list[str] = field(default_factory=lambda: ["none"])
    timeout_s: float | None = None
    thickness: int = 4
    # preset overrides (``KEY=VALUE``) of every INR method but ``paper``: ablations
    overrides: list[str] = field(default_factory=list)


def _log(msg: str) -> None:
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """Date, host, CPU, GPU and the code's commit, for the results header."""
    import torch  # only here: the benchmark itself never needs it

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def setting_key(case: str, mode: str, view: str, motion: str = "none") -> str:
    """Folder name of one simulated setting: ``<case>_<mode>_<view>[_moved]``."""
    return f"{case}_{mode}_{view}" + ("" if motion == "none" else "_moved")


def registration_error(case: Case, motion: str, sidecar: dict) -> dict:
    """Mean and max displacement error (mm) of the app's registration over the brain.

    The partner (every contrast but the first) was acquired after the head moved
    by ``M = cases.case_motion`` (identity for ``"none"``), so the true
    registration is ``inv(M)``; the error is measured at the moved brain's
    points (``M @ cases.brain_points``). The estimate is the sidecar's
    ``Registration.Inputs[<file>].Matrix`` (absent = identity). Empty without
    registration.
    """
    reg = sidecar.get("SuperResolution", {}).get("Registration", {}) or {}
    inputs = reg.get("Inputs")
    if inputs is None:
        return {}
    moved = case_motion(case, motion)
    truth = None if moved is None else np.linalg.inv(moved)
    pts = brain_points(case)
    if moved is not None:
        pts = pts @ moved[:3, :3].T + moved[:3, 3]
    worst: tuple[float, float] = (0.0, 0.0)
    for c in case.contrasts[1:]:
        name = bids_stem(case.label, case.bids[c]) + ".nii.gz"
        matrix = (inputs.get(name) or {}).get("Matrix")
        est = None if matrix is None else np.asarray(matrix, dtype=float)
        worst = max(worst, displacement_error_mm(est, truth, pts))
    return {"reg_mean_mm": worst[0], "reg_max_mm": worst[1]}


def _sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())


def _prediction(path: Path, case: Case) -> tuple[np.ndarray, bool]:
    """The app's output on the case's HR grid; ``True`` when it had to be resampled."""
    img = nib.load(str(path))
    return on_case_grid(np.asarray(img.dataobj, dtype=np.float32), img.affine, case)


def on_case_grid(data: np.ndarray, affine: np.ndarray, case: Case) -> tuple[np.ndarray, bool]:
    """``data`` (voxel->world ``affine``) on the case's HR grid, by cubic spline where
    the grids differ; ``True`` when it had to be resampled."""
    if data.shape == case.shape and np.allclose(affine, case.affine, atol=1e-3):
        return data, False
    return resample_to_grid(data, affine, case.shape, case.affine, order=3), True


def output_path(out_dir: Path, case: Case, contrast: str) -> Path:
    """Where the app writes the super-resolved ``contrast`` of ``case``."""
    naming = dict(case.bids[contrast])
    suffix = naming.pop("suffix")
    stem = output_stem(case.label, None, naming, suffix)
    return out_dir / f"sub-{case.label}" / "anat" / f"{stem}.nii.gz"


def _fit_fields(sidecar: dict, method: str) -> dict:
    """Per-contrast fit facts from a sidecar's ``SuperResolution`` object."""
    sr = sidecar.get("SuperResolution", {})
    if method == "spline":
        # The spline baseline is numpy/scipy: CPU, no epochs, whatever its sidecar says.
        return {"device": "cpu"}
    return {
        "samples_per_s": sr.get("SamplesPerS"),
        "epochs": sr.get("EpochsRun"),
        "selected_epoch": sr.get("SelectedEpoch"),
        "stop_reason": sr.get("StopReason"),
        "device": sr.get("Device"),
        "peak_gpu_mb": sr.get("PeakGPUMemoryMB"),
    }


def method_seeds(s: Settings, method: str) -> list[int]:
    """The seeds ``method`` runs with: all for an INR (or with registration), else the first."""
    return list(s.seeds) if method in INR_METHODS or s.registration else list(s.seeds[:1])


def _run_name(method: str, seed: int, n_seeds: int) -> str:
    """Folder (and log) name of one method's run: ``<method>``, or ``<method>_seed-<S>``."""
    return method if n_seeds == 1 else f"{method}_seed-{seed}"


def _run_method(
    s: Settings,
    case: Case,
    key: str,
    bids_dir: Path,
    method: str,
    seed: int,
    name: str,
    motion: str = "none",
) -> tuple[dict, dict[str, dict], dict[str, np.ndarray] | None]:
    """Run one method with one seed ``s.repeats`` times into ``derivatives/<key>/<name>``.

    Returns the record common to all contrasts (timings, or ``error``), the
    per-contrast fit facts from the sidecars, and the predictions (None on failure).
    """
    out_dir = s.out / "derivatives" / key / name
    epochs = s.paper_epochs if method == "paper" else s.epochs if method in INR_METHODS else None
    cmd = app_command(
        bids_dir,
        out_dir,
        case.label,
        method,
        work_dir=s.out / "work" / key / name,
        epochs=epochs,
        device=s.device,
        seed=seed,
        overwrite=True,
        overrides=s.overrides,
    )
    if not s.registration:
        cmd.append("--no-registration")
    outputs = {c: output_path(out_dir, case, c) for c in case.contrasts}
    walls, fits, rss = [], [], []
    for r in range(s.repeats):
        run = run_child(cmd, s.out / "logs" / f"{key}_{name}_{r}.log", s.timeout_s)
        _log(f"{key} {name} run {r + 1}/{s.repeats}: exit {run.returncode}, {run.wall_s:.1f} s")
        missing = [p for p in outputs.values() if not p.is_file()]
        if run.returncode != 0 or missing:
            why = f"exit {run.returncode}" + (f", no {missing[0].name}" if missing else "")
            tail = run.log.read_text(errors="replace").strip().splitlines()[-3:]
            return {"error": f"{why}; see {run.log}", "log_tail": tail}, {}, None
        walls.append(run.wall_s)
        rss.append(run.max_rss_mb)
        wall = _sidecar(outputs[case.contrasts[0]]).get("SuperResolution", {}).get("WallTimeS")
        if wall is not None:
            fits.append(float(wall))
    preds, facts, regridded = {}, {}, False
    for c, path in outputs.items():
        preds[c], moved = _prediction(path, case)
        facts[c] = _fit_fields(_sidecar(path), method)
        regridded |= moved
    record = {
        "wall_s": statistics.median(walls),
        "wall_s_runs": walls,
        "fit_s": statistics.median(fits) if fits else None,
        "peak_rss_mb": max(rss),
        "regridded": regridded,
        "command": " ".join(cmd[1:]),
        **registration_error(case, motion, _sidecar(outputs[case.contrasts[0]])),
    }
    return record, facts, preds


#: Registration error fields of a run record (``registration_error``).
REG_KEYS = ("reg_mean_mm", "reg_max_mm")


def score(case: Case, preds: dict[str, np.ndarray], wm: np.ndarray | None) -> dict[str, dict]:
    """Metrics per scored contrast (PSNR, SSIM, eps MI, eps-hat, lesion metrics)."""
    errors = metrics.mi_errors(preds, case.volumes, case.mask, case.scored)
    out = {}
    for c in case.scored:
        truth = case.volumes[c]
        row = {
            "psnr": metrics.psnr(preds[c], truth, case.mask),
            "psnr_tr": metrics.psnr_truth_range(preds[c], truth, case.mask),
            "ssim": metrics.ssim(preds[c], truth, case.mask),
            "eps_mi": errors[f"eps_{c}"],
            "eps_hat": errors["eps_hat"],
        }
        if case.lesions is not None and wm is not None:
            row["lesion_psnr"] = metrics.psnr(preds[c], truth, case.mask, region=case.lesions)
            row["lesion_psnr_tr"] = metrics.psnr_truth_range(
                preds[c], truth, case.mask, region=case.lesions
            )
            row["lesion_contrast"] = metrics.lesion_contrast(preds[c], case.lesions, wm)
            row["lesion_contrast_truth"] = metrics.lesion_contrast(truth, case.lesions, wm)
        out[c] = row
    return out


def _add_spline_gains(rows: list[dict]) -> None:
    """``gain_db`` (and lesion gains) relative to the spline row of the same setting."""

    def where(r: dict) -> tuple:
        return _group(r)

    spline = {where(r): r for r in rows if r["method"] == "spline" and "psnr" in r}
    for r in rows:
        ref = spline.get(where(r))
        if ref is None or "psnr" not in r:
            continue
        r["gain_db"] = r["psnr"] - ref["psnr"]
        if r.get("ssim") is not None and ref.get("ssim") is not None:
            r["ssim_gain"] = r["ssim"] - ref["ssim"]
        if r.get("psnr_tr") is not None and ref.get("psnr_tr") is not None:
            r["gain_tr_db"] = r["psnr_tr"] - ref["psnr_tr"]
        add_seed_gains(r, ref)
        if "lesion_psnr" in r:
            r["lesion_psnr_gain_db"] = r["lesion_psnr"] - ref["lesion_psnr"]
            if "lesion_psnr_tr" in r and "lesion_psnr_tr" in ref:
                r["lesion_psnr_tr_gain_db"] = r["lesion_psnr_tr"] - ref["lesion_psnr_tr"]
            r["lesion_contrast_vs_spline"] = r["lesion_contrast"] / ref["lesion_contrast"]


def _white_matter(case: Case) -> np.ndarray | None:
    """The lesion metrics' reference white matter (cases with lesions only)."""
    if case.lesions is None:
        return None
    return metrics.white_matter_mask(case.volumes["T1w"], case.mask, case.lesions)


def rescore(out: Path, data_dir: Path) -> dict:
    """Score a saved run's outputs again with the current metrics; nothing is re-fitted.

    Reads ``out/results.json``, loads each row's outputs from
    ``out/derivatives/<key>/<run>`` (every seed's, for seeded rows),
    recomputes every metric of ``score`` (medians over seeds as ``combine_seeds``
    does) and the gains, keeps timings and fit facts, and rewrites ``results.json``
    and ``results.md``. For a metric added or corrected after the run was made; the
    simulation is deterministic, so the truth is the one the run was scored against.
    Shipped cases are read from ``data_dir``; ``--hr`` cases from the saved paths.
    """
    results = json.loads((out / "results.json").read_text())
    st = results["settings"]
    scores: dict[tuple[str, str], dict] = {}
    case: Case | None = None
    wm = None
    for row in results["rows"]:
        if "error" in row:
            continue
        if case is None or case.name != row["case"]:
            if row["case"] == "user":
                case = user_case(st["hr"], st.get("hr_mask"))
            else:
                case = load_case(row["case"], data_dir)
            wm = _white_matter(case)
        key = setting_key(case.name, row["mode"], row["view"], row.get("motion", "none"))
        seeds = row.get("seeds") or [st.get("seed", 0)]
        per_seed = []
        for seed in seeds:
            name = _run_name(row["method"], seed, len(seeds))
            if (key, name) not in scores:
                run_dir = out / "derivatives" / key / name
                paths = {c: output_path(run_dir, case, c) for c in case.contrasts}
                missing = [p for p in paths.values() if not p.is_file()]
                if missing:
                    raise FileNotFoundError(f"{missing[0]}: output of {key} {name} is missing")
                preds = {c: _prediction(p, case)[0] for c, p in paths.items()}
                scores[(key, name)] = score(case, preds, wm)
            per_seed.append((seed, scores[(key, name)][row["contrast"]]))
        row.update(per_seed[0][1])
        if len(per_seed) > 1:
            seed_medians(row, per_seed)
    _add_spline_gains(results["rows"])
    m = machine_info()
    note = f"metrics re-scored {m['date_utc']} with commit {m['commit']} (--rescore)"
    results["notes"] = [n for n in results["notes"] if "(--rescore)" not in n] + [note]
    save(results, out)
    return results


def _cases(s: Settings) -> list[Callable[[], Case]]:
    """Loaders (one case in memory at a time)."""
    loaders: list[Callable[[], Case]] = [
        lambda name=name: load_case(name, s.data_dir) for name in s.cases
    ]
    if s.hr:
        loaders.append(lambda: user_case(s.hr, s.hr_mask))
    return loaders


def run_benchmark(s: Settings) -> dict:
    """Run every case x mode x view x method; returns the results dict (also saved)."""
    s.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "machine": machine_info(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
        "rows": [],
        "notes": [],
    }
    for load in _cases(s):
        case = load()
        results["notes"] += [n for n in case.notes if n not in results["notes"]]
        wm = _white_matter(case)
        settings = [(m, v, mo) for mo in s.motions for m in s.modes for v in s.views]
        for mode, view, motion in settings:
            key = setting_key(case.name, mode, view, motion)
            bids_dir = s.out / "bids" / key
            write_case_dataset(case, bids_dir, mode, view, s.thickness, motion)
            for method in s.methods:
                base = {"case": case.name, "mode": mode, "view": view, "motion": motion}
                seeds = method_seeds(s, method)
                runs = []
                for seed in seeds:
                    name = _run_name(method, seed, len(seeds))
                    record, facts, preds = _run_method(
                        s, case, key, bids_dir, method, seed, name, motion
                    )
                    scores = score(case, preds, wm) if preds is not None else {}
                    # Registration errors are per run; carried per seed like the scores.
                    scores = {
                        c: {**v, **{k: record[k] for k in REG_KEYS if k in record}}
                        for c, v in scores.items()
                    }
                    runs.append((seed, record, facts, scores))
                for c in case.scored:
                    per_contrast = [
                        (seed, record, facts.get(c, {}), scores.get(c, {}))
                        for seed, record, facts, scores in runs
                    ]
                    row = {**base, "method": method, "contrast": c, "seeds": seeds}
                    results["rows"].append({**row, **combine_seeds(per_contrast)})
                # Saved after every method, so an interrupted run keeps its results.
                _add_spline_gains(results["rows"])
                save(results, s.out)
    return results


def _group(r: dict) -> tuple:
    """The setting and contrast a row scores (rows of one group differ by method)."""
    return (r["case"], r["mode"], r["view"], r.get("motion", "none"), r.get("contrast"))


def merge(runs: Sequence[dict]) -> dict:
    """One result from several saved runs (``results.json`` dicts).

    Rows are grouped by case, mode, view, motion and contrast (in order of first
    appearance), methods in the benchmark's order within each group. Rows of one
    group and method from runs of other seeds are folded into one
    (``seeds.fold_seeds``: medians over all seeds, each seed's own in ``seed_runs``).

    Gains are recomputed against the spline rows of *all* runs, so a run of the
    ablations alone is scored against the spline of another run of the same case
    (the simulation is deterministic: same case, mode and view give the same inputs).
    """
    if not runs:
        raise ValueError("merge needs at least one results.json")
    same: dict[tuple, list[dict]] = {}
    for run in runs:
        for r in run["rows"]:
            same.setdefault((*_group(r), r["method"]), []).append(r)
    rows = [fold_seeds(group) for group in same.values()]
    first: dict[tuple, int] = {}
    for r in rows:
        first.setdefault(_group(r), len(first))
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(
        key=lambda r: (
            first[_group(r)],
            order.get(r["method"], len(order)),
        )
    )
    _add_spline_gains(rows)
    notes = list(dict.fromkeys(n for run in runs for n in run["notes"]))
    sources = [{"machine": run["machine"], "settings": run["settings"]} for run in runs]
    return {**runs[0], "rows": rows, "notes": notes, "sources": sources}


def save(results: dict, out: Path) -> None:
    """Write ``results.json`` and ``results.md`` under ``out``."""
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "results.md").write_text(render(results))


def quick_settings(
    data_dir: Path, out: Path, device: str = "auto", epochs: int | None = None
) -> Settings:
    """The CI-sized run: a small icbm crop, spline vs split-head, paper simulation.

    ``epochs`` caps split-head's budget (default: the fast preset's own).
    """
    return Settings(
        epochs=epochs,
        cases=[QUICK_CASE],
        methods=["spline", "split-head"],
        modes=["paper"],
        views=["sagittal"],
        data_dir=data_dir,
        out=out,
        device=device,
    )


def quick_failures(rows: Sequence[dict]) -> list[str]:
    """Why the quick check fails (empty when split-head beats spline on every contrast,
    by truth-range PSNR)."""
    problems = [f"{r['method']} on {r['contrast']}: {r['error']}" for r in rows if "error" in r]
    by = {(r["contrast"], r["method"]): r for r in rows if r.get("psnr_tr") is not None}
    for contrast in sorted({r["contrast"] for r in rows}):
        inr, spline = by.get((contrast, "split-head")), by.get((contrast, "spline"))
        if inr is None or spline is None:
            problems.append(f"{contrast}: missing a split-head or spline result")
        elif not inr["psnr_tr"] > spline["psnr_tr"]:
            problems.append(
                f"{contrast}: split-head truth-range PSNR {inr['psnr_tr']:.2f} dB does not "
                f"beat spline {spline['psnr_tr']:.2f} dB"
            )
    return problems
