"""Experiment harness for the ``fast`` preset (issue 5): image-space grid fields.

Loads icbm2009c T1w + T2w, crops a brain box, simulates T1w axial 1x1x4 mm and
T2w sagittal 4x1x1 mm in both simulation modes, scores the cubic-spline
baseline, then fits candidate fields and prints one table row per run.

The candidate model evaluates the field on the *whole output grid* (in slabs
along an axis that no input slices, so the forward model stays slab-local):

    features(x) = [fine 1 mm level, trilinear upsamples of coarser dense levels]
    trunk       = per-voxel MLP (shared), heads = per-contrast per-voxel MLP
    LR estimate = 1-D slice-profile operator along each input's slice axis

Usage (each run prints one row; ``--help`` lists the knobs)::

    timeout 240 .venv/bin/python benchmarks/experiments/fast_harness.py --size small --mode both
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from bids_mcsr.benchmark.metrics import psnr, ssim
from bids_mcsr.benchmark.simulate import simulate_acquisition
from bids_mcsr.resample import resample_to_grid

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "icbm2009c"
SIZES = {"quick": (48, 56, 48), "small": (96, 112, 96), "paper": (160, 224, 160)}
FACTORS = {"T1w": (1, 1, 4), "T2w": (4, 1, 1)}


def load_case(size: str):
    t1 = nib.load(DATA / "T1w.nii.gz")
    t2 = np.asarray(nib.load(DATA / "T2w.nii.gz").dataobj, dtype=np.float32)
    t1d = np.asarray(t1.dataobj, dtype=np.float32)
    shape = SIZES[size]
    idx = np.nonzero(t1d > 0)
    centre = [(int(i.min()) + int(i.max())) // 2 for i in idx]
    lo = [max(0, min(c - s // 2, n - s)) for c, s, n in zip(centre, shape, t1d.shape, strict=True)]
    box = tuple(slice(a, a + s) for a, s in zip(lo, shape, strict=True))
    aff = t1.affine.copy()
    aff[:3, 3] += aff[:3, :3] @ np.array(lo, dtype=float)
    return {"T1w": t1d[box], "T2w": t2[box]}, aff


def profile_matrix(n_hr: int, factor: int, n_points: int) -> np.ndarray:
    """(n_lr, n_hr) weights: each LR voxel = mean of the HR field (linear interp.) at
    ``n_points`` points spread over its extent (box profile; 1 = centre point)."""
    n_lr = n_hr // factor
    w = np.zeros((n_lr, n_hr))
    for i in range(n_lr):
        centre = i * factor + (factor - 1) / 2
        for t in (np.arange(n_points) + 0.5) / n_points - 0.5:
            p = centre + t * factor
            a = int(np.floor(p))
            frac = p - a
            w[i, a] += (1 - frac) / n_points
            if frac > 0:
                w[i, a + 1] += frac / n_points
    return w


def norm_params(x: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(x[x > 0], [1, 99])
    return float(lo), float(hi)


def scaled(x: np.ndarray, scale: tuple[float, float]) -> torch.Tensor:
    """``x`` mapped by a ``norm_params`` pair (lo, hi) to about [0, 1]."""
    return torch.from_numpy((x - scale[0]) / (scale[1] - scale[0]))


def modes(arg: str) -> list[str]:
    """Simulation modes of a ``--mode`` value ("both" = paper and profile)."""
    return ["paper", "profile"] if arg == "both" else [arg]


def simulate(hr: dict, aff: np.ndarray, mode: str) -> tuple[dict, dict, dict]:
    """LR data, LR affines and cubic-spline upsamples (HR grid) of every contrast in ``FACTORS``."""
    shape = hr["T1w"].shape
    lrs, affines, splines = {}, {}, {}
    for n, f in FACTORS.items():
        lrs[n], affines[n] = simulate_acquisition(hr[n], aff, f, mode)
        splines[n] = resample_to_grid(lrs[n], affines[n], shape, aff, order=3)
    return lrs, affines, splines


def box_operators(shape: tuple[int, ...], k: int) -> dict[str, tuple[int, torch.Tensor]]:
    """Per contrast: its slice axis and the ``profile_matrix`` along it (``k`` points, 0 = factor)."""
    ops = {}
    for n, f in FACTORS.items():
        ax = int(np.argmax(f))
        w = profile_matrix(shape[ax], f[ax], k if k > 0 else f[ax])
        ops[n] = (ax, torch.from_numpy(w).float())
    return ops


def apply_op(w: torch.Tensor, p: torch.Tensor, ax: int) -> torch.Tensor:
    """The (n_lr, n_hr) operator ``w`` applied along axis ``ax`` of the volume ``p``."""
    return torch.movedim(torch.tensordot(w, torch.movedim(p, ax, 0), dims=([1], [0])), 0, ax)


def score(mode, name, vol, spline, truth, mask, wall, *extra) -> tuple:
    """One table row: spline and fit PSNR / SSIM inside ``mask``, gain, wall s, extra cells."""
    sp_p, sp_s = psnr(spline, truth, mask), ssim(spline, truth, mask)
    p, s = psnr(vol, truth, mask), ssim(vol, truth, mask)
    return (mode, name, sp_p, sp_s, p, s, p - sp_p, wall, *extra)


def print_table(title: str, rows: list[tuple], extra_columns: tuple[str, ...] = ()) -> None:
    """Print ``score`` rows as a Markdown table, then this process's peak RSS."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    head = ["mode", "contrast", "spline PSNR", "spline SSIM", "fit PSNR", "fit SSIM", "gain dB"]
    print(f"# {title}")
    print("| " + " | ".join([*head, "fit s", *extra_columns]) + " |")
    for r in rows:
        cells = [*r[:2], f"{r[2]:.2f}", f"{r[3]:.3f}", f"{r[4]:.2f}", f"{r[5]:.3f}", f"{r[6]:+.2f}"]
        print("| " + " | ".join([*cells, f"{r[7]:.0f}", *map(str, r[8:])]) + " |")
    print(f"# peak RSS {rss:.2f} GB")


