"""Experiment: a shared scalar latent field on the output grid with per-contrast 1-D heads.

u_c(x) = head_c(z(x)), z = dense multi-resolution grid on the output voxels,
head_c = piecewise-linear curve (a 1-D grid). Loss = sum_c MSE(A_c u_c, y_c) +
smoothness of z; A_c = slice-profile operator of contrast c. The whole output grid
is evaluated every step (a few float arrays, so cheap on a CPU).

    timeout 240 .venv/bin/python benchmarks/experiments/latent_field.py --size small
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from fast_harness import (
    FACTORS,
    SIZES,
    apply_op,
    box_operators,
    load_case,
    modes,
    norm_params,
    print_table,
    scaled,
    score,
    simulate,
)


def lut(table: torch.Tensor, z: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    n = table.shape[0]
    t = ((z - lo) / (hi - lo)).clamp(0, 1) * (n - 1)
    i0 = t.detach().floor().clamp(max=n - 2).long()
    w = t - i0
    return table[i0] * (1 - w) + table[i0 + 1] * w


def run(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hr, aff = load_case(args.size)
    mask = hr["T1w"] > 0
    shape = hr["T1w"].shape
    names = list(FACTORS)
    rows = []
    for mode in modes(args.mode):
        lrs, _, splines = simulate(hr, aff, mode)
        t0 = time.time()
        scale = {n: norm_params(lrs[n]) for n in names}
        y = {n: scaled(lrs[n], scale[n]) for n in names}
        sp = {n: scaled(splines[n], scale[n]) for n in names}
        ops = box_operators(shape, args.k)
        ref = names[args.ref]
        lo, hi = -0.25, 1.25
        z0 = sp[ref].clone()
        z = torch.nn.Parameter(z0.clone())
        # coarse levels (multi-resolution preconditioning), zero-initialised
        coarse = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(1, 1, *[-(-n // s) + 1 for n in shape]))
            for s in args.scales
        )
        knots = torch.linspace(lo, hi, args.knots)
        tables = torch.nn.ParameterList()
        for n in names:
            # warm start: least-squares 1-D regression spline_c ~ head(z0) by binning
            idx = ((z0 - lo) / (hi - lo)).clamp(0, 1) * (args.knots - 1)
            b = idx.round().long().flatten()
            cnt = torch.bincount(b, minlength=args.knots).float()
            s = torch.bincount(b, weights=sp[n].flatten(), minlength=args.knots)
            tab = torch.where(cnt > 0, s / cnt.clamp(min=1), knots)
            tables.append(torch.nn.Parameter(tab.float()))

        def field(z=z, coarse=coarse):
            zz = z
            for s, g in zip(args.scales, coarse, strict=True):
                up = F.interpolate(g, scale_factor=s, mode="trilinear", align_corners=False)
                zz = zz + up[0, 0, : shape[0], : shape[1], : shape[2]]
            return zz

        opt = torch.optim.Adam(
            [
                {"params": [z, *coarse], "lr": args.lr_z},
                {"params": list(tables), "lr": args.lr_head},
            ],
            betas=(0.9, 0.99),
        )
        total = args.steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s, total=total: 0.5 * (1 + np.cos(np.pi * min(s, total) / total)) * 0.95 + 0.05,
        )
        for step in range(total):
            zz = field()
            loss = 0.0
            for ci, n in enumerate(names):
                u = lut(tables[ci], zz, lo, hi)
                ax, w = ops[n]
                loss = loss + F.mse_loss(apply_op(w, u, ax), y[n])
            data = loss.item()
            if args.tv > 0:
                loss = loss + args.tv * sum((zz.diff(dim=d) ** 2).mean() for d in range(3))
            if args.head_smooth > 0:
                loss = loss + args.head_smooth * sum((t.diff(n=2) ** 2).sum() for t in tables)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if args.verbose and step % 25 == 0:
                print(f"  step {step} data {data:.6f} t={time.time() - t0:.1f}s", flush=True)
        with torch.no_grad():
            zz = field()
            out = {n: lut(tables[ci], zz, lo, hi).numpy() for ci, n in enumerate(names)}
        wall = time.time() - t0
        for n in names:
            vol = out[n] * (scale[n][1] - scale[n][0]) + scale[n][0]
            rows.append(score(mode, n, vol, splines[n], hr[n], mask, wall))
    print_table(f"{args.tag} {vars(args)}", rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--mode", default="both")
    ap.add_argument("--tag", default="")
    ap.add_argument("--k", type=int, default=0)
    ap.add_argument("--ref", type=int, default=0)
    ap.add_argument("--knots", type=int, default=64)
    ap.add_argument("--scales", type=int, nargs="*", default=[])
    ap.add_argument("--lr-z", type=float, default=1e-2)
    ap.add_argument("--lr-head", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tv", type=float, default=0.0)
    ap.add_argument("--head-smooth", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
