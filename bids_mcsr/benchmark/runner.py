"""Run the app's CLI in a child process, as a user would, and measure it.

Linux carries ``ru_maxrss`` across ``fork``/``exec``: a child started directly by
the (large) benchmark process would report at least the benchmark's own RSS. So
each run goes through a tiny launcher interpreter that spawns the command and
reports, via ``os.wait4``, the peak RSS of exactly that command (the largest of
it and any descendants it waited for).
"""

from __future__ import annotations

import json
import os
import signal
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


#: Spawns argv[2:], waits, writes {"maxrss_kib": ...} to argv[1], exits with its code.
_LAUNCHER = """
import json, os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"maxrss_kib": usage.ru_maxrss}, fh)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_child(cmd: Sequence[str], log: Path, timeout_s: float | None = None) -> ChildRun:
    """Run ``cmd`` with stdout+stderr to ``log``; measure wall time and peak RSS.

    A child still running after ``timeout_s`` is killed (SIGKILL, its whole
    process group) and reported with return code -9.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    usage_file = log.with_suffix(".rusage.json")
    usage_file.unlink(missing_ok=True)
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(usage_file), *cmd]
    with open(log, "wb") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(
            launcher, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = -9
        wall = time.perf_counter() - start
    maxrss_kib = 0.0
    if usage_file.is_file():
        maxrss_kib = float(json.loads(usage_file.read_text())["maxrss_kib"])
    # Linux reports ru_maxrss in KiB.
    return ChildRun(returncode, wall, maxrss_kib / 1024, log)


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
    overrides: Sequence[str] = (),
) -> list[str]:
    """The ``run.py ... participant`` command line for one benchmark method.

    The generated dataset is not re-validated on every run
    (``--skip_bids_validator``): it is the same for all methods, and validator
    time would blur the method timings. ``overrides`` (``KEY=VALUE`` texts, as the
    app's ``--override`` takes them) go to every INR method but ``paper``.
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
    if method in INR_METHODS and method != "paper":
        for text in overrides:
            cmd += ["--override", text]
    if overwrite:
        cmd.append("--overwrite")
    return cmd