class GridField(torch.nn.Module):
    """Dense multi-resolution levels over the (padded) output grid + per-voxel MLPs."""

    def __init__(
        self,
        shape,
        n_contrasts,
        scales=(16, 8, 4, 2),
        feat=4,
        fine_feat=4,
        width=16,
        head_width=8,
        n_cond=0,
        init=1e-2,
        latent=0,
    ):
        super().__init__()
        q = max(scales)
        self.q = q
        self.shape = shape
        self.pshape = tuple(int(np.ceil((n - 1) / q) * q + 1) for n in shape)
        self.scales = scales
        self.levels = torch.nn.ParameterList(
            torch.nn.Parameter(
                torch.randn(1, feat, *[(p - 1) // s + 1 for p in self.pshape]) * init
            )
            for s in scales
        )
        self.fine = (
            torch.nn.Parameter(torch.randn(fine_feat, *self.pshape) * init) if fine_feat else None
        )
        cin = feat * len(scales) + fine_feat + n_cond
        # trunk: Linear(cin, width) + ReLU [+ Linear(width, latent) bottleneck]
        if width:
            trunk = [torch.nn.Linear(cin, width), torch.nn.ReLU()]
            if latent:
                trunk.append(torch.nn.Linear(width, latent))
        else:
            trunk = [torch.nn.Linear(cin, latent)]
        self.w1 = torch.nn.Sequential(*trunk)
        d = latent or width
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Linear(d, head_width), torch.nn.ReLU(), torch.nn.Linear(head_width, 1)
            )
            if head_width
            else torch.nn.Linear(d, 1)
            for _ in range(n_contrasts)
        )

    def features(self, y0: int, y1: int) -> torch.Tensor:
        """(C, X*(y1-y0)*Z) features of padded-grid slab [y0, y1) (y0 multiple of q)."""
        px, _, pz = self.pshape
        out = []
        for s, g in zip(self.scales, self.levels, strict=True):
            a, b = y0 // s, -(-(y1 - 1) // s)
            sub = g[:, :, :, a : b + 1]
            up = F.interpolate(
                sub, size=(px, (b - a) * s + 1, pz), mode="trilinear", align_corners=True
            )
            out.append(up[0, :, :, y0 - a * s : y1 - a * s])
        if self.fine is not None:
            out.append(self.fine[:, :, y0:y1])
        f = torch.cat(out, 0)
        return f.reshape(f.shape[0], -1)

    def forward(self, y0, y1, cond=None):
        f = self.features(y0, y1)
        f = f.reshape(f.shape[0], self.pshape[0], y1 - y0, self.pshape[2])[
            :, : self.shape[0], :, : self.shape[2]
        ]
        f = f.reshape(f.shape[0], -1)
        if cond is not None:
            f = torch.cat([f, cond.reshape(cond.shape[0], -1)], 0)
        h = self.w1(f.T)
        return torch.cat([hd(h) for hd in self.heads], 1).T  # (n_contrasts, N)


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
        lr_t = {n: scaled(lrs[n], scale[n]) for n in names}
        ops = box_operators(shape, args.k)
        cond = torch.stack([scaled(splines[n], scale[n]) for n in names]) if args.cond else None
        model = GridField(
            shape,
            len(names),
            scales=tuple(args.scales),
            feat=args.feat,
            fine_feat=args.fine,
            width=args.width,
            head_width=args.head,
            n_cond=len(names) if args.cond else 0,
            init=args.init,
            latent=args.latent,
        )
        grid_params = list(model.levels) + ([model.fine] if model.fine is not None else [])
        net_params = list(model.w1.parameters()) + list(model.heads.parameters())
        opt = torch.optim.Adam(
            [
                {"params": grid_params, "lr": args.lr_grid},
                {"params": net_params, "lr": args.lr_net},
            ],
            betas=(0.9, 0.99),
        )
        ny = shape[1]
        slab = args.slab
        nslab = -(-ny // slab)
        total = args.sweeps * nslab
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s, total=total: 0.5 * (1 + np.cos(np.pi * min(s, total) / total)) * 0.9 + 0.1,
        )
        step = 0
        for sweep in range(args.sweeps):
            order = torch.randperm(nslab).tolist()
            for j in order:
                y0, y1 = j * slab, min((j + 1) * slab, ny)
                c = cond[:, :, y0:y1] if cond is not None else None
                pred = model(y0, y1, c).reshape(len(names), shape[0], y1 - y0, shape[2])
                if args.residual:
                    pred = pred + cond[:, :, y0:y1]
                loss = 0.0
                for ci, n in enumerate(names):
                    ax, w = ops[n]
                    loss = loss + F.mse_loss(apply_op(w, pred[ci], ax), lr_t[n][:, y0:y1, :])
                if args.tv > 0:
                    for g in [model.fine] if model.fine is not None else []:
                        s = g[:, :, y0:y1]
                        loss = loss + args.tv * sum((s.diff(dim=d) ** 2).mean() for d in (1, 2, 3))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
            if args.verbose:
                print(
                    f"  sweep {sweep} loss {loss.item():.5f} t={time.time() - t0:.1f}s", flush=True
                )
        with torch.no_grad():
            out = torch.empty(len(names), *shape)
            for j in range(nslab):
                y0, y1 = j * slab, min((j + 1) * slab, ny)
                c = cond[:, :, y0:y1] if cond is not None else None
                pr = model(y0, y1, c).reshape(len(names), shape[0], y1 - y0, shape[2])
                out[:, :, y0:y1] = pr + (cond[:, :, y0:y1] if args.residual else 0)
        wall = time.time() - t0
        for ci, n in enumerate(names):
            vol = out[ci].numpy() * (scale[n][1] - scale[n][0]) + scale[n][0]
            rows.append(score(mode, n, vol, splines[n], hr[n], mask, wall))
    print_table(f"{args.tag} {vars(args)}", rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--mode", default="both")
    ap.add_argument("--tag", default="")
    ap.add_argument("--k", type=int, default=0, help="profile points (0 = slice factor)")
    ap.add_argument("--scales", type=int, nargs="+", default=[16, 8, 4, 2])
    ap.add_argument("--feat", type=int, default=4)
    ap.add_argument("--fine", type=int, default=4)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--head", type=int, default=8)
    ap.add_argument(
        "--latent", type=int, default=0, help="bottleneck width between trunk and heads"
    )
    ap.add_argument("--init", type=float, default=1e-2)
    ap.add_argument("--lr-grid", type=float, default=3e-2)
    ap.add_argument("--lr-net", type=float, default=3e-3)
    ap.add_argument("--sweeps", type=int, default=30)
    ap.add_argument("--slab", type=int, default=16)
    ap.add_argument("--tv", type=float, default=0.0)
    ap.add_argument("--cond", action="store_true")
    ap.add_argument("--residual", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
