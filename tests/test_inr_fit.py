"""End-to-end fits of the INR engine on a small two-contrast phantom.

The phantom: a smooth random tissue map inside a ball on a 32^3 1 mm grid; two
"contrasts" are different functions of it. Contrast A is acquired with 4 mm
slices along voxel axis 2, B with 4 mm slices along axis 0 (box slice profile),
so each LR image has the in-plane detail the other one lacks.
"""

import json
import platform
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from bids_mcsr.inr.fit import Contrast, fit_contrasts
from bids_mcsr.inr.mi import pairwise_mi
from bids_mcsr.resample import acquire, resample_to_grid

N = 32
TINY = {
    "encoding": "fourier",
    "encoding_params": {"n_frequencies": 64, "sigma": 1.0},
    "trunk_width": 64,
    "trunk_layers": 2,
    "head_width": 32,
    "batch_size": 512,
    "epochs": 2,
    "mi_samples": 4000,
    "profile_samples": 4,
    "min_steps_per_epoch": 0,  # every LR voxel once per epoch (the tests count them)
    "smoothness": 0.0,
}


def lr_affine(axis, factor=4):
    aff = np.eye(4)
    aff[axis, axis] = factor
    aff[axis, 3] = (factor - 1) / 2  # LR voxel k covers HR voxels 4k .. 4k+3
    return aff


@pytest.fixture(scope="module")
def phantom():
    rng = np.random.default_rng(0)
    t = ndimage.gaussian_filter(rng.standard_normal((N, N, N)), 3.0)
    t = np.tanh(1.5 * t / t.std())
    g = np.indices((N, N, N)) - (N - 1) / 2
    ball = (g**2).sum(0) <= (0.42 * N) ** 2
    hr = {
        "A": np.where(ball, 1.0 + 0.5 * t, 0.0).astype(np.float32),
        "B": np.where(ball, 120 - 60 * t + 30 * t**2, 0.0).astype(np.float32),
        "C": np.where(ball, 50 + 20 * t**2, 0.0).astype(np.float32),
    }
    lr = {}
    for name, axis in (("A", 2), ("B", 0), ("C", 1)):
        shape = [N, N, N]
        shape[axis] //= 4
        aff = lr_affine(axis)
        lr[name] = (acquire(hr[name], np.eye(4), shape, aff, profile="box"), aff)
    return hr, lr, ball


def contrasts(phantom, names=("A", "B"), masks=False):
    _, lr, _ = phantom
    return [Contrast(n, lr[n][0], lr[n][1], mask=(lr[n][0] > 0) if masks else None) for n in names]


def fit(phantom, names=("A", "B"), shape=(N, N, N), affine=None, **kwargs):
    overrides = {**TINY, **kwargs.pop("overrides", {})}
    kwargs.setdefault("nthreads", 1)
    kwargs.setdefault("progress", False)
    return fit_contrasts(
        contrasts(phantom, names, kwargs.pop("masks", False)),
        shape,
        np.eye(4) if affine is None else affine,
        preset="fast",
        overrides=overrides,
        **kwargs,
    )


def psnr(x, ref, mask):
    span = ref[mask].max() - ref[mask].min()
    return 10 * np.log10(span**2 / np.mean((x[mask] - ref[mask]) ** 2))


@pytest.mark.slow
def test_split_head_beats_cubic_spline_and_loss_decreases(phantom):
    hr, lr, ball = phantom
    r = fit(
        phantom,
        overrides={"epochs": 25, "trunk_width": 128, "head_width": 64, "early_stopping": False},
    )
    for name in ("A", "B"):
        spline = resample_to_grid(*lr[name], (N, N, N), np.eye(4), order=3)
        gain = psnr(r.volumes[name], hr[name], ball) - psnr(spline, hr[name], ball)
        assert gain > 1.0, f"{name}: INR only {gain:.2f} dB better than cubic spline"
        loss = r.loss_curve[name]
        assert len(loss) == 25 and loss[-1] < 0.2 * loss[0]
        assert all(b < a * 1.2 for a, b in zip(loss, loss[1:], strict=False))
    assert r.stop_reason == "max-epochs" and r.selected_epoch == 25
    assert r.samples_per_s > 0 and r.wall_time_s > 0
    assert r.device == "cpu" and r.peak_gpu_mb is None


def test_peak_gpu_memory_is_read_anew_for_every_fit(monkeypatch):
    # one process fits participant after participant: each fit must report its own
    # peak (the allocator's counter, reset at the start of every fit), not a cached one
    from bids_mcsr.inr import fit as fit_mod

    cuda = torch.device("cuda")
    for reserved in (3 * 2**20, 512 * 2**20):
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda dev, r=reserved: r)
        assert fit_mod._peak_gpu_mb(cuda) == reserved / 2**20
    assert fit_mod._peak_gpu_mb(torch.device("cpu")) is None


