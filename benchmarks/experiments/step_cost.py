"""Micro-benchmark: seconds per training step of the ``fast`` field at paper size.

Builds the preset's field exactly as ``fit.py`` does (``half_extent_mm`` = 112, the
160x224x160 case), runs ``--steps`` optimiser steps of ``batch_size`` LR voxels x K
profile points and prints the time split (forward+backward, Adam) and the implied
seconds per epoch for 160x224x40 + 40x224x160 LR voxels.

    timeout 120 ../../.venv/bin/python step_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

import bids_mcsr.inr.grid  # noqa: F401  (registers "dense-grid")
from bids_mcsr.inr.encoding import build_encoding
from bids_mcsr.inr.model import build_field
from bids_mcsr.inr.presets import resolve

LR_VOXELS = 2 * 160 * 224 * 40


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--adam", default="default", choices=["default", "foreach", "fused"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = resolve("fast")
    batch = args.batch or cfg.batch_size
    enc = build_encoding(cfg.encoding, {**cfg.encoding_params, "half_extent_mm": 112.0})
    fld = build_field("split-head", enc, 2, cfg.to_dict())
    kw = {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(args.adam, {})
    opt = torch.optim.Adam(fld.parameters(), lr=cfg.lr, **kw)
    k = cfg.profile_samples
    t_fb = t_opt = 0.0
    for _ in range(args.steps):
        pts = torch.rand(batch * k, 3) * 1.6 - 0.8
        which = torch.randint(0, 2, (batch,)).repeat_interleave(k)
        t0 = time.perf_counter()
        loss = fld(pts, which).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        t_fb += t1 - t0
        t_opt += t2 - t1
    n_par = sum(p.numel() for p in fld.parameters())
    per = (t_fb + t_opt) / args.steps
    print(
        "| threads | Adam | batch x K | grid params | fwd+bwd s/step | Adam s/step | s/epoch (paper size) |"
    )
    print(
        f"| {args.threads} | {args.adam} | {batch} x {k} | {n_par / 1e6:.1f} M | {t_fb / args.steps:.3f} | "
        f"{t_opt / args.steps:.3f} | {per * LR_VOXELS / batch:.0f} |"
    )


if __name__ == "__main__":
    main()
