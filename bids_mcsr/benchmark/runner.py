"""Run the app's CLI in a child process, as a user would, and measure it.

Each run is its own child process; ``os.wait4`` returns that child's own
resource usage, so ``ru_maxrss`` is the peak RSS of exactly this run (the
largest of the child and any descendants it waited for) and not a maximum over
every child the benchmark ever started, as ``getrusage(RUSAGE_CHILDREN)`` would be.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: App arguments per benchmark method (added to the common participant arguments).
METHOD_ARGS: dict[str, list[str]] = {
    "spline": ["--method", "spline"],
    "single": ["--architecture", "single"],
    "vanilla": ["--architecture", "vanilla"],
    "split-head": [],
    "paper": ["--preset", "paper"],
}
METHODS = tuple(METHOD_ARGS)
INR_METHODS = ("single", "vanilla", "split-head", "paper")

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ChildRun:
    """Outcome of one child process."""

    returncode: int
    wall_s: float
    max_rss_mb: float
    log: Path


def run_child(cmd: Sequence[str], log: Path, timeout_s: float | None = None) -> ChildRun:
    """Run ``cmd`` with stdout+stderr to ``log``; measure wall time and peak RSS.

    A child still running after ``timeout_s`` is killed (SIGKILL) and reported
    with return code -9.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout_s is not None and time.perf_counter() - start > timeout_s:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - start
    # Tell Popen the child is reaped so its destructor does not wait again.
    proc.returncode = os.waitstatus_to_exitcode(status)
    # Linux reports ru_maxrss in KiB.
    return ChildRun(proc.returncode, wall, usage.ru_maxrss / 1024, log)


def app_command(
    bids_dir: Path,
    out_dir: Path,
    label: str,
    method: str,
    *,
    work_dir: Path,
    epochs: int | None = None,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
) -> list[str]:
    """The ``run.py ... participant`` command line for one benchmark method.

    The generated dataset is not re-validated on every run
    (``--skip_bids_validator``): it is the same for all methods, and validator
    time would blur the method timings.
    """
    if method not in METHOD_ARGS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    cmd = [
        sys.executable,
        str(REPO / "run.py"),
        str(bids_dir),
        str(out_dir),
        "participant",
        "--participant_label",
        label,
        "--skip_bids_validator",
        "--work-dir",
        str(work_dir),
        "--seed",
        str(seed),
        *METHOD_ARGS[method],
    ]
    if method != "spline":
        cmd += ["--device", device]
        if epochs is not None:
            cmd += ["--epochs", str(epochs)]
    if overwrite:
        cmd.append("--overwrite")
    return cmd