def test_outputs_follow_the_output_grid(phantom):
    full = fit(phantom, overrides={"early_stopping": False})
    assert set(full.volumes) == {"A", "B"}
    for v in full.volumes.values():
        assert v.shape == (N, N, N) and v.dtype == np.float32 and np.all(np.isfinite(v))
    # Intensities come back in each input's scale.
    assert 0.4 < full.volumes["A"][full.volumes["A"] > 0.2].mean() < 2
    assert 40 < full.volumes["B"][full.volumes["B"] > 20].mean() < 200
    # A cropped grid and an x-flipped grid inside the same FOV sample the same field.
    crop_aff = np.eye(4)
    crop_aff[:3, 3] = (5, 6, 7)
    crop = fit(phantom, shape=(10, 12, 14), affine=crop_aff, overrides={"early_stopping": False})
    flip_aff = np.diag([-1.0, 1, 1, 1])
    flip_aff[0, 3] = N - 1
    flip = fit(phantom, affine=flip_aff, overrides={"early_stopping": False})
    for name in ("A", "B"):
        tol = 1e-4 * np.ptp(full.volumes[name])
        np.testing.assert_allclose(
            crop.volumes[name], full.volumes[name][5:15, 6:18, 7:21], atol=tol
        )
        np.testing.assert_allclose(flip.volumes[name], full.volumes[name][::-1], atol=tol)
    cfg = json.loads(json.dumps(full.config))
    assert cfg["architecture"] == "split-head" and cfg["epochs"] == 2
    assert [c["slice_axis"] for c in cfg["contrasts"]] == [2, 0]
    assert full.device == "cpu" and full.seed == 0 and full.epochs_run == 2


def test_seeded_cpu_runs_are_identical(phantom):
    a, b = fit(phantom, seed=3), fit(phantom, seed=3)
    for name in ("A", "B"):
        assert np.array_equal(a.volumes[name], b.volumes[name])
    assert a.mi_curve == b.mi_curve and a.loss_curve == b.loss_curve
    c = fit(phantom, seed=4)
    assert not np.array_equal(a.volumes["A"], c.volumes["A"])


def test_plateau_stop_writes_the_selected_epoch(phantom):
    # A permissive rule (window 1, 90 % tolerance) reaches a plateau within a few epochs.
    rule = {"epochs": 12, "min_epochs": 3, "patience": 2, "window": 1, "rel_tol": 0.9}
    # clip_to_floor off: the written volumes are then the monitored predictions, rescaled
    r = fit(phantom, masks=True, overrides={**rule, "mi_samples": 100_000, "clip_to_floor": False})
    assert r.stop_reason == "mi-plateau" and 3 <= r.epochs_run < 12
    assert 1 <= r.selected_epoch <= r.epochs_run
    assert len(r.mi_curve["A|B"]) == r.epochs_run
    # mi_samples exceeds the foreground, so the MI curve used every foreground voxel:
    # the written volumes must reproduce the selected epoch's MI exactly.
    _, lr, _ = phantom
    fg = np.ones((N, N, N), bool)
    for name in ("A", "B"):
        data, aff = lr[name]
        ijk = np.rint((np.indices((N, N, N)).reshape(3, -1).T - aff[:3, 3]) / np.diag(aff)[:3])
        fg &= (data > 0)[tuple(ijk.astype(int).T)].reshape(N, N, N)
    assert r.config["foreground_voxels"] == fg.sum()
    values = np.stack([r.volumes["A"][fg], r.volumes["B"][fg]], axis=1)
    mi = pairwise_mi(values, ["A", "B"])["A|B"]
    assert mi == pytest.approx(r.mi_curve["A|B"][r.selected_epoch - 1], abs=1e-5)


def test_ablations_and_three_contrasts(phantom):
    for arch in ("vanilla", "single"):
        r = fit(phantom, architecture=arch)
        assert r.config["architecture"] == arch and r.stop_reason == "max-epochs"
        assert len(r.mi_curve["A|B"]) == 2 and len(r.loss_curve["B"]) == 2
        assert all(np.all(np.isfinite(v)) for v in r.volumes.values())
    three = fit(phantom, names=("A", "B", "C"))
    assert sorted(three.mi_curve) == ["A|B", "A|C", "B|C"]
    assert all(len(c) == three.epochs_run for c in three.mi_curve.values())
    assert set(three.volumes) == {"A", "B", "C"}


def test_foreground_sampling_and_foreground_inference(phantom, caplog):
    caplog.set_level("INFO", logger="bids_mcsr.inr")
    r = fit(
        phantom,
        masks=True,
        progress=True,  # stderr is not a TTY under pytest: one log line per epoch
        overrides={"foreground_fraction": 0.9, "inference_region": "foreground"},
    )
    inferred = r.volumes["A"] != 0
    assert 0 < inferred.sum() == r.config["inferred_voxels"] == r.config["foreground_voxels"]
    _, lr, _ = phantom
    n_fg = sum(int((lr[n][0] > 0).sum()) for n in ("A", "B"))
    assert r.config["samples_per_epoch"] == n_fg + round(n_fg * 0.1 / 0.9)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "bids_mcsr.inr"]
    assert len(lines) == 2 and "epoch 2/2" in lines[1] and "MI A|B=" in lines[1]


