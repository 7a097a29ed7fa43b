"""Training throughput of the engine's presets: ``python -m bids_mcsr.benchmark.throughput``.

Per-sample cost does not depend on the size of the volumes (every step draws a
batch of LR voxels and runs the same network), so throughput is measured on a
small synthetic pair with the paper's geometry (T1w-like axial 1x1x4 mm +
FLAIR-like sagittal 4x1x1 mm, both of a shared random tissue map) through
``fit_contrasts``, and extrapolated to the paper-size subject
(160x224x40 + 40x224x160 = 2,867,200 LR voxels per epoch).

This suits MLP presets (``paper``), whose cost is all in the network. The
``fast`` preset's grid tables grow with the field of view, so its speed is
measured end to end on real cases by ``python -m bids_mcsr.benchmark``.

Prints a markdown table: preset, device, threads, LR voxels per second (median
over ``--repeats``), seconds per paper-size epoch and for the preset's epochs.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch
from scipy import ndimage

from ..inr.fit import Contrast, fit_contrasts
from ..inr.presets import PRESETS
from .simulate import simulate_acquisition

PAPER_SIZE_VOXELS = 160 * 224 * 40 + 40 * 224 * 160


def synthetic_pair(size: int = 48, seed: int = 0) -> tuple[list[Contrast], tuple, np.ndarray]:
    """Two contrasts of one smooth random tissue map, degraded along z and x."""
    rng = np.random.default_rng(seed)
    tissue = ndimage.gaussian_filter(rng.normal(size=(size,) * 3), 3)
    tissue = (tissue - tissue.min()) / np.ptp(tissue)
    hr = {"T1w": tissue, "FLAIR": np.sqrt(1.0 - tissue)}
    contrasts = []
    for name, factors in (("T1w", (1, 1, 4)), ("FLAIR", (4, 1, 1))):
        lr, affine = simulate_acquisition(hr[name], np.eye(4), factors, mode="profile")
        contrasts.append(Contrast(name=name, data=lr, affine=affine))
    return contrasts, (size, size, size), np.eye(4)


def measure(preset: str, device: str, nthreads: int | None, epochs: int) -> tuple[float, str]:
    """LR voxels per second of training (MI monitoring and inference excluded)."""
    contrasts, shape, affine = synthetic_pair()
    res = fit_contrasts(
        contrasts,
        shape,
        affine,
        preset=preset,
        overrides={"epochs": epochs, "early_stopping": False},
        device=device,
        nthreads=nthreads,
        progress=False,
    )
    return res.samples_per_s, res.device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bids_mcsr.benchmark.throughput", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--presets", nargs="+", default=["paper"], choices=list(PRESETS))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--nthreads", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    threads = args.nthreads or torch.get_num_threads()
    print(
        "| preset | device | threads | LR voxels/s (median) | runs | s per paper-size epoch | "
        "s for the preset's epochs |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.presets:
        runs = [measure(name, args.device, args.nthreads, args.epochs) for _ in range(args.repeats)]
        rate = statistics.median(r for r, _ in runs)
        per_epoch = PAPER_SIZE_VOXELS / rate
        total = per_epoch * PRESETS[name].epochs
        spread = ", ".join(f"{r:.0f}" for r, _ in runs)
        print(
            f"| {name} | {runs[0][1]} | {threads} | {rate:,.0f} | {spread} | {per_epoch:,.0f} | "
            f"{total:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
