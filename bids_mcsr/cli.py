"""Command line: ``mcsr bids_dir output_dir {participant,group} [options]`` (BIDS-Apps).

:func:`main` returns the process exit code (see :mod:`bids_mcsr.errors` and the
README section "Exit codes, errors and re-runs"); every user-facing failure is
one ``mcsr: error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import (
    EXIT_DATAERR,
    EXIT_FAILED,
    EXIT_OK,
    DatasetError,
    McsrError,
    OutputError,
    UsageError,
)

log = logging.getLogger("bids_mcsr")

OUTPUT_SPACES = ("native", "MNI152NLin2009cAsym")

#: A BIDS label: letters and digits only (no path characters, no ``_``/``-``).
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (exit 64) instead of exiting with 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # bare strings need no JSON quotes
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser (option groups as in the README "Usage")."""
    p = _Parser(
        prog="mcsr",
        description="Multi-contrast MRI super-resolution with a subject-specific implicit "
        "neural representation (BIDS App).",
    )
    p.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset (read only)")
    p.add_argument(
        "output_dir", type=Path, help="derivatives folder to write (e.g. bids_dir/derivatives/mcsr)"
    )
    p.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="participant: super-resolve each subject/session; group: collect "
        "group_qc.tsv from existing participant outputs",
    )
    p.add_argument("-v", "--version", action="version", version=f"mcsr {__version__}")

    g = p.add_argument_group("selection")
    g.add_argument(
        "--participant_label",
        "--participant-label",
        nargs="+",
        metavar="LABEL",
        help="subjects to process, with or without 'sub-' (default: all)",
    )
    g.add_argument(
        "--session_label",
        "--session-label",
        nargs="+",
        metavar="LABEL",
        help="sessions to process, with or without 'ses-' (default: all)",
    )
    g.add_argument(
        "--contrasts",
        nargs="+",
        metavar="SUFFIX",
        help="exactly these anatomical suffixes, first = reference (e.g. T1w FLAIR); "
        "default: every anisotropic contrast of the session",
    )
    g.add_argument(
        "--skip_bids_validator",
        "--skip-bids-validator",
        action="store_true",
        help="do not run bids-validator-deno on bids_dir",
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--resolution",
        type=_positive_float,
        metavar="MM",
        help="isotropic output voxel size (default: finest input spacing)",
    )
    g.add_argument(
        "--output-space",
        choices=OUTPUT_SPACES,
        default="native",
        help="native (default): grid on the first contrast's scanner axes; or a template space",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute participants whose outputs already exist (default: skip them)",
    )

    g = p.add_argument_group("method")
    g.add_argument(
        "--method",
        choices=["inr", "spline"],
        default="inr",
        help="inr: split-head implicit neural representation; spline: cubic-spline "
        "baseline on the same grid (default: %(default)s)",
    )
    g.add_argument(
        "--preset",
        choices=["fast", "paper"],
        default="fast",
        help="engine hyper-parameter preset, README 'engine' (default: %(default)s)",
    )
    g.add_argument(
        "--architecture",
        choices=["split-head", "vanilla", "single"],
        default="split-head",
        help="network layout, the paper's ablations (default: %(default)s)",
    )
    g.add_argument(
        "--epochs",
        type=_positive_int,
        metavar="N",
        help="maximum epochs (overrides the preset's budget)",
    )
    g.add_argument(
        "--override",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="advanced: set one preset hyper-parameter (VALUE parsed as JSON), "
        "repeatable, e.g. --override batch_size=4000",
    )
    g.add_argument(
        "--no-registration",
        action="store_true",
        help="trust the scanner alignment instead of rigid MI registration",
    )
    g.add_argument(
        "--mask",
        type=Path,
        metavar="FILE",
        help="foreground mask on the grid of the first contrast (default: automatic)",
    )

    g = p.add_argument_group("resources")
    g.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto (default) = cuda when available",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of the fit and registration (default: %(default)s)",
    )
    g.add_argument(
        "--nthreads", type=_positive_int, metavar="N", help="CPU threads (default: all available)"
    )
    g.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="scratch folder (temporary files, pybids index); default: system temp",
    )
    g.add_argument(
        "--bids-database-dir",
        type=Path,
        metavar="DIR",
        help="keep pybids' index of bids_dir here and reuse it on later runs",
    )

    g = p.add_argument_group("logging")
    v = g.add_mutually_exclusive_group()
    v.add_argument("--verbose", action="store_true", help="debug messages")
    v.add_argument("--quiet", action="store_true", help="warnings and errors only, no progress")
    return p