def test_far_background_is_measured_in_mm_through_the_voxel_sizes():
    from bids_mcsr.inr.fit import _far_background

    mask = np.zeros((20, 3, 7), bool)
    mask[0, 1, 0] = True
    aff = np.diag([1.0, 1.0, 4.0, 1.0])  # 4 mm slices along z
    far = _far_background(Contrast("A", np.zeros(mask.shape), aff, mask=mask), 8.0)
    assert not far[8, 1, 0] and far[9, 1, 0]  # 8 mm along x: near; 9 mm: far
    assert not far[0, 1, 2] and far[0, 1, 3]  # two slices (8 mm): near; three (12 mm): far
    assert not _far_background(Contrast("A", np.zeros(mask.shape), aff), 8.0).any()  # no mask
    assert not _far_background(Contrast("A", np.zeros(mask.shape), aff, mask=mask), None).any()


def test_far_background_voxels_are_redrawn_each_epoch(phantom):
    from bids_mcsr.inr.fit import _epoch_pool, _TrainingSet
    from bids_mcsr.inr.presets import resolve

    n = 1000
    far = torch.zeros(n, dtype=torch.bool)
    far[600:] = True
    ts = _TrainingSet(
        centres=torch.zeros(n, 3),
        targets=torch.zeros(n),
        which=torch.zeros(n, dtype=torch.int64),
        foreground=~far,
        offsets=torch.zeros(1, 1, 3),
        far=far,
    )
    cfg = resolve("fast", {"far_background_mm": 8.0, "far_background_fraction": 0.25})
    gen = torch.Generator().manual_seed(0)
    first, second = (set(_epoch_pool(ts, cfg, gen).tolist()) for _ in range(2))
    for pool in (first, second):
        assert len(pool) == 600 + 100 and set(range(600)) <= pool  # all near, 1/4 of far
    assert first != second  # a fresh quarter of the far background every epoch
    # the whole app: samples per epoch = near voxels + a quarter of the far ones
    r = fit(
        phantom, masks=True, overrides={"far_background_mm": 2.0, "far_background_fraction": 0.25}
    )
    _, lr, _ = phantom
    n_near = n_far = 0
    for name in ("A", "B"):
        data, aff = lr[name]
        dist = ndimage.distance_transform_edt(data <= 0, sampling=np.abs(np.diag(aff)[:3]))
        n_far += int((dist > 2.0).sum())
        n_near += int((dist <= 2.0).sum())
    assert n_far > 0 and r.config["samples_per_epoch"] == n_near + round(n_far * 0.25)
    with pytest.raises(ValueError, match="far_background_fraction"):
        resolve("fast", {"far_background_fraction": 0.0})
    # foreground_fraction takes precedence: all foreground, background to make up 10 %
    both = replace(cfg, foreground_fraction=0.9)
    assert len(_epoch_pool(ts, both, gen)) == 600 + round(600 * 0.1 / 0.9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"names": ("A",)}, "at least 2 contrasts"),
        ({"architecture": "deep"}, "unknown architecture"),
        ({"overrides": {"epoch": 1}}, "unknown preset override"),
        ({"device": "tpu"}, "unknown device"),
        ({"out_mask": np.zeros((N, N, N), bool)}, "out_mask"),
        ({"affine": np.full((4, 4), np.nan)}, "finite 4x4"),
    ],
)
def test_bad_arguments_raise_one_clear_error(phantom, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(phantom, **kwargs)


def test_bad_contrasts_raise():
    data = np.zeros((4, 4, 4))
    good = Contrast("A", data + np.arange(4), np.eye(4))
    with pytest.raises(ValueError, match="unique"):
        fit_contrasts([good, good], (4, 4, 4), np.eye(4))
    with pytest.raises(ValueError, match="mask"):
        fit_contrasts(
            [good, Contrast("B", data + 1, np.eye(4), mask=np.ones((2, 2, 2), bool))],
            (4, 4, 4),
            np.eye(4),
        )
    with pytest.raises(ValueError, match="constant"):
        fit_contrasts(
            [good, Contrast("B", data + 1, np.eye(4))],
            (4, 4, 4),
            np.eye(4),
            overrides={"epochs": 1},
        )
    with pytest.raises(ValueError, match="NaN"):
        fit_contrasts([good, Contrast("B", data * np.nan, np.eye(4))], (4, 4, 4), np.eye(4))


def test_slice_thickness_scales_the_profile_points_and_offsets():
    from bids_mcsr.geometry import CoordinateNormaliser
    from bids_mcsr.inr.fit import _training_set, profile_points, slice_thickness
    from bids_mcsr.inr.presets import resolve

    aff = lr_affine(2)  # 1 x 1 x 4 mm
    base = Contrast("A", np.ones((8, 8, 2), np.float32), aff)
    assert slice_thickness(base) == 4.0 and profile_points(base, 4) == 4
    points = {t: profile_points(replace(base, slice_thickness=t), 4) for t in (1.0, 0.5, 2.0, 6.0)}
    assert points == {1.0: 1, 0.5: 1, 2.0: 2, 6.0: 6}
    norm = CoordinateNormaliser(centre=np.zeros(3), half_extent=10.0)
    ts = _training_set(
        [replace(base, slice_thickness=2.0), replace(base, name="B", slice_thickness=1.0)],
        [aff, aff],
        [(0.0, 1.0), (0.0, 1.0)],
        resolve("fast"),
        norm,
        torch.device("cpu"),
    )
    # Two points at -0.5 and +0.5 mm along z (normalised by 10 mm) for the 2 mm
    # slice; the 1 mm slice is a point sample, so all its offsets are zero.
    expected = np.array([[0, 0, -0.05], [0, 0, 0.05]], np.float32)
    np.testing.assert_allclose(ts.offsets[0].numpy(), expected, atol=1e-7)
    assert not ts.offsets[1].any()


def test_slice_thickness_is_validated_and_recorded(phantom):
    a, b = contrasts(phantom)
    with pytest.raises(ValueError, match="contrast A: slice_thickness"):
        fit_contrasts([replace(a, slice_thickness=-1.0), b], (N, N, N), np.eye(4), progress=False)
    r = fit(phantom, overrides={"epochs": 1})
    assert [c["slice_thickness_mm"] for c in r.config["contrasts"]] == [4.0, 4.0]
    assert [c["profile_points"] for c in r.config["contrasts"]] == [4, 4]


def test_small_volumes_get_smaller_batches(phantom):
    from bids_mcsr.inr.fit import batch_size_for
    from bids_mcsr.inr.presets import resolve

    cfg = resolve("fast", {"batch_size": 1000, "min_steps_per_epoch": 50, "min_batch_size": 8})
    # 100k voxels: 100 full batches already; 10k: 200 per step; 100: the floor
    assert [batch_size_for(n, cfg) for n in (100_000, 10_000, 100)] == [1000, 200, 8]
    assert batch_size_for(100, resolve("fast", {"min_steps_per_epoch": 0})) == 8192
    n_lr = 2 * N * N * N // 4
    r = fit(phantom, overrides={"epochs": 1, "min_steps_per_epoch": 40, "min_batch_size": 64})
    assert r.config["batch_size_used"] == [-(-n_lr // 40)] == [410]
    assert r.config["samples_per_epoch"] == n_lr  # every voxel once, whatever the batch


_MALLOC_PROBE = """
import ctypes, sys
from bids_mcsr.inr import fit

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert fit.keep_large_allocations()
before = libc.mallinfo2().hblkhd
block = libc.malloc(80 << 20)  # a paper-size finest grid level's gradient
print(libc.mallinfo2().hblkhd - before)
libc.free(block)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt() tuning is glibc's")
def test_keep_large_allocations_serves_big_blocks_from_the_heap():
    def mmapped(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _MALLOC_PROBE, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout)

    # glibc's default: an 80 MB block is a fresh mmap (page-faulted on every step)
    assert mmapped("default") >= 80 << 20
    assert mmapped("keep") == 0


def test_cpu_fits_tune_the_allocator(phantom, monkeypatch):
    from bids_mcsr.inr import fit as fit_mod

    calls = []
    monkeypatch.setattr(fit_mod, "keep_large_allocations", lambda: calls.append(True))
    fit(phantom, overrides={"epochs": 1})
    assert calls == [True]


def test_reach_limited_diffusion_targets_only_nodes_between_point_sampled_slices():
    from bids_mcsr import geometry
    from bids_mcsr.inr import fit
    from bids_mcsr.inr.encoding import build_encoding
    from bids_mcsr.inr.presets import resolve

    aff = np.diag([1.0, 1.0, 4.0, 1.0])  # point-sampled slices at z = 0, 4, 8, 12 mm
    data = np.ones((16, 16, 4), np.float32)
    contrast = Contrast("A", data, aff, slice_thickness=1.0)
    cfg = resolve(
        "fast",
        {
            "diffusion": 1.0,
            "diffusion_reach": 0.5,
            "encoding_params": {"n_levels": 2, "coarsest_mm": 4.0, "finest_mm": 1.0},
        },
    )
    norm = geometry.CoordinateNormaliser.from_inputs([(data.shape, aff)])
    ts = fit._training_set([contrast], [aff], [(0.0, 1.0)], cfg, norm, torch.device("cpu"))
    enc = build_encoding(cfg.encoding, {**cfg.encoding_params, "half_extent_mm": norm.half_extent})
    assert enc.resolutions == [(5, 5, 5), (17, 17, 17)]  # 4 mm and 1 mm nodes over -2 .. 14 mm
    gap = fit.sample_gap(contrast, cfg.profile_samples, ts.offsets.shape[1])
    assert gap == 4.0  # point samples: the whole spacing
    coarse, fine = fit._diffusion_strength(enc, ts, cfg, gap, norm.half_extent)
    # 4 mm nodes are never farther than 2 mm from a slice: not counted, not diffused
    assert coarse is None
    z_nodes = norm.centre[2] + norm.half_extent * np.linspace(-1, 1, 17)
    on_slice = np.isin(np.round(z_nodes), [0, 4, 8, 12])
    column = fine[:, 8, 8, 0].numpy()  # [z, y, x]: the centre column along z
    assert column.tolist() == np.where(on_slice, 0.0, 1.0).tolist()


def test_sample_gap_is_the_stretch_no_training_point_covers():
    from bids_mcsr.inr.fit import sample_gap

    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    data = np.zeros((4, 4, 3), np.float32)
    # point samples leave the whole 4 mm spacing; a contiguous 4 mm box over 4
    # points (offsets -1.5 .. 1.5 mm) leaves 1 mm; a 2 mm box over 4 points 2.5 mm
    assert sample_gap(Contrast("A", data, aff, slice_thickness=1.0), 4, 4) == pytest.approx(4.0)
    assert sample_gap(Contrast("A", data, aff), 4, 4) == pytest.approx(1.0)
    assert sample_gap(Contrast("A", data, aff, slice_thickness=2.0), 4, 4) == pytest.approx(2.5)


def test_contiguous_slices_tell_box_profiles_from_gaps():
    from bids_mcsr.inr.fit import contiguous_slices

    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    data = np.zeros((4, 4, 3), np.float32)
    box, point = Contrast("A", data, aff), Contrast("B", data, aff, slice_thickness=1.0)
    gapped = Contrast("C", data, aff, slice_thickness=3.0)  # 3 mm slices every 4 mm
    iso = Contrast("D", data, np.eye(4))
    assert contiguous_slices([box, iso], 4)
    assert not contiguous_slices([box, point], 4) and not contiguous_slices([gapped], 4)
    # 0.9 mm in-plane: the 1 mm between profile points is contiguous for a 1 mm output only
    fine = Contrast("E", data, np.diag([0.9, 0.9, 4.0, 1.0]))
    assert contiguous_slices([fine], 4, out_voxel_mm=1.0) and not contiguous_slices([fine], 4)


def test_merge_overrides_layers_nested_fields():
    from bids_mcsr.inr.presets import merge_overrides, resolve

    first = {"encoding_params": {"n_levels": 6, "finest_mm": 1.0}, "finest_margin_mm": 3.0}
    merged = merge_overrides(first, {"encoding_params": {"finest_mm": 2.0}, "epochs": 2})
    assert merged == {
        "encoding_params": {"n_levels": 6, "finest_mm": 2.0},
        "finest_margin_mm": 3.0,
        "epochs": 2,
    }
    assert first["encoding_params"]["finest_mm"] == 1.0  # not modified
    with pytest.raises(ValueError, match="contiguous_overrides takes preset fields"):
        resolve("fast", {"contiguous_overrides": {"no_such_field": 1}})
    with pytest.raises(ValueError, match="finest_margin_mm"):
        resolve("fast", {"finest_margin_mm": -1.0})


GRID = {
    "encoding": "dense-grid",
    "encoding_params": {"n_levels": 2, "coarsest_mm": 8.0, "finest_mm": 2.0},
    "epochs": 1,
    "min_steps_per_epoch": 4,
}


def test_contiguous_overrides_apply_to_box_slices_only_and_under_the_callers(phantom):
    extra = {"contiguous_overrides": {"finest_margin_mm": 2.0, "mi_samples": 3000}}
    box = fit(phantom, overrides={**GRID, **extra})  # TINY sets mi_samples 4000
    assert box.config["contiguous_slices"] and box.config["finest_margin_mm"] == 2.0
    assert box.config["mi_samples"] == 4000  # the caller's overrides win
    # point-sampled slices (1 mm thick every 4 mm) leave gaps: not applied
    _, lr, _ = phantom
    points = [Contrast(n, lr[n][0], lr[n][1], slice_thickness=1.0) for n in ("A", "B")]
    gapped = fit_contrasts(
        points,
        (N, N, N),
        np.eye(4),
        preset="fast",
        overrides={**TINY, **GRID, **extra},
        nthreads=1,
        progress=False,
    )
    assert not gapped.config["contiguous_slices"] and gapped.config["finest_margin_mm"] is None


def test_finest_level_kept_near_the_foreground_only(phantom):
    from bids_mcsr.inr.grid import resolution_for_spacing

    dense = fit(phantom, masks=True, overrides=GRID)
    near = fit(phantom, masks=True, overrides={**GRID, "finest_margin_mm": 2.0})
    r = resolution_for_spacing(2.0, near.config["normaliser"]["half_extent_mm"])
    dropped, rest = divmod(dense.config["n_parameters"] - near.config["n_parameters"], 4)
    # the ball fills about a third of the cube; with the slice profiles and the margin
    # the nodes in the corners are dropped, 4 parameters each
    assert rest == 0 and 0.1 * r**3 < dropped < 0.7 * r**3
    _, _, ball = phantom
    a_dense, a_near = dense.volumes["A"], near.volumes["A"]
    # still a fit of the data inside the ball (not zeroed), and close to the dense one
    assert np.isfinite(a_near).all()
    assert np.corrcoef(a_near[ball], a_dense[ball])[0, 1] > 0.95
    # with three levels (8, 4, 2 mm) margin_up_to_mm 4 takes the 4 mm level (9^3 nodes)
    # too: only its 8 corner nodes are beyond one node (the 2 mm margin, rounded up) of
    # a node that the ball's profile points touch
    three = {**GRID, "encoding_params": {"n_levels": 3, "coarsest_mm": 8.0, "finest_mm": 2.0}}
    near3 = fit(phantom, masks=True, overrides={**three, "finest_margin_mm": 2.0})
    both = fit(
        phantom, masks=True, overrides={**three, "finest_margin_mm": 2.0, "margin_up_to_mm": 4.0}
    )
    assert both.config["margin_up_to_mm"] == 4.0
    assert resolution_for_spacing(4.0, near.config["normaliser"]["half_extent_mm"]) == 9
    assert near3.config["n_parameters"] - both.config["n_parameters"] == 8 * 4
    assert np.corrcoef(both.volumes["A"][ball], a_dense[ball])[0, 1] > 0.95


def test_fine_levels_are_the_finest_and_those_up_to_margin_up_to_mm():
    from bids_mcsr.inr.fit import _fine_levels
    from bids_mcsr.inr.grid import DenseGridEncoding, node_spacing
    from bids_mcsr.inr.presets import resolve

    # the fast preset's levels for contiguous slices over a 224 mm box: 16 -> 1 mm
    enc = DenseGridEncoding(
        n_levels=6, features_per_level=1, coarsest_mm=16.0, finest_mm=1.0, half_extent_mm=112.0
    )
    spacings = [round(node_spacing(r[0], 112.0), 2) for r in enc.resolutions]
    assert spacings == [16.0, 8.96, 5.21, 2.99, 1.72, 1.0]
    fast = resolve("fast")
    assert fast.finest_margin_mm is None  # dense unless the slices are contiguous
    assert _fine_levels(enc, fast, 112.0) == []
    contiguous = resolve("fast", fast.contiguous_overrides)
    assert _fine_levels(enc, contiguous, 112.0) == [4, 5]
    only_finest = resolve("fast", {**fast.contiguous_overrides, "margin_up_to_mm": 0.0})
    assert _fine_levels(enc, only_finest, 112.0) == [5]
    with pytest.raises(ValueError, match="margin_up_to_mm"):
        resolve("fast", {"margin_up_to_mm": -1.0})


def test_nonnegative_input_tells_magnitude_from_signed():
    from bids_mcsr.inr.fit import nonnegative_input

    rng = np.random.default_rng(0)
    data = rng.uniform(1.0, 100.0, (10, 10, 10)).astype(np.float32)
    data[:5] = -0.5  # half the voxels a hair below 0 (under 1 % of the 99th percentile)
    data.flat[-10:] = -50.0  # 1 % far below: a few ringing voxels at an edge
    assert nonnegative_input(Contrast("A", data, np.eye(4)))
    data.flat[-11:] = -50.0
    assert not nonnegative_input(Contrast("A", data, np.eye(4)))
    zscored = rng.standard_normal((10, 10, 10)).astype(np.float32)
    assert not nonnegative_input(Contrast("A", zscored, np.eye(4)))
    assert not nonnegative_input(Contrast("A", -np.abs(zscored), np.eye(4)))


def test_output_floor_is_zero_for_magnitude_else_the_background_fill():
    from bids_mcsr.inr.fit import background_fill, output_floor

    def contrast(data):
        return Contrast("A", data, np.eye(4))

    rng = np.random.default_rng(0)
    head = rng.uniform(1.0, 100.0, (10, 10, 10)).astype(np.float32)
    head[:3] = 0.0  # 30 % zero-filled background
    assert background_fill(contrast(head)) == 0.0 and output_floor(contrast(head)) == 0.0
    noisy = rng.uniform(1.0, 100.0, (10, 10, 10)).astype(np.float32)  # raw magnitude
    assert background_fill(contrast(noisy)) is None and output_floor(contrast(noisy)) == 0.0
    # z-scored and skull-stripped (BraTS): the floor is the fill, below 0
    zscored = (head - head.mean()) / head.std()
    fill = float(zscored[0, 0, 0])
    assert fill < -1.0 and output_floor(contrast(zscored)) == fill
    # below the fill, up to 1 % of the voxels may ring (any number a hair below)
    rings = zscored.copy()
    rings[0, :5] = fill - 1e-4
    rings.flat[-10:] = fill - 0.5
    assert output_floor(contrast(rings)) == fill
    rings.flat[-11:] = fill - 0.5
    assert output_floor(contrast(rings)) is None
    # a value held by under FILL_SHARE (10 %) of the voxels is no background
    sparse = zscored.copy()
    sparse[:2] = rng.uniform(fill, 2.0, (2, 10, 10))
    assert np.count_nonzero(sparse == fill) == 100 and output_floor(contrast(sparse)) == fill
    sparse[2, 0, 0] = 0.5
    assert background_fill(contrast(sparse)) is None and output_floor(contrast(sparse)) is None


def test_outputs_are_clipped_at_the_input_floor(phantom):
    kept = fit(phantom, overrides={"clip_to_floor": False})
    clipped = fit(phantom)  # the fast preset clips
    for name in ("A", "B"):
        raw, out = kept.volumes[name], clipped.volumes[name]
        cfg = [c for c in clipped.config["contrasts"] if c["name"] == name][0]
        assert cfg["output_floor"] == 0.0  # the phantom's zero-filled background
        assert cfg["clipped_voxels"] == np.count_nonzero(raw < 0) and out.min() == 0.0
        np.testing.assert_array_equal(out, np.maximum(raw, 0))  # same fit, only clipped
    assert sum(c["clipped_voxels"] for c in clipped.config["contrasts"]) > 0
    assert all(c["clipped_voxels"] is None for c in kept.config["contrasts"])
    _, lr, _ = phantom
    noise = np.random.default_rng(1).normal(0.0, 0.01, lr["A"][0].shape).astype(np.float32)
    # shifted below 0 (a z-scored, skull-stripped input): floored at its fill, -2
    shifted = lr["A"][0] - 2.0
    # shifted with no constant background (every voxel noisy): a signed image, kept
    signed = shifted + noise
    res = {}
    for label, data, clip in (
        ("fill", shifted, True),
        ("kept", shifted, False),
        ("signed", signed, True),
    ):
        pair = [
            Contrast("A", data, lr["A"][1], mask=lr["A"][0] > 0),
            Contrast("B", *lr["B"], mask=lr["B"][0] > 0),
        ]
        res[label] = fit_contrasts(
            pair,
            (N, N, N),
            np.eye(4),
            preset="fast",
            # predicted inside the foreground only: the rest gets the background fill
            overrides={**TINY, "inference_region": "foreground", "clip_to_floor": clip},
            nthreads=1,
            progress=False,
        )
    filled = res["fill"].config["contrasts"][0]
    raw, out = res["kept"].volumes, res["fill"].volumes
    assert filled["output_floor"] == -2.0 and out["A"].min() >= -2.0
    assert filled["clipped_voxels"] == np.count_nonzero(raw["A"] < -2.0)
    np.testing.assert_array_equal(out["A"], np.maximum(raw["A"], -2.0))  # same fit, floored
    # not predicted: A (fill -2) is -2 there, B (fill 0) is 0
    inferred = res["fill"].config["inferred_voxels"]
    assert inferred < N**3 and np.count_nonzero(out["A"] != -2.0) <= inferred
    assert np.count_nonzero(out["B"] != 0.0) <= inferred
    assert res["signed"].config["contrasts"][0]["output_floor"] is None
    assert res["signed"].config["contrasts"][0]["clipped_voxels"] is None
    assert res["signed"].volumes["A"].min() < -1.0  # keeps its sign
    assert res["signed"].config["contrasts"][1]["clipped_voxels"] is not None


def _axial(pixel: float, thick: float, rotate_deg: float = 0.0) -> np.ndarray:
    """Voxel -> world affine of an axial scan, optionally tilted about x."""
    a = np.diag([pixel, pixel, thick, 1.0])
    t = np.radians(rotate_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    a[:3, :3] = rot @ a[:3, :3]
    return a


def test_in_plane_spacing_per_world_axis():
    from bids_mcsr.inr.fit import in_plane_spacing_per_axis

    sagittal = np.diag([4.0, 0.7, 0.7, 1.0])
    np.testing.assert_allclose(in_plane_spacing_per_axis([_axial(0.5, 4)]), [0.5, 0.5, np.inf])
    np.testing.assert_allclose(
        in_plane_spacing_per_axis([_axial(0.5, 4), sagittal]), [0.5, 0.5, 0.7]
    )
    # an oblique (20 degrees) axial scan still samples x and y in-plane
    np.testing.assert_allclose(
        in_plane_spacing_per_axis([_axial(0.5, 4, 20.0)]), [0.5, 0.5, np.inf]
    )
    # isotropic inputs count on every axis
    np.testing.assert_allclose(in_plane_spacing_per_axis([np.diag([1.0, 1, 1, 1])]), [1, 1, 1])


def test_finest_level_follows_sub_millimetre_pixels_only():
    from bids_mcsr.inr.fit import MAX_REFINED_NODES, _follow_fine_inputs, finest_spacing
    from bids_mcsr.inr.grid import resolution_for_spacing
    from bids_mcsr.inr.presets import resolve

    half = 120.0  # a 240 mm field
    assert finest_spacing(1.33, 1.0, np.array([1.0, 1.0, np.inf]), half) is None
    assert finest_spacing(1.33, 1.0, np.array([0.5, 0.5, np.inf]), half) == [0.665, 0.665, 1.33]
    # 0.5 mm pixels on all three axes would need 361^3 = 47 M nodes: coarsened to fit
    capped = finest_spacing(1.33, 1.0, np.array([0.5, 0.5, 0.5]), half)
    assert 0.665 < capped[0] == capped[1] == capped[2] < 0.8
    assert np.prod([resolution_for_spacing(v, half) for v in capped]) <= MAX_REFINED_NODES
    fast = resolve("fast")
    # 1 mm pixels (the preset's reference): the preset as it is
    assert _follow_fine_inputs(fast, [_axial(1.0, 4), np.diag([4.0, 1, 1, 1])], half, 1.0) is fast
    # 0.5 mm pixels in all-axial scans: finer in x and y only, one more level, near the
    # foreground only
    cfg = _follow_fine_inputs(fast, [_axial(0.5, 4), _axial(0.72, 3)], half, 0.5)
    assert cfg.encoding_params["finest_mm"] == [0.665, 0.665, 1.33]
    assert cfg.encoding_params["n_levels"] == fast.encoding_params["n_levels"] + 1
    assert cfg.finest_margin_mm == 3.0
    # a 1 mm output grid shows no detail finer than 1 mm: nothing to refine
    assert _follow_fine_inputs(fast, [_axial(0.5, 4)], half, 1.0) is fast
    partly = _follow_fine_inputs(fast, [_axial(0.5, 4)], half, 0.75)
    assert partly.encoding_params["finest_mm"] == [0.9975, 0.9975, 1.33]
    # off, or not a grid with a scalar finest spacing: unchanged
    off = replace(fast, finest_reference_mm=None)
    assert _follow_fine_inputs(off, [_axial(0.5, 4)], half, 0.5) is off
    paper = resolve("paper")
    assert _follow_fine_inputs(paper, [_axial(0.5, 4)], half, 0.5) is paper
    with pytest.raises(ValueError, match="finest_reference_mm"):
        resolve("fast", {"finest_reference_mm": 0})


def test_sub_millimetre_pixels_keep_their_in_plane_detail():
    # Fine in-plane stripes (2.4 mm period, amplitude 40) in two axial 0.5 mm-pixel
    # scans: 1.33 mm grid nodes cannot draw them, nodes scaled to the pixels can.
    g = np.indices((64, 64, 8)).astype(np.float32)
    a = (100 + 40 * np.sin(2 * np.pi * 0.5 * g[0] / 2.4) + 5 * g[2]).astype(np.float32)
    b = (200 - 30 * np.sin(2 * np.pi * 0.5 * g[1] / 2.4) + 3 * g[2]).astype(np.float32)
    aff = np.diag([0.5, 0.5, 4.0, 1.0])
    inputs = [Contrast("A", a, aff), Contrast("B", b, aff)]
    out_aff = np.diag([0.5, 0.5, 0.5, 1.0])
    out_aff[2, 3] = -1.75  # output voxel centres over each 4 mm slice
    errors = {}
    for name, extra in (("scaled", {}), ("fixed", {"finest_reference_mm": None})):
        res = fit_contrasts(
            inputs,
            (64, 64, 64),
            out_aff,
            preset="fast",
            overrides={"epochs": 3, "early_stopping": False, **extra},
            nthreads=1,
            progress=False,
        )
        back = acquire(res.volumes["A"], out_aff, a.shape, aff, profile="box")
        errors[name] = float(np.sqrt(np.mean((back - a)[8:-8, 8:-8] ** 2)))
        if name == "scaled":
            assert res.config["encoding_params"]["finest_mm"] == [0.665, 0.665, 1.33]
    # re-acquired on the input grid: RMS error 4 against 25 (the stripes' RMS is 28)
    assert errors["scaled"] < 6.0 < 20.0 < errors["fixed"], errors
