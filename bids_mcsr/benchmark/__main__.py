"""``python -m bids_mcsr.benchmark``: fidelity and speed of mcsr through its CLI.

Examples::

    python -m bids_mcsr.benchmark --quick                 # CI-sized check (< 3 min)
    python -m bids_mcsr.benchmark                         # full table (hours on CPU)
    python -m bids_mcsr.benchmark --methods spline split-head --modes profile \
        --views sagittal coronal --motions none rigid --seed 0 1 2   # the headline table
    python -m bids_mcsr.benchmark --no-registration ...   # engine-only diagnostic
    python -m bids_mcsr.benchmark --cases icbm2009c --methods spline split-head --repeats 3
    python -m bids_mcsr.benchmark --cases icbm2009c --methods spline split-head --seed 0 1 2
    python -m bids_mcsr.benchmark --cases --hr T1w=t1.nii.gz T2w=t2.nii.gz
    python -m bids_mcsr.benchmark --rescore benchmarks/out/r8-cases  # new metrics, no refit

Exit status: 0 done (and, with --quick, split-head beat spline on every
contrast); 1 a run failed or the quick check failed; 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .bench import (
    Settings,
    merge,
    quick_failures,
    quick_settings,
    render,
    rescore,
    run_benchmark,
)
from .cases import CASE_NAMES, MOTIONS, QUICK_CASE, VIEWS
from .runner import METHODS, REPO
from .simulate import MODES

DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "out"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bids_mcsr.benchmark",
        description="Simulate anisotropic scans from HR volumes, super-resolve them with the "
        "mcsr CLI and score PSNR, SSIM, MI errors, time and memory against the HR truth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI-sized run: small icbm crop, "
        "spline vs split-head; exits 1 unless split-head beats spline",
    )
    p.add_argument(
        "--cases",
        nargs="*",
        default=list(CASE_NAMES),
        choices=[*CASE_NAMES, QUICK_CASE],
        help="shipped cases to run",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=MODES,
        help="simulation: paper = spline point sampling, profile = slice average",
    )
    p.add_argument(
        "--views",
        nargs="+",
        default=["sagittal"],
        choices=VIEWS,
        help="plane of the partner contrast (the first contrast is axial)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA,
        help="folder with the shipped cases (icbm2009c/, ms-patient07/, ...)",
    )
    p.add_argument(
        "--hr",
        nargs="+",
        default=[],
        metavar="[LABEL=]FILE",
        help="your own HR volumes on one grid, all scored (>= 2)",
    )
    p.add_argument("--hr-mask", metavar="FILE", help="brain mask for --hr (default: nonzero)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="work and results folder (default: benchmarks/out, or benchmarks/out/quick)",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per method; wall s is the median")
    p.add_argument(
        "--epochs",
        type=int,
        help="epoch budget of the INR methods except paper (default: the preset's)",
    )
    p.add_argument(
        "--paper-epochs",
        type=int,
        default=1,
        help="epochs of the paper preset (the paper's 50 take ~10 h per case on CPU)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        metavar="S",
        help="seed(s) of the fits; with several, each INR method runs once per seed and the "
        "table gives the median of every metric (each seed's own in a second table)",
    )
    p.add_argument(
        "--no-registration",
        dest="registration",
        action="store_false",
        help="engine-only diagnostic: run the app with --no-registration (default: the "
        "user's path, default options with registration, scored against the known motion)",
    )
    p.add_argument(
        "--motions",
        nargs="+",
        default=["none"],
        choices=MOTIONS,
        help="partner head motion: none (aligned scans) and/or rigid (2-5 deg, 4-10 mm, "
        "unknown to the headers)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="run nothing: print one table from saved results.json files, gains recomputed "
        "over the spline rows of all of them (e.g. ablations run apart from the spline)",
    )
    p.add_argument(
        "--rescore",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="fit nothing: score the outputs that earlier runs left under these --out folders "
        "again with the current metrics, rewrite their results.json/.md and print the tables",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="preset override passed to the app's --override for every INR method but "
        "paper (repeatable; for ablations, e.g. --override epochs=10)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="kill a single app run after S seconds",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    for name in ("repeats", "paper_epochs", "epochs"):
        value = getattr(a, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if a.merge and a.rescore:
        parser.error("--merge and --rescore do not go together: rescore first, then merge")
    if a.rescore:
        for folder in a.rescore:
            try:
                print(render(rescore(folder, a.data_dir)))
            except (OSError, ValueError, KeyError) as exc:
                print(
                    f"error: {folder}: {exc}; --rescore takes a folder that a benchmark run "
                    "wrote (its --out, with results.json and derivatives/)",
                    file=sys.stderr,
                )
                return 2
            print(f"rescored {folder / 'results.json'}", file=sys.stderr)
        return 0
    if a.merge:
        runs = []
        for f in a.merge:
            try:
                run = json.loads(f.read_text())
                missing = {"machine", "settings", "rows", "notes"} - set(run)
            except (OSError, ValueError, TypeError) as exc:
                missing = {str(exc)}
            if missing:
                print(
                    f"error: {f}: not a benchmark results.json ({', '.join(sorted(missing))}); "
                    "--merge takes the results.json files that earlier runs wrote under --out",
                    file=sys.stderr,
                )
                return 2
            runs.append(run)
        print(render(merge(runs)))
        return 0
    if a.out is None:
        a.out = DEFAULT_OUT / "quick" if a.quick else DEFAULT_OUT
    if a.quick:
        s = quick_settings(a.data_dir, a.out, a.device, a.epochs)
    else:
        if not a.cases and not a.hr:
            parser.error("nothing to run: give --cases and/or --hr")
        s = Settings(
            cases=a.cases,
            methods=a.methods,
            modes=a.modes,
            views=a.views,
            data_dir=a.data_dir,
            out=a.out,
            hr=a.hr,
            hr_mask=a.hr_mask,
            repeats=a.repeats,
            epochs=a.epochs,
            paper_epochs=a.paper_epochs,
            device=a.device,
            seeds=list(dict.fromkeys(a.seed)),
            registration=a.registration,
            motions=list(dict.fromkeys(a.motions)),
            timeout_s=a.timeout,
            overrides=a.override,
        )
    if s.cases and not s.data_dir.is_dir():
        print(
            f"error: {s.data_dir}: no such data folder; pass --data-dir (the folder holding "
            "icbm2009c/, ms-patient07/, ...)",
            file=sys.stderr,
        )
        return 2
    try:
        results = run_benchmark(s)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(results))
    print(f"saved {s.out / 'results.json'} and {s.out / 'results.md'}", file=sys.stderr)
    failed = any("error" in r for r in results["rows"])
    if a.quick:
        problems = quick_failures(results["rows"])
        for p in problems:
            print(f"QUICK CHECK FAILED: {p}", file=sys.stderr)
        return 1 if problems else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
