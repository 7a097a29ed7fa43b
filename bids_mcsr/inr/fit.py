"""Fit one neural field to a subject's anisotropic contrasts and sample it on a grid.

``fit_contrasts`` is the engine's contract (docs/DESIGN.md). Outline:

1. Geometry: each LR voxel centre is mapped to world mm through
   ``transform @ affine`` (inputs are never resampled) and normalised jointly
   with one scale for all axes over the union bounding box of the inputs and the
   output grid (``geometry.CoordinateNormaliser``).
2. Intensities: per contrast, the ``percentiles`` (default 1st/99th) inside the
   input's mask map to 0 and 1 (no clipping); outputs are mapped back.
3. Forward model: a training sample is one LR voxel of contrast ``c``; its
   prediction is the mean of ``field(x)[c]`` over K points spread evenly across
   the voxel's slice thickness along its slice axis (box slice profile,
   ``resample.profile_offsets``). ``profile_samples`` is K for a slice as thick
   as the slice spacing; a contrast's ``slice_thickness`` (default: that
   spacing) scales it, ``K_c = ceil(profile_samples * thickness / spacing)``,
   and a slice no thicker than the in-plane spacing is a point sample (K_c = 1,
   the paper's voxel centre). All contrasts use the largest K_c (the thinner
   slices get denser points), and all B*K points of a batch go through the
   field in one forward pass.
4. Loss: sum over contrasts of ``weight_c`` x MSE over that contrast's voxels in
   the batch (paper Eq. 1 with per-contrast means); batches mix the contrasts. A
   batch is ``batch_size`` LR voxels, fewer for volumes too small for
   ``min_steps_per_epoch`` full batches (``batch_size_for``); an optional
   ``smoothness`` prior penalises output changes over ``smoothness_mm``. With
   ``diffusion`` > 0, every ``diffusion_every`` Adam steps the encoding's nodes
   (dense-grid) move that fraction (x the current learning-rate factor) toward
   their neighbours' mean, so nodes no slice constrains do not keep noise. With
   ``diffusion_reach`` > 0 a node's step also shrinks with the trilinear weight the
   training points put on it (``_diffusion_strength``), on the levels finer than
   half the widest unsampled stretch (``sample_gap``): only the gaps between
   point-sampled slices are filled, and contiguous box slices are left as fitted.
   With ``finest_margin_mm`` the finest grid level (and those at most
   ``margin_up_to_mm`` apart) keep only the nodes near the foreground
   (``_restrict_fine_levels``); ``contiguous_overrides`` are applied when
   every input's slices are contiguous (``contiguous_slices``). With
   ``finest_reference_mm`` a grid's finest level is refined per world axis for
   inputs whose in-plane voxels are finer than that (``_follow_fine_inputs``).
   An epoch visits every LR voxel once, or (``_epoch_pool``) the foreground mix of
   ``foreground_fraction``, or every voxel within ``far_background_mm`` of its
   input's mask plus a fresh ``far_background_fraction`` of the rest.
5. Monitoring: after every epoch the field predicts a fixed, seeded subsample
   (``mi_samples``, default 50,000) of the output-grid foreground; MI of every
   contrast pair drives the plateau rule of ``mi.py``. The selected epoch's
   weights are kept (a state_dict copy) and always written.
6. Inference: every output voxel inside the union of the inputs' fields of view
   (``inference_region="fov"``) or inside the foreground (``"foreground"``) is
   predicted in chunks of ``infer_chunk`` points (bounded memory); other voxels
   get the input's floor (``output_floor``: 0 for a magnitude image, the background
   fill of a signed one, else 0). Output is float32. With ``clip_to_floor`` every
   output is clipped at that floor where there is one.

The output-grid foreground (for MI, and for ``inference_region="foreground"``) is
``out_mask`` when given, else the voxels whose centres lie inside every input's
field of view and inside every input's mask (nearest-neighbour lookup); if that
is empty, inside any input's field of view.

Ablations (``architecture``): "split-head" (paper), "vanilla" (one trunk with N
outputs), "single" (one independent vanilla INR per contrast, each trained on its
own voxels only; MI is recorded between their per-epoch predictions but, as in
the paper, not used for stopping).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .. import geometry
from ..resample import inside_fov, profile_offsets
from . import grid  # also registers the "dense-grid" encoding
from . import mi as mi_mod
from .encoding import ENCODINGS, build_encoding
from .model import build_field
from .pose import RigidPoses
from .presets import Preset, json_ready, merge_overrides, resolve

LOG = logging.getLogger("bids_mcsr.inr")

ARCHITECTURES = ("split-head", "vanilla", "single")
_COVERAGE_CHUNK = 1_000_000


@dataclass
class Contrast:
    """One anisotropic input image (see docs/DESIGN.md, engine contract)."""

    name: str
    data: np.ndarray  # (X, Y, Z) input intensities, any float/int dtype
    affine: np.ndarray  # (4, 4) voxel->world of the input image
    transform: np.ndarray | None = None  # (4, 4) world->reference world; None = identity
    mask: np.ndarray | None = None  # (X, Y, Z) bool foreground of this input; None = all
    weight: float = 1.0  # loss weight (alpha, beta of the paper)
    # mm the scanner integrated across a slice (BIDS SliceThickness); None = the
    # spacing along the slice axis; <= the in-plane spacing = a point sample
    slice_thickness: float | None = None
    # learn a rigid correction of ``transform`` with the field (Preset.pose_lr > 0;
    # pose.py); the workflow sets it for the inputs that registration moved
    refine_pose: bool = False


@dataclass
class FitResult:
    """What a fit produced (see docs/DESIGN.md, engine contract)."""

    volumes: dict[str, np.ndarray]
    config: dict
    epochs_run: int
    selected_epoch: int  # 1-based
    stop_reason: str  # "mi-plateau" | "max-epochs"
    mi_curve: dict[str, list[float]]
    loss_curve: dict[str, list[float]]
    wall_time_s: float
    samples_per_s: float
    device: str
    seed: int
    # peak GPU memory of the fit (MB): PyTorch's reserved pool, and the part of it
    # tensors held (torch.cuda.max_memory_allocated); None on the CPU
    peak_gpu_mb: float | None = None
    peak_gpu_allocated_mb: float | None = None
    # per refined input (Contrast.refine_pose): the 4x4 world -> world correction the
    # field learned, applied after its ``transform`` (pose.RigidPoses.world_corrections)
    pose_corrections: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _TrainingSet:
    """All LR samples of the contrasts one field learns, as tensors on the device."""

    centres: torch.Tensor  # (n, 3) float32, normalised voxel centres
    targets: torch.Tensor  # (n,) float32, normalised intensities
    which: torch.Tensor  # (n,) int64, output index of each sample
    foreground: torch.Tensor  # (n,) bool, inside the input's mask
    offsets: torch.Tensor  # (n_outputs, K, 3) float32, slice-profile displacements
    # (n,) bool, the far background an epoch subsamples (_far_sampling); all False if none
    far: torch.Tensor


@dataclass
class _Trained:
    mi_curve: dict[str, list[float]]
    loss_curve: list[list[float]]  # per output, per epoch
    history: list[np.ndarray] = field(default_factory=list)  # per epoch (n_mi, n_outputs)
    epochs_run: int = 0
    selected: int = 0  # 0-based
    stop_reason: str = "max-epochs"
    samples: int = 0
    train_s: float = 0.0
    batch: int = 0  # LR voxels per step (batch_size_for)
    diffused: bool = False  # the encoding's nodes were diffused (Preset.diffusion)


def fit_contrasts(
    contrasts: Sequence[Contrast],
    out_shape: tuple[int, int, int],
    out_affine: np.ndarray,
    *,
    preset: str = "fast",
    architecture: str = "split-head",
    overrides: dict | None = None,
    device: str = "auto",
    seed: int = 0,
    nthreads: int | None = None,
    out_mask: np.ndarray | None = None,
    progress: bool = True,
) -> FitResult:
    """Fit a field to ``contrasts`` and sample every contrast on the output grid.

    Parameters
    ----------
    contrasts
        The inputs (>= 2 for "split-head"/"vanilla", >= 1 for "single").
    out_shape, out_affine
        Output grid: shape ``(nx, ny, nz)`` and its 4x4 voxel->world affine in the
        reference world (where ``transform`` maps each input).
    preset, overrides
        A name in ``presets.PRESETS`` and field overrides, e.g. ``{"epochs": 10}``.
    architecture
        "split-head" (paper), "vanilla" or "single" (ablations).
    device
        "auto" (CUDA when available), "cpu" or "cuda".
    seed
        Seeds the network initialisation, epoch shuffling and MI subsample; two CPU
        runs with the same seed, inputs and thread count give identical outputs.
    nthreads
        torch intra-op threads during the fit (restored afterwards); None = unchanged.
    out_mask
        ``out_shape`` bool foreground for MI; None = derived from the inputs.
    progress
        tqdm bar when stderr is a TTY, else one INFO log line per epoch; False
        logs the epochs at DEBUG level.

    Returns
    -------
    FitResult
        ``volumes`` are float32 ``out_shape`` arrays in each input's intensity scale.
    """
    t_start = time.perf_counter()
    contrasts = list(contrasts)
    out_shape = _check_inputs(contrasts, out_shape, out_affine, architecture, out_mask)
    cfg = resolve(preset, overrides)
    out_voxel = float(geometry.voxel_sizes(out_affine).max())
    contiguous = contiguous_slices(contrasts, cfg.profile_samples, out_voxel)
    if contiguous and cfg.contiguous_overrides:
        extra = dict(cfg.contiguous_overrides)
        if "encoding" not in extra and cfg.encoding != resolve(preset).encoding:
            extra.pop("encoding_params", None)  # parameters of the preset's own encoding
        # the preset's contiguous-slice settings first, the caller's overrides on top
        cfg = resolve(preset, merge_overrides(extra, dict(overrides or {})))
    affines = [geometry.compose(c.transform, c.affine) for c in contrasts]
    normaliser = geometry.CoordinateNormaliser.from_inputs(
        [(c.data.shape, a) for c, a in zip(contrasts, affines, strict=True)]
        + [(out_shape, out_affine)]
    )
    cfg = _follow_fine_inputs(cfg, affines, normaliser.half_extent, out_voxel)
    dev = _device(device)
    names = [c.name for c in contrasts]
    if dev.type == "cpu":
        keep_large_allocations()
    elif dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    with _torch_settings(nthreads, deterministic=dev.type == "cpu", tf32=cfg.precision == "tf32"):
        scales = [_intensity_scale(c, cfg.percentiles) for c in contrasts]
        foreground, in_fov = _output_coverage(out_shape, out_affine, contrasts, affines, out_mask)
        mi_index = _mi_subsample(foreground, cfg.mi_samples, seed)
        mi_points = _grid_points(mi_index, out_shape, out_affine, normaliser, dev)
        region = np.flatnonzero(in_fov if cfg.inference_region == "fov" else foreground)

        sets = [
            _training_set(
                cs, [affines[i] for i in idx], [scales[i] for i in idx], cfg, normaliser, dev
            )
            for cs, idx in _groups(contrasts, architecture)
        ]
        fields = _build_fields(
            architecture, len(contrasts), len(sets), cfg, seed, dev, normaliser.half_extent
        )
        gen = torch.Generator().manual_seed(seed)
        groups = [idx for _, idx in _groups(contrasts, architecture)]
        weights = [
            torch.tensor([contrasts[i].weight for i in idx], dtype=torch.float32, device=dev)
            for idx in groups
        ]
        group_names = [[names[i] for i in idx] for idx in groups]
        poses = [_poses([contrasts[i] for i in idx], cfg, normaliser, dev) for idx in groups]

        runs = []
        for k, (fld, ts) in enumerate(zip(fields, sets, strict=True)):
            label = f"{architecture} {'/'.join(group_names[k])}"
            n_k = ts.offsets.shape[1]
            runs.append(
                _train(
                    fld,
                    ts,
                    weights[k],
                    group_names[k],
                    cfg,
                    mi_points,
                    gen,
                    label,
                    progress,
                    normaliser.half_extent,
                    max(sample_gap(contrasts[i], cfg.profile_samples, n_k) for i in groups[k]),
                    poses[k],
                )
            )
        corrections = _pose_corrections(contrasts, groups, poses, normaliser)

        if architecture == "single":
            # Independent nets: MI between their predictions of the same epoch.
            epochs_run = min(r.epochs_run for r in runs)
            mi_curve: dict[str, list[float]] = {}
            for e in range(epochs_run):
                values = np.concatenate([r.history[e] for r in runs], axis=1)
                for key, value in mi_mod.pairwise_mi(values, names, cfg.mi_bins).items():
                    mi_curve.setdefault(key, []).append(value)
            loss_curve = {n: r.loss_curve[0] for n, r in zip(names, runs, strict=True)}
            selected, stop_reason = epochs_run - 1, "max-epochs"
        else:
            run = runs[0]
            epochs_run, selected, stop_reason = run.epochs_run, run.selected, run.stop_reason
            mi_curve = run.mi_curve
            loss_curve = {n: curve for n, curve in zip(names, run.loss_curve, strict=True)}

        pred = _predict_grid(
            fields, region, out_shape, out_affine, normaliser, cfg.infer_chunk, dev, cfg.precision
        )
        volumes = {}
        floors = [output_floor(c) for c in contrasts]
        clipped: list[int | None] = [None] * len(names)
        for i, name in enumerate(names):
            lo, hi = scales[i]
            # not predicted: the input's background (0 for magnitude or without a floor)
            flat = np.full(int(np.prod(out_shape)), floors[i] or 0.0, dtype=np.float32)
            flat[region] = pred[:, i] * np.float32(hi - lo) + np.float32(lo)
            if cfg.clip_to_floor and floors[i] is not None:
                floor = np.float32(floors[i])
                clipped[i] = int(np.count_nonzero(flat < floor))
                np.maximum(flat, floor, out=flat)
            volumes[name] = flat.reshape(out_shape)

    samples = sum(r.samples for r in runs)
    train_s = sum(r.train_s for r in runs)
    config = {
        "preset": preset,
        "architecture": architecture,
        **cfg.to_dict(),
        "overrides": json_ready(dict(overrides or {})),
        "seed": seed,
        "nthreads": nthreads if nthreads is not None else torch.get_num_threads(),
        "contrasts": [
            {
                "name": c.name,
                "weight": float(c.weight),
                "n_voxels": int(c.data.size),
                "n_foreground": int(c.data.size if c.mask is None else np.count_nonzero(c.mask)),
                "intensity_low": float(lo),
                "intensity_high": float(hi),
                "slice_axis": geometry.slice_axis(c.affine),
                "slice_thickness_mm": slice_thickness(c),
                "profile_points": profile_points(c, cfg.profile_samples),
                "output_floor": floor,
                "clipped_voxels": n_clipped,
            }
            for c, (lo, hi), floor, n_clipped in zip(
                contrasts, scales, floors, clipped, strict=True
            )
        ],
        "normaliser": {
            "centre_mm": [float(v) for v in normaliser.centre],
            "half_extent_mm": float(normaliser.half_extent),
        },
        "mi_points": int(len(mi_index)),
        "foreground_voxels": int(np.count_nonzero(foreground)),
        "foreground_source": "out_mask" if out_mask is not None else "inputs",
        "inferred_voxels": int(len(region)),
        "samples_per_epoch": int(sum(r.samples // max(r.epochs_run, 1) for r in runs)),
        "batch_size_used": [r.batch for r in runs],
        "diffusion_applied": any(r.diffused for r in runs),
        "contiguous_slices": contiguous,
        "n_parameters": int(sum(p.numel() for f in fields for p in f.parameters())),
        "pose_refined": sorted(corrections),
    }
    return FitResult(
        volumes=volumes,
        config=config,
        epochs_run=int(epochs_run),
        selected_epoch=int(selected) + 1,
        stop_reason=stop_reason,
        mi_curve=mi_curve,
        loss_curve=loss_curve,
        wall_time_s=time.perf_counter() - t_start,
        samples_per_s=samples / train_s if train_s > 0 else 0.0,
        device=_device_label(dev),
        seed=seed,
        peak_gpu_mb=_peak_gpu_mb(dev),
        peak_gpu_allocated_mb=_peak_gpu_mb(dev, reserved=False),
        pose_corrections=corrections,
    )


def _poses(contrasts: list[Contrast], cfg: Preset, normaliser, dev) -> RigidPoses | None:
    """The learned poses of one field's contrasts, or None when none is refined.

    A field needs an anchor: when every contrast it learns asks for refinement
    (e.g. the single architecture's one-contrast fields), none is refined.
    """
    refine = [c.refine_pose for c in contrasts]
    if cfg.pose_lr <= 0 or not any(refine):
        return None
    if all(refine):
        LOG.info("pose refinement skipped for %s: no fixed contrast", [c.name for c in contrasts])
        return None
    return RigidPoses(refine, normaliser.half_extent).to(dev)


def _pose_corrections(contrasts, groups, poses, normaliser) -> dict[str, np.ndarray]:
    """World corrections of the refined contrasts, by name."""
    out = {}
    for idx, pose in zip(groups, poses, strict=True):
        if pose is None:
            continue
        for i, m in zip(idx, pose.world_corrections(normaliser.centre), strict=True):
            if contrasts[i].refine_pose:
                out[contrasts[i].name] = m
    return out


# --------------------------------------------------------------------------- inputs


def _check_inputs(contrasts, out_shape, out_affine, architecture, out_mask) -> tuple[int, int, int]:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}"
        )
    minimum = 1 if architecture == "single" else 2
    if len(contrasts) < minimum:
        raise ValueError(
            f"architecture {architecture!r} needs at least {minimum} contrasts, got {len(contrasts)}"
        )
    names = [c.name for c in contrasts]
    if len(set(names)) != len(names):
        raise ValueError(f"contrast names must be unique, got {names}")
    for c in contrasts:
        if np.ndim(c.data) != 3:
            raise ValueError(f"contrast {c.name}: data must be 3-D, got shape {np.shape(c.data)}")
        if not np.all(np.isfinite(c.data)):
            raise ValueError(f"contrast {c.name}: data contains NaN or Inf values")
        for label, m in (("affine", c.affine), ("transform", c.transform)):
            if m is not None and (np.shape(m) != (4, 4) or not np.all(np.isfinite(m))):
                raise ValueError(f"contrast {c.name}: {label} must be a finite 4x4 matrix")
        if c.mask is not None and (np.shape(c.mask) != c.data.shape or not np.any(c.mask)):
            raise ValueError(f"contrast {c.name}: mask must have the data's shape and be non-empty")
        if not c.weight >= 0:
            raise ValueError(f"contrast {c.name}: weight must be >= 0, got {c.weight}")
        if c.slice_thickness is not None and not 0 < c.slice_thickness < np.inf:
            raise ValueError(
                f"contrast {c.name}: slice_thickness must be a positive number of mm, "
                f"got {c.slice_thickness}"
            )
    shape = tuple(int(n) for n in out_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"out_shape must be 3 positive integers, got {out_shape}")
    # (a NaN would reach the grid lookup as an invalid node index)
    if np.shape(out_affine) != (4, 4) or not np.all(np.isfinite(out_affine)):
        raise ValueError("out_affine must be a finite 4x4 matrix")
    if out_mask is not None and (np.shape(out_mask) != shape or not np.any(out_mask)):
        raise ValueError(f"out_mask must have shape {shape} and be non-empty")
    return shape  # type: ignore[return-value]


#: ``background_fill``: the least share of an input's voxels that must hold the fill value.
FILL_SHARE = 0.1


def background_fill(c: Contrast) -> float | None:
    """The constant that fills ``c``'s background, when little lies clearly below it; or None.

    Brain extraction, FOV zero-filling and intensity normalisation (z-scores, as in
    BraTS) leave one value over the background: the input's most common value, held by
    at least ``FILL_SHARE`` of its voxels. As for ``nonnegative_input`` (the same rule
    about 0), at most 1 % of the voxels may lie more than 1 % of the 99th percentile's
    distance below it: a cubic resampling upstream rings there at hard edges. None
    when there is no such value (a raw scan's noisy air, a phase map).
    """
    data = np.asarray(c.data).ravel()
    # a value held by >= 10 % of the voxels is the most common one of an even sample
    values, counts = np.unique(data[:: max(1, data.size // 100_000)], return_counts=True)
    value = values[np.argmax(counts)]
    if np.count_nonzero(data == value) < FILL_SHARE * data.size:
        return None
    return float(value) if _little_below(data, float(value)) else None


def _little_below(data: np.ndarray, value: float) -> bool:
    """Whether at most 1 % of ``data`` lies more than 1 % of (99th percentile - ``value``)
    below ``value``; False when the 99th percentile is not above ``value``."""
    top = float(np.percentile(data, 99))
    if top <= value:
        return False
    return np.count_nonzero(data < value - 0.01 * (top - value)) <= 0.01 * data.size


def output_floor(c: Contrast) -> float | None:
    """The least value an output of ``c`` may take (``Preset.clip_to_floor``), or None.

    0 for a magnitude image (``nonnegative_input``); for a signed one, its
    ``background_fill`` (z-scored skull-stripped data), or None without one (a phase
    map, a z-scored whole head). Nothing in such an image is darker than its
    background; output voxels outside every input's field of view get the floor too
    (0 without one).
    """
    return 0.0 if nonnegative_input(c) else background_fill(c)


def nonnegative_input(c: Contrast) -> bool:
    """True when ``c`` looks like a magnitude image: its negative values are few or tiny.

    At most 1 % of its voxels lie below -1 % of its 99th percentile. A magnitude image
    resampled with a cubic kernel upstream rings slightly below 0 around a hard edge
    (e.g. a skull-stripped brain: up to a third of the voxels a hair below 0, a few far
    below); a signed image, such as a phase map or z-scored intensities, has a large
    share of clearly negative voxels.
    """
    return _little_below(np.asarray(c.data, dtype=np.float32), 0.0)


def _intensity_scale(c: Contrast, percentiles: tuple[float, float]) -> tuple[float, float]:
    """``(lo, hi)`` input intensities that map to 0 and 1 (percentiles inside the mask)."""
    values = np.asarray(
        c.data if c.mask is None else c.data[np.asarray(c.mask, bool)], dtype=np.float64
    )
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        raise ValueError(
            f"contrast {c.name}: intensities are constant inside the mask; nothing to fit"
        )
    return float(lo), float(hi)


def slice_spacing(c: Contrast) -> float:
    """Distance (mm) between ``c``'s slices: its voxel size along the slice axis."""
    return float(geometry.voxel_sizes(c.affine)[geometry.slice_axis(c.affine)])


def in_plane_spacing(c: Contrast) -> float:
    """The larger of ``c``'s two voxel sizes (mm) across its slice axis."""
    sizes = geometry.voxel_sizes(c.affine)
    return float(np.delete(sizes, geometry.slice_axis(c.affine)).max())


def sample_gap(c: Contrast, profile_samples: int, n_points: int) -> float:
    """Widest stretch (mm) along ``c``'s slice axis that none of its training points cover.

    Point samples (``profile_points`` 1) leave the whole slice spacing between
    slice centres; a box profile spread over ``n_points`` points (``profile_offsets``)
    covers ``thickness * (n_points - 1) / n_points`` of it, so contiguous slices
    leave about one point spacing.
    """
    if profile_points(c, profile_samples) == 1:
        return slice_spacing(c)
    return max(0.0, slice_spacing(c) - slice_thickness(c) * (n_points - 1) / n_points)


def contiguous_slices(
    contrasts: Sequence[Contrast], profile_samples: int, out_voxel_mm: float = 0.0
) -> bool:
    """True when no input leaves a stretch along its slice axis wider than a voxel.

    Each contrast's ``sample_gap`` with its own K (``profile_points``) is compared
    with the larger of its in-plane voxel and ``out_voxel_mm`` (the output grid's
    largest spacing, mm): contiguous 4 mm box-profile slices with K = 4 leave 1 mm,
    so they are contiguous for a 1 mm output even at 0.9 mm in-plane; point samples
    leave the whole slice spacing.
    """
    for c in contrasts:
        k = profile_points(c, profile_samples)
        limit = max(in_plane_spacing(c), out_voxel_mm)
        if sample_gap(c, profile_samples, k) > limit * (1 + 1e-6):
            return False
    return True


def in_plane_spacing_per_axis(affines: Sequence[np.ndarray]) -> np.ndarray:
    """Finest in-plane voxel size (mm) of the inputs along each world axis ``(x, y, z)``.

    Every voxel axis of an input but its slice axis counts for the world axis its
    direction is closest to (oblique scans go to the nearest axis); an isotropic
    input counts on all three. ``affines``: each input's 4x4 voxel -> reference-world
    affine. Axes no input samples in-plane get ``inf``.
    """
    out = np.full(3, np.inf)
    for affine in affines:
        columns = np.asarray(affine, dtype=float)[:3, :3]
        sizes = geometry.voxel_sizes(affine)
        thick = geometry.slice_axis(affine) if geometry.is_anisotropic(affine) else None
        for j in range(3):
            if j != thick:
                axis = int(np.argmax(np.abs(columns[:, j])))
                out[axis] = min(out[axis], sizes[j])
    return out


#: Most nodes a refined finest level may span before it is restricted to the
#: foreground: 32 M nodes x 4 features are 0.5 GB while the level is drawn. All-axial
#: 0.5 mm clinical scans over a 240 mm field need 24.5 M (0.68 x 0.68 x 1.33 mm); finer
#: pixels in two orientations would need far more, and get the finest spacing that fits.
MAX_REFINED_NODES = 32_000_000


def finest_spacing(
    finest_mm: float,
    reference_mm: float,
    in_plane: np.ndarray,
    half_extent_mm: float,
    max_nodes: int = MAX_REFINED_NODES,
) -> list[float] | None:
    """Per-axis spacing (mm) of the finest grid level for inputs finer than ``reference_mm``.

    ``finest_mm`` was tuned for in-plane voxels of ``reference_mm``; along an axis
    where ``in_plane`` (``in_plane_spacing_per_axis``) is smaller it shrinks in
    proportion, elsewhere it stays. If the level would span more than ``max_nodes``
    nodes over the field's cube (``half_extent_mm``), the refined spacings grow by a
    common factor until it does not (never beyond ``finest_mm``). None when no axis
    is finer (nothing changes).
    """
    scale = np.minimum(1.0, np.asarray(in_plane, dtype=float) / reference_mm)
    if np.all(scale >= 1.0 - 1e-6):
        return None
    spacing = finest_mm * scale
    nodes = float(np.prod([grid.resolution_for_spacing(v, half_extent_mm) for v in spacing]))
    if nodes > max_nodes:
        spacing = np.minimum(finest_mm, spacing * (nodes / max_nodes) ** (1 / 3) * 1.01)
    return [round(float(v), 4) for v in spacing]


def _follow_fine_inputs(
    cfg: Preset, affines: Sequence[np.ndarray], half_extent_mm: float, out_voxel_mm: float
) -> Preset:
    """``cfg`` with its finest grid level refined for sub-reference in-plane voxels.

    Applies ``Preset.finest_reference_mm`` to an encoding with a scalar
    ``finest_mm``: the level's spacing per axis from ``finest_spacing``, one more
    level per halving of the smallest spacing (the coarse-to-fine growth stays
    about the same), and the level stored near the foreground only. Detail finer
    than the output voxel (``out_voxel_mm``, e.g. ``--resolution 1`` for 0.5 mm
    pixels) cannot show in the outputs, so pixels count as at least that size.
    """
    params = cfg.encoding_params
    if cfg.finest_reference_mm is None or not isinstance(params.get("finest_mm"), (int, float)):
        return cfg
    in_plane = np.maximum(in_plane_spacing_per_axis(affines), out_voxel_mm)
    fine = finest_spacing(
        float(params["finest_mm"]), cfg.finest_reference_mm, in_plane, half_extent_mm
    )
    if fine is None:
        return cfg
    extra = max(0, round(math.log2(params["finest_mm"] / min(fine))))
    new = {**params, "finest_mm": fine}
    if "n_levels" in params:
        new["n_levels"] = int(params["n_levels"]) + extra
    margin = cfg.finest_margin_mm if cfg.finest_margin_mm is not None else 3.0
    LOG.info(
        "in-plane voxels %s mm (x/y/z) are finer than the %g mm the grid is tuned for: "
        "finest grid level %s mm",
        "/".join(f"{v:.3g}" if np.isfinite(v) else "-" for v in in_plane),
        cfg.finest_reference_mm,
        "/".join(f"{v:.3g}" for v in fine),
    )
    return replace(cfg, encoding_params=new, finest_margin_mm=margin)


def slice_thickness(c: Contrast) -> float:
    """The slice thickness (mm) the forward model integrates for ``c``."""
    if c.slice_thickness is not None:
        return float(c.slice_thickness)
    return slice_spacing(c)


def profile_points(c: Contrast, profile_samples: int) -> int:
    """K_c: points across ``c``'s slice (1 = point sample at the voxel centre).

    ``profile_samples`` is K for a slice as thick as the slice spacing; a thinner
    or thicker slice gets proportionally fewer or more, and a slice no thicker
    than the in-plane spacing is a point sample.
    """
    thickness = slice_thickness(c)
    if thickness <= in_plane_spacing(c) * (1 + 1e-6):
        return 1
    return max(1, math.ceil(profile_samples * thickness / slice_spacing(c) - 1e-6))


def _groups(contrasts: list[Contrast], architecture: str) -> list[tuple[list[Contrast], list[int]]]:
    """Contrasts learnt by each field: all in one, or one field each for "single"."""
    if architecture == "single":
        return [([c], [i]) for i, c in enumerate(contrasts)]
    return [(contrasts, list(range(len(contrasts))))]


def _training_set(contrasts, affines, scales, cfg: Preset, normaliser, dev) -> _TrainingSet:
    centres, targets, which, fg, far, offsets = [], [], [], [], [], []
    for k, (c, a, (lo, hi)) in enumerate(zip(contrasts, affines, scales, strict=True)):
        world = geometry.voxel_centres(c.data.shape, a)
        centres.append(normaliser(world))
        targets.append(
            ((np.asarray(c.data, np.float64).ravel() - lo) / (hi - lo)).astype(np.float32)
        )
        which.append(np.full(c.data.size, k, dtype=np.int64))
        fg.append(
            np.ones(c.data.size, bool) if c.mask is None else np.asarray(c.mask, bool).ravel()
        )
        far.append(_far_background(c, _far_sampling(cfg)).ravel())
    n_points = max(profile_points(c, cfg.profile_samples) for c in contrasts)
    for c, a in zip(contrasts, affines, strict=True):
        # The slice axis comes from the input's own spacing (a rigid transform keeps it).
        if profile_points(c, cfg.profile_samples) == 1:
            disp = np.zeros((n_points, 3))
        else:
            disp = profile_offsets(a, geometry.slice_axis(c.affine), n_points, slice_thickness(c))
        offsets.append(np.asarray(normaliser.scale_mm(disp), dtype=np.float32))

    def tensor(parts):
        return torch.from_numpy(np.concatenate(parts)).to(dev)

    return _TrainingSet(
        centres=tensor(centres),
        targets=tensor(targets),
        which=tensor(which),
        foreground=tensor(fg),
        offsets=torch.from_numpy(np.stack(offsets)).to(dev),
        far=tensor(far),
    )


def _far_sampling(cfg: Preset) -> float | None:
    """``far_background_mm`` when an epoch subsamples the far background, else None.

    It does not when ``foreground_fraction`` is set (that mix takes precedence) or
    ``far_background_fraction`` is 1 (every voxel anyway).
    """
    if cfg.foreground_fraction is not None or cfg.far_background_fraction >= 1:
        return None
    return cfg.far_background_mm


def _far_background(c: Contrast, distance_mm: float | None) -> np.ndarray:
    """Bool ``c.data.shape``: voxels farther than ``distance_mm`` (world mm) from ``c.mask``.

    All False without a mask, a distance or any foreground.
    """
    if distance_mm is None or c.mask is None or not np.any(c.mask):
        return np.zeros(c.data.shape, bool)
    outside = ~np.asarray(c.mask, bool)
    # Euclidean distance in mm through the input's own (anisotropic) voxel sizes
    dist = ndimage.distance_transform_edt(outside, sampling=geometry.voxel_sizes(c.affine))
    return dist > distance_mm


def _output_coverage(
    out_shape, out_affine, contrasts, affines, out_mask
) -> tuple[np.ndarray, np.ndarray]:
    """Flat bool ``(prod(out_shape),)`` arrays: MI foreground, and inside any input's FOV."""
    shape = tuple(int(v) for v in out_shape)
    inside_all = np.ones(shape, bool)
    inside_any = np.zeros(shape, bool)
    step = max(1, _COVERAGE_CHUNK // (shape[1] * shape[2]))
    for x0 in range(0, shape[0], step):
        slab = (min(step, shape[0] - x0), *shape[1:])
        rows = slice(x0, x0 + slab[0])
        for c, a in zip(contrasts, affines, strict=True):
            matrix = geometry.voxel_map(out_affine, a)
            inside = inside_fov(slab, matrix, c.data.shape, start=x0)
            inside_any[rows] |= inside
            if c.mask is not None:
                nearest = tuple(
                    np.clip(
                        np.rint(geometry.mapped_coordinate(slab, matrix, d, start=x0)),
                        0,
                        c.data.shape[d] - 1,
                    ).astype(np.intp)
                    for d in range(3)
                )
                inside &= np.asarray(c.mask, bool)[nearest]
            inside_all[rows] &= inside
    inside_all, inside_any = inside_all.ravel(), inside_any.ravel()
    if out_mask is not None:
        return np.asarray(out_mask, bool).ravel(), inside_any
    if inside_all.any():
        return inside_all, inside_any
    LOG.warning(
        "the inputs share no foreground on the output grid; MI uses the union of their FOVs"
    )
    return (inside_any if inside_any.any() else np.ones(inside_any.size, bool)), inside_any


def _mi_subsample(foreground: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted flat indices of at most ``n`` foreground voxels, fixed by ``seed``."""
    idx = np.flatnonzero(foreground)
    if len(idx) > n:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))
    return idx


def _grid_points(flat_index, out_shape, out_affine, normaliser, dev) -> torch.Tensor:
    ijk = np.stack(np.unravel_index(flat_index, out_shape), axis=1)
    return torch.from_numpy(normaliser(geometry.voxel_to_world(ijk, out_affine))).to(dev)


# --------------------------------------------------------------------------- torch setup


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                "device 'cuda' requested but no CUDA GPU is available; use --device cpu"
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")


def _device_label(dev: torch.device) -> str:
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameters


def _peak_gpu_mb(dev: torch.device, reserved: bool = True) -> float | None:
    """Most GPU memory the fit held (MB), or None on the CPU.

    ``reserved``: PyTorch's reserved pool (tensors plus the allocator's cached
    blocks), the part of the process's GPU use that grows with the data; the CUDA
    context (a few hundred MB, fixed) comes on top in ``nvidia-smi``. Otherwise the
    tensors alone (``max_memory_allocated``), what the engine itself needs.
    """
    if dev.type != "cuda":
        return None
    peak = torch.cuda.max_memory_reserved if reserved else torch.cuda.max_memory_allocated
    return peak(dev) / 2**20


@functools.cache
def keep_large_allocations() -> bool:
    """Let glibc reuse freed large blocks instead of returning them to the OS.

    Every training step allocates tensors the size of the finest feature grid
    (its gradient: 80 MB at paper size). glibc serves blocks over 32 MB with a fresh
    ``mmap``, so each step page-faults that memory in again: a 92 MB ``torch.zeros``
    took 24 ms instead of 2.5 ms, about a fifth of a CPU step (docs/fast-engine.md,
    round 4). Raising the mmap and trim thresholds keeps such blocks in the heap.
    Freed blocks then stay mapped, so peak RSS rises somewhat (paper size: 1.1 GB
    -> 1.3-1.7 GB). No-op (False) where the C library is not glibc. Process-wide
    and idempotent.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31) == 1
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def _torch_settings(
    nthreads: int | None, deterministic: bool, tf32: bool = False
) -> Iterator[None]:
    """Thread count, deterministic kernels and CUDA TF32 matrix products for the fit;
    previous values restored."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        if nthreads is not None:
            torch.set_num_threads(max(1, int(nthreads)))
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn)
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def _autocast(precision: str, dev: torch.device):
    """``torch.autocast`` to bfloat16 on ``dev`` when ``precision`` is "bfloat16", else a no-op.

    Wraps forward passes only: the backward pass runs in the forward's dtypes, and
    parameters, gradients and Adam's state stay float32 (no loss scaling needed).
    """
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def _build_fields(
    architecture, n_contrasts, n_fields, cfg: Preset, seed, dev, half_extent_mm: float
) -> list[nn.Module]:
    # Encodings sized in mm (e.g. "dense-grid") take the normaliser's scale.
    params = dict(cfg.encoding_params)
    if "half_extent_mm" in inspect.signature(ENCODINGS[cfg.encoding]).parameters:
        params.setdefault("half_extent_mm", half_extent_mm)
    # fork_rng: seeding initialisation must not disturb the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if architecture == "single":
            fields = [
                build_field("vanilla", build_encoding(cfg.encoding, params), 1, cfg.to_dict())
                for _ in range(n_fields)
            ]
        else:
            enc = build_encoding(cfg.encoding, params)
            fields = [build_field(architecture, enc, n_contrasts, cfg.to_dict())]
    return [f.to(dev) for f in fields]


def _optimizer(fld: nn.Module, cfg: Preset) -> torch.optim.Optimizer:
    enc_ids = {id(p) for p in fld.encoding.parameters()}
    groups = [
        {
            "params": [p for p in fld.parameters() if id(p) in enc_ids],
            "weight_decay": cfg.weight_decay.get("encoding", 0.0),
        },
        {
            "params": [p for p in fld.parameters() if id(p) not in enc_ids],
            "weight_decay": cfg.weight_decay.get("network", 0.0),
            "lr": cfg.lr if cfg.network_lr is None else cfg.network_lr,
        },
    ]
    # The fused kernel is the same Adam; on CPU it updates a 20 M-cell feature grid
    # ~15x faster than the per-tensor loop (docs/fast-engine.md), and it is deterministic.
    return torch.optim.Adam(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=tuple(cfg.adam_betas),
        eps=cfg.adam_eps,
        fused=next(fld.parameters()).device.type in ("cpu", "cuda"),
    )


def _lr_factor(cfg: Preset, steps_per_epoch: int):
    """Per-step multiplier of the base learning rate (schedule x warm-up)."""
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if cfg.schedule == "cosine":  # annealed once per epoch, as CosineAnnealingLR(T_max=epochs)
            f = 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) / cfg.epochs))
        elif cfg.schedule == "cosine-step":
            f = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        else:
            f = 1.0
        if cfg.warmup_steps:
            f *= min(1.0, (step + 1) / cfg.warmup_steps)
        return f

    return factor


# --------------------------------------------------------------------------- training


def _epoch_pool(ts: _TrainingSet, cfg: Preset, gen: torch.Generator) -> torch.Tensor:
    """The sample indices one epoch draws from (CPU): every LR voxel, or the masked mix.

    With ``far_background_mm`` (and no ``foreground_fraction``, which takes precedence):
    every voxel near the masks plus a fresh random ``far_background_fraction`` of the
    far background. A far voxel only pins the constant background that the coarse
    levels and the network draw (with contiguous slices, where the preset sets this,
    the fine levels are stored near the foreground only), so a quarter per epoch does.
    """
    n = len(ts.targets)
    if cfg.foreground_fraction is None:
        far = ts.far.cpu()  # all False unless _far_sampling(cfg)
        if not far.any():
            return torch.arange(n)
        near_idx = torch.nonzero(~far).squeeze(1)
        far_idx = torch.nonzero(far).squeeze(1)
        n_far = int(round(len(far_idx) * cfg.far_background_fraction))
        return torch.cat([near_idx, far_idx[torch.randperm(len(far_idx), generator=gen)[:n_far]]])
    fg = torch.nonzero(ts.foreground.cpu()).squeeze(1)
    bg = torch.nonzero(~ts.foreground.cpu()).squeeze(1)
    # All foreground voxels plus enough background ones to make up (1 - f) of the epoch.
    n_bg = min(
        len(bg), int(round(len(fg) * (1 - cfg.foreground_fraction) / cfg.foreground_fraction))
    )
    return torch.cat([fg, bg[torch.randperm(len(bg), generator=gen)[:n_bg]]])


def batch_size_for(pool_size: int, cfg: Preset) -> int:
    """LR voxels per step: ``batch_size``, shrunk for small volumes.

    A volume too small for ``min_steps_per_epoch`` full batches (a phantom, a
    cropped demo) gets ``ceil(pool / min_steps_per_epoch)`` voxels per step, but
    not fewer than ``min_batch_size``; an epoch always visits every voxel once, so
    its cost stays proportional to the data.
    """
    if cfg.min_steps_per_epoch <= 0:
        return cfg.batch_size
    wanted = math.ceil(pool_size / cfg.min_steps_per_epoch)
    return max(1, min(cfg.batch_size, max(cfg.min_batch_size, wanted)))


def _epoch_order(ts: _TrainingSet, cfg: Preset, gen: torch.Generator) -> torch.Tensor:
    """Sample indices of one epoch in random order (CPU generator, then moved to the device)."""
    pool = _epoch_pool(ts, cfg, gen)
    return pool[torch.randperm(len(pool), generator=gen)].to(ts.targets.device)


def _train(
    fld,
    ts: _TrainingSet,
    weights,
    names,
    cfg: Preset,
    mi_points,
    gen,
    label,
    progress,
    half_extent_mm: float,
    sample_gap_mm: float,
    poses: RigidPoses | None = None,
) -> _Trained:
    n_out = len(names)
    k = ts.offsets.shape[1]
    _restrict_fine_levels(fld.encoding, ts, cfg, half_extent_mm)
    opt = _optimizer(fld, cfg)
    if poses is not None:
        # its own rate (degrees / mm per step) under the same schedule, no decay
        opt.add_param_group(
            {"params": list(poses.parameters()), "lr": cfg.pose_lr, "weight_decay": 0.0}
        )
    refined = None if poses is None else poses.refine[:, 0].bool()
    pool_size = len(_epoch_pool(ts, cfg, torch.Generator().manual_seed(0)))
    batch = batch_size_for(pool_size, cfg)
    steps = max(1, math.ceil(pool_size / batch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, steps))
    rule = mi_mod.PlateauRule(cfg.min_epochs, cfg.patience, cfg.window, cfg.rel_tol)
    step_norm = cfg.smoothness_mm / half_extent_mm
    # Encodings without nodes to diffuse (Fourier features) ignore the setting;
    # the config records whether it applied ("diffusion_applied").
    diffuse = getattr(fld.encoding, "diffuse_", None) if cfg.diffusion > 0 else None
    strength = _diffusion_strength(fld.encoding, ts, cfg, sample_gap_mm, half_extent_mm)
    if strength is not None and all(x is None for x in strength):
        diffuse = None  # reach-limited, and no level has nodes the samples leave out
    monitor = cfg.early_stopping and n_out >= 2
    out = _Trained(
        mi_curve={},
        loss_curve=[[] for _ in range(n_out)],
        batch=batch,
        diffused=diffuse is not None,
    )
    snapshot: dict | None = None
    pose_snapshot: dict | None = None
    bar = _progress_bar(cfg.epochs, label) if progress and sys.stderr.isatty() else None
    level = logging.INFO if progress else logging.DEBUG

    for epoch in range(cfg.epochs):
        fld.train()
        refining = poses is not None and epoch >= cfg.pose_start_epoch
        if poses is not None:
            poses.requires_grad_(refining)
        t0 = time.perf_counter()
        order = _epoch_order(ts, cfg, gen)
        err_sum = torch.zeros(n_out, dtype=torch.float64, device=order.device)
        count = torch.zeros(n_out, dtype=torch.float64, device=order.device)
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            w = ts.which[idx]
            cut = 0
            if refining:
                idx, w, cut = _pose_subset_first(idx, w, refined, cfg.pose_sample_fraction, gen)
            pts = (ts.centres[idx][:, None, :] + ts.offsets[w]).reshape(-1, 3)
            which = w.repeat_interleave(k)
            parts = _posed(poses, pts, which, cut * k)
            with _autocast(cfg.precision, pts.device):
                pred = torch.cat([fld(p, c) for p, c in parts]).view(-1, k).float().mean(dim=1)
                err = (pred - ts.targets[idx]) ** 2
                n_c = torch.bincount(w, minlength=n_out)
                loss = (err * (weights / n_c.clamp(min=1))[w]).sum()
                if cfg.smoothness > 0:
                    smooth = _smoothness(fld, ts.centres[idx], step_norm, gen)
                    loss = loss + cfg.smoothness * smooth
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            # sched.last_epoch counts the optimiser steps taken so far
            if diffuse is not None and sched.last_epoch % cfg.diffusion_every == 0:
                diffuse(cfg.diffusion * sched.get_last_lr()[0] / cfg.lr, strength)
            err_sum += torch.bincount(w, weights=err.detach().double(), minlength=n_out)
            count += n_c
        out.train_s += time.perf_counter() - t0
        out.samples += len(order)
        for c in range(n_out):
            out.loss_curve[c].append(float(err_sum[c] / count[c]) if count[c] else float("nan"))

        values = _predict([fld], mi_points, cfg.infer_chunk, cfg.precision)
        out.history.append(values)
        if n_out >= 2:
            for key, value in mi_mod.pairwise_mi(values, names, cfg.mi_bins).items():
                out.mi_curve.setdefault(key, []).append(value)
        out.epochs_run = epoch + 1
        status = mi_mod.plateau_status(out.mi_curve, rule) if monitor else None
        if status is not None and status.best == epoch:
            snapshot = {key: v.detach().clone() for key, v in fld.state_dict().items()}
            if poses is not None:
                pose_snapshot = {key: v.detach().clone() for key, v in poses.state_dict().items()}
        _report(bar, level, label, epoch, cfg.epochs, out, status)
        if status is not None and status.stop:
            out.selected, out.stop_reason = status.best, "mi-plateau"
            fld.load_state_dict(snapshot)
            if poses is not None:
                poses.load_state_dict(pose_snapshot)
            break
    else:
        out.selected, out.stop_reason = cfg.epochs - 1, "max-epochs"
    if bar is not None:
        bar.close()
    return out


def _pose_subset_first(
    idx: torch.Tensor, w: torch.Tensor, refined: torch.Tensor, fraction: float, gen
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Batch ``idx`` and its outputs ``w`` with a random ``fraction`` of refined targets first.

    Returns the reordered ``(B,)`` indices and outputs and the number of leading
    targets. Only those carry the pose gradient (``_posed``): a gradient with
    respect to the coordinates costs several times a plain step through every
    level, and six parameters per input need far fewer samples than the field does.
    """
    draw = torch.rand(len(idx), generator=gen).to(idx.device) < fraction
    sel = refined[w] & draw
    order = torch.cat([torch.nonzero(sel).squeeze(1), torch.nonzero(~sel).squeeze(1)])
    return idx[order], w[order], int(sel.sum())


def _posed(
    poses: RigidPoses | None, pts: torch.Tensor, which: torch.Tensor, cut: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(points, which)`` chunks for the field: the first ``cut`` points posed with gradient.

    ``pts`` ``(M, 3)`` normalised, ``which`` ``(M,)``. The rest are posed as data,
    so the field builds no coordinate gradient for them. Without poses, one chunk.
    """
    if poses is None:
        return [(pts, which)]
    with torch.no_grad():
        rest = (poses(pts[cut:], which[cut:]), which[cut:])
    if cut == 0:
        return [rest]
    return [(poses(pts[:cut], which[:cut]), which[:cut]), rest]


def _diffusion_strength(
    encoding, ts: _TrainingSet, cfg: Preset, sample_gap_mm: float, half_extent_mm: float
) -> list[torch.Tensor | None] | None:
    """Node strengths for reach-limited diffusion (``Preset.diffusion_reach``), or None.

    ``sample_gap_mm``: the widest stretch between training points along a slice
    axis (``sample_gap``). Only levels with nodes closer than half of it are
    counted; the others are not diffused: each of their nodes inside the inputs'
    fields of view lies within one node spacing of a sample. Contiguous box-profile
    slices leave no such level, so nothing is counted or diffused.
    """
    if cfg.diffusion <= 0 or cfg.diffusion_reach <= 0 or not hasattr(encoding, "reach"):
        return None
    levels = [
        k
        for k, res in enumerate(encoding.resolutions)
        # a per-axis level counts by its closest nodes (largest R)
        if grid.node_spacing(max(res), half_extent_mm) < sample_gap_mm / 2
    ]
    if not levels:
        return [None] * len(encoding.resolutions)
    return grid.reach_strength(_reach(encoding, ts, levels), cfg.diffusion_reach)


def _reach(
    encoding, ts: _TrainingSet, levels: list[int], foreground_only: bool = False
) -> list[torch.Tensor | None]:
    """``encoding.reach`` of every training point (each profile point 1/K) on ``levels``.

    ``foreground_only``: count only the LR voxels inside the inputs' masks.
    """
    # about 2^20 points per pass: ~200 MB of corner indices and weights; the
    # foreground is picked per pass, not copied (31 M voxels: 0.6 GB)
    n_points = ts.offsets.shape[1]
    chunk = max(1, (1 << 20) // n_points)
    reach = [None] * len(encoding.resolutions)
    for s in range(0, len(ts.centres), chunk):
        centres, which = ts.centres[s : s + chunk], ts.which[s : s + chunk]
        if foreground_only:
            keep = ts.foreground[s : s + chunk]
            centres, which = centres[keep], which[keep]
        pts = (centres[:, None, :] + ts.offsets[which]).reshape(-1, 3)
        part = encoding.reach(pts, torch.full((len(pts),), 1 / n_points, device=pts.device), levels)
        reach = [b if a is None else a.add_(b) for a, b in zip(reach, part, strict=True)]
    return reach


def _fine_levels(encoding, cfg: Preset, half_extent_mm: float) -> list[int]:
    """Indices of the grid levels stored only near the foreground (``finest_margin_mm``).

    The finest level, and every level whose node spacing (its widest axis) is at most
    ``Preset.margin_up_to_mm``; none when ``finest_margin_mm`` is None.
    """
    if cfg.finest_margin_mm is None or not hasattr(encoding, "restrict_"):
        return []
    last = len(encoding.resolutions) - 1
    return [
        k
        for k, res in enumerate(encoding.resolutions)
        if k == last or grid.node_spacing(min(res), half_extent_mm) <= cfg.margin_up_to_mm
    ]


def _restrict_fine_levels(encoding, ts: _TrainingSet, cfg: Preset, half_extent_mm: float) -> None:
    """Store the fine grid levels (``_fine_levels``) only near the foreground.

    A level's active nodes: those the foreground LR voxels' profile points touch,
    dilated by ``Preset.finest_margin_mm`` (in whole node spacings per axis, a cube).
    """
    levels = _fine_levels(encoding, cfg, half_extent_mm)
    if not levels:
        return
    counted = _reach(encoding, ts, levels, foreground_only=True)
    for k in levels:
        res = encoding.resolutions[k]
        if counted[k] is None or not bool(counted[k].any()):
            continue  # no foreground voxel: the level stays dense
        # margin in whole node spacings per axis; counted is (Rz, Ry, Rx)
        nodes = [
            math.ceil(cfg.finest_margin_mm / grid.node_spacing(r, half_extent_mm) - 1e-6)
            for r in res[::-1]
        ]
        # a cube dilation is three 1-D ones: same nodes, 0.6 s instead of 3.3 s on a 225^3 level
        grown = (counted[k] > 0)[None, None].float()
        counted[k] = None  # the level's count is not needed past here
        for axis, n in enumerate(nodes):
            if n > 0:
                kernel = [1, 1, 1]
                kernel[axis] = 2 * n + 1
                pad = [0, 0, 0]
                pad[axis] = n
                grown = F.max_pool3d(grown, kernel, stride=1, padding=pad)
        n = encoding.restrict_(k, grown[0, 0].bool())
        spacing = grid.node_spacing(min(res), half_extent_mm)
        LOG.info(
            "grid level %d (%.3g mm): %d of %d nodes kept near the foreground",
            k,
            spacing,
            n,
            math.prod(res),
        )


def _smoothness(fld, centres: torch.Tensor, step: float, gen: torch.Generator) -> torch.Tensor:
    """Mean squared change of all outputs over a ``step`` (normalised units) in a random direction.

    Uses the first quarter of ``centres`` (a batch is already in random order).
    """
    x = centres[: max(1, len(centres) // 4)]
    d = torch.randn(x.shape, generator=gen).to(x.device)
    d = d * (step / d.norm(dim=1, keepdim=True).clamp(min=1e-12))
    both = fld(torch.cat([x, x + d]))
    return ((both[: len(x)] - both[len(x) :]) ** 2).mean()


def _progress_bar(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"INR {label}", unit="epoch", leave=False)


def _report(bar, level, label, epoch, total, out: _Trained, status) -> None:
    loss = sum(curve[-1] for curve in out.loss_curve)
    mi_text = " ".join(f"{key}={curve[-1]:.4f}" for key, curve in out.mi_curve.items())
    if bar is not None:
        bar.set_postfix_str(f"loss={loss:.5f} MI {mi_text}".rstrip(" MI"))
        bar.update(1)
        return
    flat = "" if status is None or not status.flat else " (MI flat)"
    LOG.log(
        level,
        "INR %s: epoch %d/%d loss %.5f%s%s",
        label,
        epoch + 1,
        total,
        loss,
        f" MI {mi_text}" if mi_text else "",
        flat,
    )


@torch.no_grad()
def _predict(
    fields: Sequence[nn.Module], points: torch.Tensor, chunk: int, precision: str = "float32"
) -> np.ndarray:
    """All outputs of ``fields`` (concatenated) at ``points`` ``(n, 3)``: float32 ``(n, N)``."""
    parts = []
    for fld in fields:
        fld.eval()
        with _autocast(precision, points.device):
            chunks = [fld(points[s : s + chunk]).float() for s in range(0, len(points), chunk)]
        parts.append(torch.cat(chunks))
    return torch.cat(parts, dim=1).cpu().numpy()


def _predict_grid(
    fields, region, out_shape, out_affine, normaliser, chunk, dev, precision: str = "float32"
) -> np.ndarray:
    """Predictions ``(len(region), N)`` at the flat output indices ``region``, chunk by chunk."""
    pred = np.empty((len(region), sum(f.n_outputs for f in fields)), dtype=np.float32)
    for s in range(0, len(region), chunk):
        pts = _grid_points(region[s : s + chunk], out_shape, out_affine, normaliser, dev)
        pred[s : s + chunk] = _predict(fields, pts, chunk, precision)
    return pred