# -- checks --------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def check_labels(args: argparse.Namespace) -> None:
    """Participant/session labels must be BIDS labels: they become parts of output paths."""
    for option, prefix in (("--participant_label", "sub-"), ("--session_label", "ses-")):
        for label in getattr(args, option.lstrip("-")) or []:
            if not _LABEL_RE.match(label.removeprefix(prefix)):
                raise UsageError(
                    f"{option} {label!r}: not a BIDS label (letters and digits only); "
                    f"fix: give the label of a {prefix}<label> folder, e.g. {prefix}01 or 01"
                )


def check_paths(args: argparse.Namespace) -> None:
    """Validate bids_dir and keep every path we write out of it (bids_dir stays read-only)."""
    check_labels(args)
    bids_dir = args.bids_dir.resolve()
    if not bids_dir.is_dir():
        raise DatasetError(f"bids_dir {args.bids_dir}: no such directory")
    if args.analysis_level == "participant":
        description = bids_dir / "dataset_description.json"
        if not description.is_file():
            raise DatasetError(
                f"{args.bids_dir}: no dataset_description.json, not a BIDS dataset root; "
                "fix: point bids_dir at the folder holding dataset_description.json"
            )
        try:
            if not isinstance(json.loads(description.read_text()), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise DatasetError(
                f"{description}: not a valid JSON object ({exc}); fix: repair it "
                '(at least {"Name": "...", "BIDSVersion": "1.9.0"})'
            ) from None
    writable = {
        "output_dir": args.output_dir,
        "--work-dir": args.work_dir,
        "--bids-database-dir": args.bids_database_dir,
    }
    for name, path in writable.items():
        if path is None:
            continue
        path = path.resolve()
        if path == bids_dir or (
            _inside(path, bids_dir) and not _inside(path, bids_dir / "derivatives")
        ):
            raise UsageError(
                f"{name} {path} is inside bids_dir; mcsr never writes into the input "
                "dataset; fix: use bids_dir/derivatives/<name> or a folder outside it"
            )
    if args.mask is not None and not args.mask.is_file():
        raise UsageError(f"--mask {args.mask}: no such file")
    from .workflow import SUPPORTED_SPACES

    if args.output_space not in SUPPORTED_SPACES:
        raise UsageError(
            f"--output-space {args.output_space}: not available in this version (supported: "
            f"{', '.join(SUPPORTED_SPACES)}); fix: use --output-space native"
        )
    # SimpleITK is imported only where registration runs, so a host without it (a
    # GPU check, a slim install) runs with --no-registration; say so at start.
    needs_sitk = not args.no_registration or args.output_space != "native"
    if needs_sitk and importlib.util.find_spec("SimpleITK") is None:
        raise UsageError(
            "registration needs SimpleITK, which is not installed; fix: pip install "
            "SimpleITK, or pass --no-registration (native output space only)"
        )
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                "--device cuda: no CUDA GPU visible to torch; fix: use "
                "--device cpu or auto (in Docker pass --gpus all)"
            )


