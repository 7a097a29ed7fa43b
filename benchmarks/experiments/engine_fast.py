"""Experiment: candidate ``fast`` presets through the real engine (``fit_contrasts``).

Same case as ``fast_harness.py`` (icbm2009c crop, T1w 1x1x4 + T2w 4x1x1, both
simulation modes); ``--overrides`` is a JSON dict applied to ``--preset``.

    timeout 240 ../../.venv/bin/python engine_fast.py --size small --overrides '{"epochs": 5}'
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from fast_harness import FACTORS, SIZES, load_case, modes, print_table, score, simulate

import bids_mcsr.inr.grid  # noqa: F401  (registers "dense-grid")
from bids_mcsr.inr.fit import Contrast, fit_contrasts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--mode", default="both")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--overrides", default="{}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip", action="store_true", help="clip outputs to the input's range")
    ap.add_argument("--progress", action="store_true", help="log each epoch")
    ap.add_argument(
        "--no-thickness",
        action="store_true",
        help="paper mode: leave slice_thickness unset (box over the spacing) instead of the "
        "HR voxel (1 mm, a point sample), which the benchmark's sidecar now states",
    )
    args = ap.parse_args()
    if args.progress:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    hr, aff = load_case(args.size)
    mask = hr["T1w"] > 0
    shape = hr["T1w"].shape
    rows = []
    for mode in modes(args.mode):
        lrs, affines, splines = simulate(hr, aff, mode)
        thick = 1.0 if mode == "paper" and not args.no_thickness else None
        contrasts = [Contrast(n, lrs[n], affines[n], slice_thickness=thick) for n in FACTORS]
        t0 = time.time()
        res = fit_contrasts(
            contrasts,
            shape,
            aff,
            preset=args.preset,
            overrides=json.loads(args.overrides),
            nthreads=args.threads,
            progress=args.progress,
            seed=args.seed,
        )
        wall = time.time() - t0
        epochs = f"{res.epochs_run} ({res.selected_epoch})"
        for n in FACTORS:
            vol = res.volumes[n]
            if args.clip:  # to the input's intensity range
                vol = vol.clip(lrs[n].min(), lrs[n].max())
            rows.append(score(mode, n, vol, splines[n], hr[n], mask, wall, epochs))
    print_table(
        f"{args.tag} clip={args.clip} size={args.size} preset={args.preset} "
        f"overrides={args.overrides} threads={args.threads}",
        rows,
        ("epochs (sel)",),
    )


if __name__ == "__main__":
    main()
