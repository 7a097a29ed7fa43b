"""Benchmark: simulation, cases, BIDS writing, metrics, child-process measurement, tables.

The quick benchmark itself (fits through the CLI) runs only when ../shared/data exists.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_mcsr.benchmark import metrics
from bids_mcsr.benchmark.bench import (
    Settings,
    _add_spline_gains,
    combine_seeds,
    merge,
    method_seeds,
    output_path,
    quick_failures,
    registration_error,
    render,
)
from bids_mcsr.benchmark.cases import (
    Case,
    case_motion,
    crop_or_pad,
    slice_shift_mm,
    user_case,
    view_factors,
)
from bids_mcsr.benchmark.dataset import write_case_dataset
from bids_mcsr.benchmark.runner import app_command, run_child
from bids_mcsr.benchmark.seeds import gate_rows
from bids_mcsr.benchmark.simulate import (
    displacement_error_mm,
    rigid_motion_axis_angle,
    scanner_grid,
    simulate_acquisition,
)
from bids_mcsr.benchmark.table import MAIN_COLUMNS, markdown_table
from bids_mcsr.geometry import voxel_to_world

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def ndimage_smooth(x: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(x, 1.5)


def _affine(origin=(-10.0, 4.0, 2.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, 3] = origin
    return a


def _toy_case(shape=(16, 12, 8), flip_x=False) -> Case:
    rng = np.random.default_rng(0)
    affine = _affine()
    if flip_x:
        affine[0, 0] = -1.0
    t1 = rng.uniform(1, 2, shape).astype(np.float32)
    t2 = rng.uniform(1, 2, shape).astype(np.float32)
    return Case(
        "toy",
        {"T1c": t1, "FLAIR": t2},
        affine,
        ("T1c",),
        np.ones(shape, bool),
        {"T1c": {"suffix": "T1w", "ce": "gadolinium"}, "FLAIR": {"suffix": "FLAIR"}},
    )


# --- simulation -----------------------------------------------------------------------


def test_profile_mode_averages_a_ramp_over_each_slice():
    # A ramp along z: each 4 mm slice averages to the value at its centre, wherever
    # the scanner put the centre (away from the edges, which see the zero outside).
    hr = np.broadcast_to(np.arange(41, dtype=float) * 2.0, (3, 5, 41))
    lr, aff = simulate_acquisition(hr, np.eye(4), (1, 1, 4), "profile")
    assert lr.shape == (3, 5, 11)  # ceil(41 / 4): the FOV is not cropped to whole slices
    np.testing.assert_allclose(aff[2, 2:], [4.0, 0.0])  # centres at 0, 4, .., 40
    np.testing.assert_allclose(lr[0, 0, 2:9], 8.0 * np.arange(2, 9), atol=1e-3)
    np.testing.assert_allclose(lr, np.broadcast_to(lr[:1, :1], lr.shape))
    shifted, aff = simulate_acquisition(hr, np.eye(4), (1, 1, 4), "profile", shift_mm=1.3)
    assert aff[2, 3] == pytest.approx(1.3)
    np.testing.assert_allclose(shifted[0, 0, 2:9], 2.6 + 8.0 * np.arange(2, 9), atol=1e-3)
    assert abs(shifted[0, 0, -1] - (2.6 + 80.0)) > 1.0  # the edge does differ


def test_profile_mode_integrates_the_slice_not_its_centre():
    # A single bright HR plane inside a 4 mm slice, 1.5 mm off its centre: a point
    # sample at the centre misses it, the slice profile sees about a quarter of it.
    hr = np.zeros((4, 4, 16))
    hr[:, :, 5] = 1.0
    box, aff = simulate_acquisition(hr, np.eye(4), (1, 1, 4), "profile", shift_mm=1.0)
    point, _ = simulate_acquisition(hr, np.eye(4), (1, 1, 4), "paper", shift_mm=1.0)
    k = int(np.argmax(box[0, 0]))
    # Centres at 2.5 + 4k (the FOV's centre 7.5, moved 1 mm): [4.5, 8.5] holds the plane.
    assert aff[2, 3] + 4 * k == pytest.approx(6.5)
    assert box[0, 0, k] == pytest.approx(0.25, abs=0.03)
    assert -0.2 < point[0, 0, k] < 0  # only the interpolant's negative lobe, 1.5 mm away


def test_scanner_grid_centres_the_fov_and_shifts_along_the_slices():
    hr_aff = np.array([[0, -1.0, 0, 5], [1.0, 0, 0, -3], [0, 0, 2.0, 7], [0, 0, 0, 1]])
    shape, aff = scanner_grid((10, 13, 9), hr_aff, (1, 4, 1), shift_mm=0.5)
    assert shape == (10, 4, 9)
    # The grid centre is the HR grid centre, moved 0.5 mm along the slice axis (y voxel
    # axis, 1 mm there): HR voxel (4.5, 6, 4) + (0, 0.5, 0).
    centre = voxel_to_world(np.array([[4.5, 1.5, 4.0]]), aff)
    np.testing.assert_allclose(centre, voxel_to_world(np.array([[4.5, 6.5, 4.0]]), hr_aff))
    np.testing.assert_allclose(np.abs(aff[:3, :3]).sum(axis=0), [1, 4, 2])
    with pytest.raises(ValueError, match="factors"):
        scanner_grid((4, 4, 4), np.eye(4), (1, 0, 2))


def test_moved_acquisition_is_the_moved_head_and_matches_the_lattice_path():
    rng = np.random.default_rng(2)
    hr = ndimage_smooth(rng.normal(size=(20, 18, 24)))
    lattice, aff = simulate_acquisition(hr, np.eye(4), (1, 1, 4), "profile", shift_mm=0.7)
    # The general path with a motion of (almost) nothing gives the same samples.
    still = rigid_motion_axis_angle([0, 0, 1], 0.0, [0, 0, 0])
    same, aff2 = simulate_acquisition(hr, np.eye(4), (1, 1, 4), "profile", 0.7, motion=still)
    np.testing.assert_allclose(same[:, :, 1:-1], lattice[:, :, 1:-1], atol=1e-6)
    np.testing.assert_array_equal(aff2, aff)  # the header knows nothing of the motion
    # A head moved 2 mm along +x shows, at voxel i, what was at i - 2.
    moved, _ = simulate_acquisition(
        hr,
        np.eye(4),
        (1, 1, 4),
        "profile",
        0.7,
        motion=rigid_motion_axis_angle([1, 0, 0], 0, [2, 0, 0]),
    )
    np.testing.assert_allclose(moved[4:-2, :, 1:-1], lattice[2:-4, :, 1:-1], atol=1e-6)
    assert np.abs(moved[4:-2] - lattice[4:-2]).max() > 1e-2  # the check can fail


def test_displacement_error_of_known_transforms():
    pts = np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]])
    turn = rigid_motion_axis_angle([0, 0, 1], 90.0, [1.0, 0, 0])
    np.testing.assert_allclose(turn[:3, :3] @ [10, 0, 0] + turn[:3, 3], [1, 10, 0], atol=1e-12)
    mean, worst = displacement_error_mm(None, np.eye(4), pts)
    assert mean == 0.0 and worst == 0.0
    shift = np.eye(4)
    shift[:3, 3] = [0, 0, 3.0]
    assert displacement_error_mm(shift, None, pts) == pytest.approx((3.0, 3.0))
    mean, worst = displacement_error_mm(turn, np.eye(4), pts)
    # (0,0,0) -> (1,0,0); (10,0,0) -> (1,10,0); (0,10,0) -> (-9,0,0)
    assert worst == pytest.approx(np.hypot(9, 10))
    assert mean == pytest.approx((1 + 2 * np.hypot(9, 10)) / 3)


def test_paper_mode_samples_a_cubic_exactly_away_from_edges():
    x = np.arange(40, dtype=float)

    def poly(v):
        return 0.5 + 0.02 * v - 0.001 * v**2 + 0.0002 * v**3

    hr = poly(x)[:, None, None] + 0.01 * np.arange(12)[None, :, None] + np.zeros((1, 1, 6))
    lr, _ = simulate_acquisition(hr, np.eye(4), (4, 1, 1), "paper")
    expect = poly(np.arange(10) * 4 + 1.5)[:, None, None] + 0.01 * np.arange(12)[None, :, None]
    # Cubic B-splines reproduce cubics; only the boundary handling deviates.
    np.testing.assert_allclose(lr[2:-2], np.broadcast_to(expect, lr.shape)[2:-2], atol=1e-5)
    assert np.abs(lr[-1] - expect[-1]).max() > 1e-3  # the check can fail


def test_simulate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        simulate_acquisition(np.zeros((4, 4, 4)), np.eye(4), (1, 1, 2), "gauss")
    with pytest.raises(ValueError, match="factors"):
        simulate_acquisition(np.zeros((4, 4, 2)), np.eye(4), (1, 4))


# --- cases and BIDS writing -----------------------------------------------------------


def test_view_factors_follow_world_axes_for_permuted_affine():
    case = _toy_case()
    # Voxel axis 0 runs along world z, axis 2 along world x.
    case.affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 1]])
    sag = view_factors(case, "sagittal")
    assert sag == {"T1c": (4, 1, 1), "FLAIR": (1, 1, 4)}
    assert view_factors(case, "coronal")["FLAIR"] == (1, 4, 1)


def test_crop_or_pad_keeps_world_positions():
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(10, 8, 6))
    aff = _affine()
    out, out_aff = crop_or_pad(vol, aff, (6, 12, 4), centre=(5, 4, 3))
    assert out.shape == (6, 12, 4)
    # Output voxel (0, 2, 0) is old voxel (2, 0, 1); y is padded by 2 on each side.
    np.testing.assert_allclose(
        voxel_to_world(np.array([[0, 2, 0]]), out_aff), voxel_to_world(np.array([[2, 0, 1]]), aff)
    )
    assert out[0, 2, 0] == vol[2, 0, 1]
    assert np.all(out[:, :2] == 0) and np.all(out[:, -2:] == 0)


def test_reshaped_case_note_names_the_derived_case():
    from bids_mcsr.benchmark.cases import _reshape_case

    vol = np.ones((10, 8, 6), np.float32)
    case = Case("icbm2009c", {"T1w": vol}, _affine(), ("T1w",), vol > 0, {"T1w": {}})
    out = _reshape_case(case, (4, 4, 4), label="papersize")
    assert out.volumes["T1w"].shape == (4, 4, 4)
    assert out.notes[-1].startswith("papersize: icbm2009c cropped/padded to (4, 4, 4)")


def test_write_case_dataset_layout_and_sidecars(tmp_path):
    case = _toy_case(flip_x=True)
    paths = write_case_dataset(case, tmp_path, "profile", "coronal")
    t1 = tmp_path / "sub-toy" / "anat" / "sub-toy_ce-gadolinium_T1w.nii.gz"
    assert paths["T1c"] == t1
    img = nib.load(str(t1))
    assert img.shape == (16, 12, 2)
    shift = slice_shift_mm(case, "T1c", 4)
    expect = scanner_grid(case.shape, case.affine, (1, 1, 4), shift)[1]
    np.testing.assert_allclose(img.affine, expect, atol=1e-5)
    flair = nib.load(str(paths["FLAIR"]))
    assert flair.shape == (16, 3, 8)
    side = json.loads(t1.with_name("sub-toy_ce-gadolinium_T1w.json").read_text())
    assert side["SliceThickness"] == 4.0  # profile mode integrates the whole slice
    assert side["Simulation"] == {
        "Mode": "profile",
        "Source": "toy/T1c",
        "Factors": [1, 1, 4],
        "Plane": "axial",
        "ShiftMm": shift,
        "Motion": None,
        "Scored": True,
    }
    assert -2.0 <= shift < 2.0 and shift == slice_shift_mm(case, "T1c", 4)
    # With motion only the partner (not the app's reference, the first) moves.
    moved = write_case_dataset(case, tmp_path / "moved", "profile", "coronal", motion="rigid")
    sides = [
        json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())["Simulation"]
        for p in moved.values()
    ]
    assert sides[0]["Motion"] is None
    np.testing.assert_allclose(sides[1]["Motion"], case_motion(case, "rigid"))
    desc = json.loads((tmp_path / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"]
    assert (tmp_path / "participants.tsv").read_text().splitlines() == ["participant_id", "sub-toy"]


def test_written_dataset_is_validator_clean(tmp_path):
    validator = Path(sys.executable).with_name("bids-validator-deno")
    if not validator.is_file():
        pytest.skip("bids-validator-deno is not installed in this environment")
    write_case_dataset(_toy_case(), tmp_path, "paper", "sagittal")
    proc = subprocess.run(
        [str(validator), "--json", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    issues = json.loads(proc.stdout)["issues"]["issues"]
    assert [i["code"] for i in issues if i["severity"] == "error"] == []


def test_output_path_matches_app_naming(tmp_path):
    case = _toy_case()
    assert output_path(tmp_path, case, "T1c") == (
        tmp_path / "sub-toy" / "anat" / "sub-toy_ce-gadolinium_desc-superres_T1w.nii.gz"
    )


def test_user_case_labels_and_grid_check(tmp_path):
    aff = _affine()
    for name, shape in [("a_T1w.nii.gz", (9, 8, 10)), ("b_T2w.nii.gz", (9, 8, 10))]:
        nib.save(nib.Nifti1Image(np.ones(shape, np.float32), aff), str(tmp_path / name))
    nib.save(nib.Nifti1Image(np.ones((9, 8, 11), np.float32), aff), str(tmp_path / "c.nii.gz"))
    case = user_case([str(tmp_path / "a_T1w.nii.gz"), f"PD={tmp_path / 'b_T2w.nii.gz'}"])
    assert case.contrasts == ["T1w", "PD"] and case.scored == ("T1w", "PD")
    assert case.shape == (9, 8, 10)  # whole: the scanner grid covers it with whole slices
    with pytest.raises(ValueError, match=r"c\.nii\.gz.*differs"):
        user_case([str(tmp_path / "a_T1w.nii.gz"), str(tmp_path / "c.nii.gz")])
    with pytest.raises(FileNotFoundError, match="missing"):
        user_case([str(tmp_path / "a_T1w.nii.gz"), str(tmp_path / "nope.nii.gz")])


# --- metrics --------------------------------------------------------------------------


def test_psnr_known_noise():
    rng = np.random.default_rng(2)
    truth = rng.uniform(0.1, 0.9, (10, 10, 10))
    truth[0, 0, 0], truth[9, 9, 9] = 0.0, 1.0
    signs = rng.choice([-1.0, 1.0], truth.shape)
    signs[0, 0, 0] = signs[9, 9, 9] = 0.0  # keep min and max, so normalisation is identity
    pred = truth + 0.01 * signs
    mse = 0.01**2 * (truth.size - 2) / truth.size
    mask = np.ones(truth.shape, bool)
    assert metrics.psnr(pred, truth, mask) == pytest.approx(10 * np.log10(1 / mse), abs=1e-9)
    # An affine intensity change is removed by the min-max normalisation.
    assert metrics.psnr(3 * pred + 7, truth, mask) == pytest.approx(metrics.psnr(pred, truth, mask))
    region = np.zeros(truth.shape, bool)
    region[5, 5, 5] = True
    assert metrics.psnr(pred, truth, mask, region) == pytest.approx(40.0)


def test_psnr_truth_range_keeps_the_prediction_unscaled():
    truth = np.linspace(10.0, 20.0, 1000).reshape(10, 10, 10)
    mask = np.ones(truth.shape, bool)
    pred = truth + 0.1  # error 0.1 on a truth range of 10 -> 40 dB
    assert metrics.psnr_truth_range(pred, truth, mask) == pytest.approx(40.0)
    # One far-off voxel: min-max PSNR re-scales every voxel, truth-range PSNR
    # pays only that voxel's own error.
    spoiled = truth.copy()
    spoiled[0, 0, 0] = 0.0  # 10 below the truth's minimum: squared error 1 / 1000 voxels
    assert metrics.psnr_truth_range(spoiled, truth, mask) == pytest.approx(30.0)
    assert metrics.psnr(spoiled, truth, mask) < 20.0
    assert metrics.psnr_truth_range(truth, truth, mask) == float("inf")
    # A region keeps the mask's scale: only the spoiled voxel -> its own error, 0 dB.
    region = np.zeros(truth.shape, bool)
    region[0, 0, 0] = True
    assert metrics.psnr_truth_range(spoiled, truth, mask, region) == pytest.approx(0.0)
    assert metrics.psnr_truth_range(spoiled, truth, mask, ~region) == float("inf")
    with pytest.raises(ValueError, match="empty"):
        metrics.psnr_truth_range(spoiled, truth, mask, np.zeros(truth.shape, bool))


def test_mi_errors_known_answers():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(12, 12, 12))
    b = a**2 + 0.1 * rng.normal(size=a.shape)
    truths, mask = {"T1w": a, "T2w": b}, np.ones(a.shape, bool)
    assert metrics.mi_errors(truths, truths, mask, ("T1w", "T2w")) == {
        "eps_T1w": 0.0,
        "eps_T2w": 0.0,
        "eps_hat": 0.0,
    }
    # A constant prediction shares no information: the error is the truth MI.
    flat = {"T1w": np.zeros_like(a), "T2w": b}
    err = metrics.mi_errors(flat, truths, mask, ("T1w",))
    from bids_mcsr.inr.mi import mutual_information

    assert err["eps_T1w"] == pytest.approx(mutual_information(a, b))
    assert err["eps_hat"] == pytest.approx(mutual_information(a, b))
    assert set(err) == {"eps_T1w", "eps_hat"}


def test_white_matter_and_lesion_contrast():
    # Three tissues along x (CSF 1, GM 2, WM 3 on T1w); a FLAIR lesion inside WM.
    t1 = np.ones((30, 10, 10))
    t1[10:20], t1[20:] = 2.0, 3.0
    mask = np.ones(t1.shape, bool)
    lesions = np.zeros(t1.shape, bool)
    lesions[24:26, 4:6, 4:6] = True
    wm = metrics.white_matter_mask(t1, mask, lesions, margin_vox=2)
    assert wm.any() and np.all(t1[wm] == 3.0)
    # Euclidean distance to the lesion (24..25, 4..5, 4..5) must exceed 2 voxels.
    assert not wm[22, 4, 4] and wm[21, 4, 4] and wm[22, 2, 2]
    assert wm[27, 2, 2] and not wm[28:].any()  # within 2 voxels of the array border
    flair = np.full(t1.shape, 100.0)
    flair[lesions] = 150.0
    assert metrics.lesion_contrast(flair, lesions, wm) == pytest.approx(0.5)


# --- child processes, tables, checks --------------------------------------------------


def test_run_child_measures_its_own_peak_rss_and_exit(tmp_path):
    code = "import numpy as np, sys; a = np.ones(40_000_000); sys.exit(3)"  # 320 MB
    run = run_child([sys.executable, "-c", code], tmp_path / "a.log")
    assert run.returncode == 3 and run.max_rss_mb > 300
    small = run_child([sys.executable, "-c", "print('hi')"], tmp_path / "b.log")
    assert small.returncode == 0 and small.max_rss_mb < 200  # not the earlier child's peak
    assert small.log.read_text().strip() == "hi"
    slow = run_child([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "c.log", 0.5)
    assert slow.returncode == -9 and slow.wall_s < 10


def test_app_command_method_flags(tmp_path):
    cmd = app_command(tmp_path, tmp_path / "o", "x", "paper", work_dir=tmp_path / "w", epochs=2)
    assert cmd[2:5] == [str(tmp_path), str(tmp_path / "o"), "participant"]
    assert "--preset" in cmd and cmd[cmd.index("--epochs") + 1] == "2"
    spline = app_command(tmp_path, tmp_path, "x", "spline", work_dir=tmp_path, epochs=2)
    assert "--epochs" not in spline and spline[spline.index("--method") + 1] == "spline"
    single = app_command(tmp_path, tmp_path, "x", "single", work_dir=tmp_path)
    assert single[single.index("--architecture") + 1] == "single"
    with pytest.raises(ValueError, match="unknown method"):
        app_command(tmp_path, tmp_path, "x", "smore", work_dir=tmp_path)


def test_app_command_overrides_reach_fast_inr_methods_only(tmp_path):
    texts = ["epochs=3", "lr=0.005"]
    for method, expected in [
        ("split-head", texts),
        ("single", texts),
        ("spline", []),
        ("paper", []),
    ]:
        cmd = app_command(tmp_path, tmp_path, "x", method, work_dir=tmp_path, overrides=texts)
        given = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--override"]
        assert given == expected, method


def _rows() -> list[dict]:
    base = {"case": "c", "mode": "paper", "view": "sagittal", "contrast": "T1w"}
    return [
        {**base, "method": "spline", "psnr": 30.0, "ssim": 0.9, "device": "cpu"},
        {**base, "method": "split-head", "psnr": 33.5, "ssim": 0.95, "epochs": 12},
        {**base, "contrast": "T2w", "method": "spline", "psnr": 28.0},
        {**base, "contrast": "T2w", "method": "split-head", "psnr": 27.0},
    ]


def _results(rows: list[dict]) -> dict:
    """A saved run around ``rows``, as ``results.json`` holds it."""
    return {
        "machine": {
            "date_utc": "d",
            "commit": "abc",
            "dirty": False,
            "cpu": "cpu",
            "cores": 2,
            "gpu": None,
            "python": "3",
            "torch": "2",
        },
        "settings": {
            "cases": ["c"],
            "methods": ["spline", "split-head"],
            "modes": ["paper"],
            "views": ["sagittal"],
            "thickness": 4,
            "repeats": 1,
            "epochs": None,
            "paper_epochs": 1,
            "registration": False,
        },
        "rows": rows,
        "notes": ["n1"],
    }


def test_spline_gain_and_quick_check():
    rows = _rows()
    _add_spline_gains(rows)
    assert rows[1]["gain_db"] == pytest.approx(3.5) and rows[3]["gain_db"] == pytest.approx(-1.0)
    assert rows[1]["ssim_gain"] == pytest.approx(0.05)
    assert "gain_tr_db" not in rows[1]  # rows without truth-range PSNR (older runs)
    with_tr = _rows()
    for r, value in zip(with_tr, (31.0, 35.25, 29.5, 29.0), strict=True):
        r["psnr_tr"] = value
    _add_spline_gains(with_tr)
    assert with_tr[1]["gain_tr_db"] == pytest.approx(4.25)
    # The quick check rests on truth-range PSNR, never on the fragile min-max one.
    problems = quick_failures(with_tr)
    assert len(problems) == 1 and problems[0].startswith("T2w: split-head truth-range PSNR 29.00")
    assert quick_failures(with_tr[:2]) == []
    failed = [*with_tr[:1], {**with_tr[1], "psnr_tr": None, "error": "exit 1; see x.log"}]
    assert any("exit 1" in p for p in quick_failures(failed))


def test_markdown_table_formatting():
    rows = _rows()[:2]
    rows[0]["peak_rss_mb"] = 512.4
    rows[1]["eps_mi"] = float("nan")
    text = markdown_table(rows, MAIN_COLUMNS)
    lines = text.splitlines()
    assert lines[0].startswith(
        "| case | mode | partner view | motion | contrast | method | PSNR truth-range dB |"
    )
    assert lines[1].count("|") == len(MAIN_COLUMNS) + 1 and "---:" in lines[1]
    assert lines[2].startswith(
        "| c | paper | sagittal | - | T1w | spline | - | - | 0.9000 | - | 30.00 |"
    )
    assert "| 512 |" in lines[2] and "| 12 |" in lines[3] and "| - |" in lines[3]
    results = _results(rows)
    md = render(results)
    assert "commit `abc`" in md and "GPU: none" in md and md.rstrip().endswith("- n1")


def test_merge_scores_a_run_against_another_runs_spline(tmp_path, capsys):
    import json

    from bids_mcsr.benchmark.__main__ import main

    first = _results(_rows()[:2])  # T1w spline 30.0 and split-head 33.5
    ablation = {
        **first,
        "machine": {**first["machine"], "commit": "def"},
        "rows": [{**_rows()[1], "method": "vanilla", "psnr": 31.25}],
        "notes": ["n1", "n2"],
    }
    merged = merge([first, ablation])
    # grouped by setting, methods in the benchmark's order (vanilla before split-head)
    assert [r["method"] for r in merged["rows"]] == ["spline", "vanilla", "split-head"]
    assert merged["rows"][1]["gain_db"] == pytest.approx(1.25)
    assert "gain_db" not in ablation["rows"][0]  # the inputs are not modified
    assert merged["notes"] == ["n1", "n2"]
    files = []
    for i, run in enumerate((first, ablation)):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(run))
    assert main(["--merge", *map(str, files)]) == 0
    md = capsys.readouterr().out
    assert (
        "commit `abc`" in md
        and "commit `def`" in md
        and any("| vanilla |" in ln and "| 31.25 |" in ln for ln in md.splitlines())
    )
    assert "| 1.25 |" in md
    assert main(["--merge", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"rows": [{"case": "c"}]}')  # not a results.json
    assert main(["--merge", str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert "other.json: not a benchmark results.json" in err and "machine" in err


def _seed_run(seed: int, psnr: float, wall: float, rss: float, epochs: int) -> tuple:
    record = {
        "wall_s": wall,
        "wall_s_runs": [wall],
        "fit_s": wall - 5,
        "peak_rss_mb": rss,
        "regridded": False,
        "command": f"run.py --seed {seed}",
    }
    facts = {"samples_per_s": 1000.0 * (seed + 1), "epochs": epochs, "device": "cpu"}
    scores = {"psnr": psnr, "psnr_tr": psnr + 2, "ssim": 0.9 + seed / 100, "eps_mi": 0.1}
    return seed, record, facts, scores


def test_combine_seeds_takes_medians_and_keeps_each_seed():
    runs = [
        _seed_run(0, 26.5, 110.0, 1600.0, 6),
        _seed_run(1, 27.25, 130.0, 1700.0, 5),
        _seed_run(2, 25.0, 120.0, 1650.0, 6),
    ]
    row = combine_seeds(runs)
    assert row["psnr"] == 26.5 and row["psnr_tr"] == 28.5 and row["ssim"] == pytest.approx(0.91)
    assert row["wall_s"] == 120.0 and row["wall_s_runs"] == [110.0, 130.0, 120.0]
    assert row["fit_s"] == 115.0 and row["peak_rss_mb"] == 1700.0
    assert row["epochs"] == 6 and row["samples_per_s"] == 2000.0
    assert row["peak_gpu_mb"] is None  # CPU runs
    assert [r["seed"] for r in row["seed_runs"]] == [0, 1, 2]
    assert row["seed_runs"][1] == {
        "seed": 1,
        "psnr": 27.25,
        "psnr_tr": 29.25,
        "ssim": 0.91,
        "eps_mi": 0.1,
    }
    assert runs[0][3]["psnr"] == 26.5  # the inputs are not modified
    # one seed: the run as it is, no per-seed list
    single = combine_seeds(runs[:1])
    assert single["psnr"] == 26.5 and "seed_runs" not in single
    # a failed seed fails the row
    bad = (3, {"error": "exit 1; see x.log", "log_tail": []}, {}, {})
    assert combine_seeds([*runs, bad]) == {"error": "exit 1; see x.log", "log_tail": []}


def _seed_results(seed: int, inr: tuple[float, ...], motion_reg: float) -> dict:
    """One ``--seed S`` run: spline and split-head on an aligned and a moved setting."""
    base = {"case": "c", "mode": "profile", "view": "sagittal", "contrast": "T1w", "seeds": [seed]}
    rows = []
    for motion, spline_tr, inr_tr, reg in (
        ("none", 30.0, inr[0], 0.0),
        ("rigid", 29.0, inr[1], motion_reg),
    ):
        for method, tr, ssim in (
            ("spline", spline_tr, 0.90),
            ("split-head", inr_tr, 0.93 + seed / 100),
        ):
            record = {"wall_s": 100.0 + seed, "wall_s_runs": [100.0 + seed], "fit_s": 90.0}
            record |= {"peak_rss_mb": 1500.0 + seed, "regridded": True, "device": "cpu"}
            scores = {"psnr": tr - 1, "psnr_tr": tr, "ssim": ssim, "eps_mi": 0.01 + seed / 100}
            scores |= {"reg_mean_mm": reg, "reg_max_mm": 2 * reg}
            rows.append({**base, "motion": motion, "method": method, **record, **scores})
    return {**_results(rows), "notes": []}


def test_merge_folds_runs_of_other_seeds_into_medians_and_gates():
    runs = [_seed_results(0, (33.0, 31.0), 0.2), _seed_results(1, (34.0, 32.5), 0.35)]
    runs.append(_seed_results(2, (33.5, 30.5), 0.25))
    merged = merge(runs)
    assert [(r["motion"], r["method"]) for r in merged["rows"]] == [
        ("none", "spline"), ("none", "split-head"), ("rigid", "spline"), ("rigid", "split-head")
    ]  # fmt: skip
    aligned, moved = merged["rows"][1], merged["rows"][3]
    assert aligned["seeds"] == [0, 1, 2] and aligned["psnr_tr"] == 33.5
    assert aligned["gain_tr_db"] == pytest.approx(3.5) and aligned["wall_s"] == 101.0
    assert aligned["peak_rss_mb"] == 1502.0
    # each seed's gain is against the spline of the same seed
    assert [run["gain_tr_db"] for run in moved["seed_runs"]] == [2.0, 3.5, 1.5]
    assert moved["reg_mean_mm"] == 0.25
    (gate,) = gate_rows(merged["rows"])
    assert gate["settings"] == 2 and gate["gain_tr_median_min"] == pytest.approx(2.0)
    assert gate["gain_tr_seed_min"] == pytest.approx(1.5)
    assert gate["ssim_gain_seed_min"] == pytest.approx(0.03)
    assert gate["eps_mi_max"] == pytest.approx(0.03)
    assert (gate["reg_aligned_max_mm"], gate["reg_moved_max_mm"]) == (0.0, 0.35)
    md = render(merged)
    assert "Worst setting per contrast" in md
    assert (
        "| c | profile | T1w | split-head | 2 | 2.00 | 1.50 | 0.0300 | 0.030 | 0.000 | 0.350 |"
        in md
    )
    # one seed given twice keeps its first scores; a single run is left as it is
    again = merge([runs[0], runs[0]])
    assert again["rows"][1]["seeds"] == [0] and again["rows"][1]["psnr_tr"] == 33.0
    assert "seed_runs" not in again["rows"][1]
    assert merge(runs[:1])["rows"][1]["psnr_tr"] == 33.0


def test_combine_seeds_keeps_the_largest_gpu_peak():
    runs = [_seed_run(s, 26.0, 20.0, 3000.0, 6) for s in range(3)]
    for (_, _, facts, _), mb in zip(runs, (900.0, 1250.5, 1100.0), strict=True):
        facts.update(device="cuda:0 (NVIDIA H100)", peak_gpu_mb=mb)
    assert combine_seeds(runs)["peak_gpu_mb"] == 1250.5


def test_method_seeds_and_the_per_seed_table(tmp_path):
    s = Settings(
        cases=[],
        methods=["spline", "split-head"],
        modes=["paper"],
        views=["sagittal"],
        data_dir=tmp_path,
        out=tmp_path,
        seeds=[0, 1, 2],
        registration=False,
    )
    assert method_seeds(s, "split-head") == [0, 1, 2] and method_seeds(s, "paper") == [0, 1, 2]
    assert method_seeds(s, "spline") == [0]  # deterministic without registration
    s.registration = True  # registration samples with the seed: spline varies too
    assert method_seeds(s, "spline") == [0, 1, 2]
    row = {
        **_rows()[1],
        "seeds": [0, 1, 2],
        **combine_seeds(
            [_seed_run(0, 26.5, 1, 1, 6), _seed_run(1, 27.25, 1, 1, 6), _seed_run(2, 25.0, 1, 1, 6)]
        ),
    }
    results = _results([_rows()[0], row])
    results["settings"]["seeds"] = [0, 1, 2]
    md = render(results)
    assert "seeds [0, 1, 2] (metrics = median over seeds)" in md
    assert "Per seed (the rows above give the medians):" in md
    assert (
        "| c | paper | sagittal | none | T1w | split-head | 1 | 29.25 | - | 0.9100 | 27.25 |" in md
    )
    median_row = next(
        ln
        for ln in md.splitlines()
        if ln.startswith("| c | paper | sagittal | - | T1w | split-head |")
    )
    assert "| split-head |" in median_row and "| 26.50 |" in median_row
    assert "seeds 0," in render(_results(_rows()))  # a single seed (older runs: no key)


# --- the quick benchmark end to end ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.shared
def test_quick_benchmark_split_head_beats_spline(tmp_path):
    if not (SHARED / "icbm2009c" / "T1w.nii.gz").is_file():
        pytest.skip(f"needs the shared data at {SHARED}")
    proc = subprocess.run(
        [sys.executable, "-m", "bids_mcsr.benchmark", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["contrast"], r["method"]) for r in rows} == {
        (c, m) for c in ("T1w", "T2w") for m in ("spline", "split-head")
    }
    # truth-range PSNR: the min-max figure swings with single extreme voxels
    assert all(r["gain_tr_db"] > 0 for r in rows if r["method"] == "split-head")


def test_cli_usage_errors(tmp_path, capsys):
    from bids_mcsr.benchmark.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--repeats", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--repeats must be >= 1" in capsys.readouterr().err
    missing = tmp_path / "nodata"
    assert main(["--cases", "icbm2009c", "--data-dir", str(missing), "--out", str(tmp_path)]) == 2
    assert f"{missing}: no such data folder" in capsys.readouterr().err


@pytest.mark.slow
def _spline_run_on_user_volumes(tmp_path: Path) -> tuple[int, Path]:
    """``--hr`` benchmark of spline on two synthetic 32^3 volumes; (exit code, --out)."""
    from bids_mcsr.benchmark.__main__ import main

    # Two smooth synthetic "contrasts" of a blob on a 32^3 1 mm grid.
    g = np.mgrid[:32, :32, :32].astype(float)
    r2 = ((g - 15.5) ** 2 / np.array([100.0, 140.0, 80.0])[:, None, None, None]).sum(axis=0)
    inside = r2 < 1
    t1 = np.where(inside, 100 + 40 * np.sin(g[0] / 3) * np.cos(g[2] / 4), 0).astype(np.float32)
    t2 = np.where(inside, 200 - t1, 0).astype(np.float32)
    for name, vol in (("T1w", t1), ("T2w", t2)):
        nib.save(nib.Nifti1Image(vol, _affine()), str(tmp_path / f"sub-x_{name}.nii.gz"))
    out = tmp_path / "out"
    hr = [str(tmp_path / "sub-x_T1w.nii.gz"), str(tmp_path / "sub-x_T2w.nii.gz")]
    # The engine-only diagnostic: without registration the spline is deterministic.
    argv = ["--cases", "--hr", *hr, "--methods", "spline", "--modes", "profile"]
    argv += ["--no-registration"]
    return main([*argv, "--out", str(out), "--seed", "3", "4"]), out


def test_benchmark_end_to_end_on_user_volumes_with_spline(tmp_path, capsys):
    code, out = _spline_run_on_user_volumes(tmp_path)
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["case"], r["contrast"], r["method"]) for r in rows] == [
        ("user", "T1w", "spline"),
        ("user", "T2w", "spline"),
    ]
    for r in rows:
        # spline is deterministic: it runs once, with the first seed, into its own folder
        assert r["seeds"] == [3] and "seed_runs" not in r and "--seed 3" in r["command"]
        # The output follows the reference's lattice, whose slice centres the scanner
        # placed off the HR lattice: it is brought to the HR grid for scoring.
        assert r["regridded"] and r["gain_db"] == 0.0 and r["peak_rss_mb"] > 50
        assert 10 < r["psnr"] < 60 and 0 < r["ssim"] < 1 and r["eps_hat"] >= 0
    assert "| user | profile | sagittal | none | T1w | spline |" in capsys.readouterr().out


def test_rescore_recomputes_metrics_from_saved_outputs(tmp_path, capsys):
    from bids_mcsr.benchmark.__main__ import main

    code, out = _spline_run_on_user_volumes(tmp_path)
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "results.json").read_text())
    truth = {r["contrast"]: dict(r) for r in saved["rows"]}
    # A run made before a metric existed, and with a stale value: both come back.
    for r in saved["rows"]:
        del r["psnr_tr"]
        r["ssim"] = -1.0
    # The T2w row as if it had run with two seeds (the same outputs in both folders).
    key = out / "derivatives" / "user_profile_sagittal"
    for seed in (3, 4):
        shutil.copytree(key / "spline", key / f"spline_seed-{seed}")
    saved["rows"][1]["seeds"] = [3, 4]
    (out / "results.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["--rescore", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    for r in rows:
        for k in ("psnr", "psnr_tr", "ssim", "eps_hat", "gain_db", "wall_s"):
            assert r[k] == pytest.approx(truth[r["contrast"]][k]), (r["contrast"], k)
    assert "seed_runs" not in rows[0]
    assert [s["seed"] for s in rows[1]["seed_runs"]] == [3, 4]
    assert rows[1]["seed_runs"][1]["psnr_tr"] == pytest.approx(truth["T2w"]["psnr_tr"])
    notes = json.loads((out / "results.json").read_text())["notes"]
    assert sum("(--rescore)" in n for n in notes) == 1
    assert "| user | profile | sagittal | none | T1w | spline |" in (out / "results.md").read_text()
    # Outputs gone: a one-line error naming the missing file, exit 2.
    shutil.rmtree(key / "spline_seed-4")
    assert main(["--rescore", str(out)]) == 2
    err = capsys.readouterr().err
    assert "spline_seed-4" in err and "is missing" in err
    with pytest.raises(SystemExit) as usage:
        main(["--rescore", str(out), "--merge", str(out / "results.json")])
    assert usage.value.code == 2


def test_registration_error_against_the_known_motion():
    case = _toy_case(shape=(20, 22, 18))
    motion = case_motion(case, "rigid")
    partner = "sub-toy_FLAIR.nii.gz"

    def sidecar(matrix):
        inputs = {} if matrix is None else {partner: {"Matrix": np.asarray(matrix).tolist()}}
        return {"SuperResolution": {"Registration": {"Method": "rigid", "Inputs": inputs}}}

    # The registration that undoes the motion is exact; keeping the headers is off by
    # the motion itself (2-5 deg and 4-10 mm: several mm over the brain).
    exact = registration_error(case, "rigid", sidecar(np.linalg.inv(motion)))
    assert exact["reg_mean_mm"] == pytest.approx(0.0, abs=1e-9)
    kept = registration_error(case, "rigid", sidecar(None))
    assert 4.0 < kept["reg_mean_mm"] <= kept["reg_max_mm"] < 12.0
    # Aligned scans: the truth is the identity.
    assert registration_error(case, "none", sidecar(None)) == {
        "reg_mean_mm": 0.0,
        "reg_max_mm": 0.0,
    }
    shift = np.eye(4)
    shift[:3, 3] = [0.3, 0.0, 0.4]
    assert registration_error(case, "none", sidecar(shift))["reg_mean_mm"] == pytest.approx(0.5)
    # Without registration nothing is scored.
    assert registration_error(case, "none", {"SuperResolution": {"Registration": {}}}) == {}


def test_paper_mode_sidecar_states_a_thin_slice(tmp_path):
    # Point samples at slice centres: physically slices one HR voxel thick.
    case = _toy_case()
    paths = write_case_dataset(case, tmp_path, "paper", "coronal")
    for path in paths.values():
        side = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert side["SliceThickness"] == 1.0 and side["Simulation"]["Mode"] == "paper"