def ensure_writable(path: Path, what: str) -> Path:
    """Create ``path`` and check that files can be written there (else exit 73)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".mcsr-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"{what} {path} is not writable ({exc.strerror or exc}); "
            "fix: choose a folder you can write to"
        ) from None
    return path


def validate_input(bids_dir: Path) -> None:
    """Run the BIDS validator; raise DatasetError (exit 65) listing its first errors."""
    from .discovery import validator_errors

    log.info("validating %s with bids-validator-deno", bids_dir)
    try:
        errors = validator_errors(bids_dir)
    except FileNotFoundError:
        raise UsageError(
            "bids-validator-deno not found; fix: `pip install bids-validator-deno` "
            "or pass --skip_bids_validator"
        ) from None
    except RuntimeError as exc:
        raise DatasetError(
            f"{bids_dir}: {exc}; fix: run the validator yourself or pass --skip_bids_validator"
        ) from None
    if errors:
        shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise DatasetError(
            f"{bids_dir} fails BIDS validation with {len(errors)} error(s): "
            f"{shown}; fix: correct the dataset, or pass --skip_bids_validator"
        )


# -- levels --------------------------------------------------------------------------


def options_from(args: argparse.Namespace):
    from .workflow import Options

    return Options(
        method=args.method,
        preset=args.preset,
        architecture=args.architecture,
        epochs=args.epochs,
        overrides=dict(args.override),
        device=args.device,
        seed=args.seed,
        nthreads=args.nthreads,
        resolution=args.resolution,
        contrasts=args.contrasts,
        registration=not args.no_registration,
        mask=args.mask.resolve() if args.mask else None,
        output_space=args.output_space,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )


def run_participant_level(args: argparse.Namespace) -> int:
    from . import derivatives
    from .discovery import find_jobs, open_layout
    from .report.group import record_job_status
    from .workflow import OUTPUTS_EXIST, run_job

    bids_dir = args.bids_dir.resolve()
    out_dir = ensure_writable(args.output_dir.resolve(), "output_dir")
    db_dir = args.bids_database_dir
    if db_dir is None and args.work_dir is not None:
        db_dir = args.work_dir / "pybids_db"
    if not args.skip_bids_validator:
        validate_input(bids_dir)
    layout = open_layout(bids_dir, db_dir.resolve() if db_dir else None)
    jobs = find_jobs(layout, args.participant_label, args.session_label)
    derivatives.write_dataset_files(out_dir, bids_dir)

    opts = options_from(args)
    results = []
    for n, job in enumerate(jobs, start=1):
        log.info("[%d/%d] %s", n, len(jobs), job.name)
        res = run_job(job, bids_dir, out_dir, opts)
        results.append(res)
        # The group report lists failed/skipped jobs from these records.
        record_job_status(out_dir, job.subject, job.session, res.status, res.message, res.seconds)
        if res.status == "done":
            log.info("%s: done in %.1f s, %d files", job.name, res.seconds, len(res.outputs))
        elif res.status == "complete" and res.message != OUTPUTS_EXIST:
            log.warning("%s: %s; kept (use --overwrite to recompute)", job.name, res.message)
        elif res.status == "complete":
            log.info("%s: already complete, skipped (use --overwrite to recompute)", job.name)
        elif res.status == "skipped":
            log.warning("%s", res.message)
        else:
            log.error("%s: FAILED: %s", job.name, res.message)

    counts = {
        s: sum(r.status == s for r in results) for s in ("done", "complete", "skipped", "failed")
    }
    log.info(
        "participant level: %d done, %d already complete, %d skipped, %d failed; outputs in %s",
        *counts.values(),
        out_dir,
    )
    if counts["failed"]:
        for r in results:
            if r.status == "failed":
                print(f"mcsr: error: {r.message}", file=sys.stderr)
        return EXIT_FAILED
    if not counts["done"] and not counts["complete"]:
        print(
            f"mcsr: error: no participant/session of {bids_dir} has two contrasts to fuse; "
            "fix: see the skip messages above, or name contrasts with --contrasts",
            file=sys.stderr,
        )
        return EXIT_DATAERR
    return EXIT_OK


def run_group_level(args: argparse.Namespace) -> int:
    from .group import run_group

    out_dir = args.output_dir.resolve()
    if not out_dir.is_dir():
        raise DatasetError(
            f"output_dir {args.output_dir}: no such directory; fix: run the participant level first"
        )
    ensure_writable(out_dir, "output_dir")
    path = run_group(out_dir, args.participant_label)
    log.info("group table: %s", path)
    return EXIT_OK


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s mcsr %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    )
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the level, return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"mcsr: error: {exc}", file=sys.stderr)
        return exc.exit_code
    setup_logging(args.verbose, args.quiet)
    start = time.perf_counter()
    try:
        check_paths(args)
        if args.work_dir is not None:
            work = ensure_writable(args.work_dir.resolve(), "--work-dir")
            tempfile.tempdir = str(work)
            os.environ.setdefault("MPLCONFIGDIR", str(work / "matplotlib"))
        if args.analysis_level == "participant":
            code = run_participant_level(args)
        else:
            code = run_group_level(args)
    except McsrError as exc:
        print(f"mcsr: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "mcsr: interrupted; finished outputs are kept, rerun to complete the rest",
            file=sys.stderr,
        )
        return 130
    log.debug("finished in %.1f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
