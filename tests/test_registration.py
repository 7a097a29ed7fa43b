"""Rigid MI registration: RAS/LPS conversion, recovery of known transforms, transform files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from bids_mcsr.masks import foreground_mask
from bids_mcsr.registration import (
    HEADER_TRUST_GAIN,
    HEADER_TRUST_MM,
    RAS_TO_LPS,
    load_transform,
    mean_displacement,
    register_rigid,
    save_transform,
    sitk_affine,
    to_sitk,
    transform_summary,
)
from bids_mcsr.resample import acquire

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def rotation(axis, degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    th = np.radians(degrees)
    return np.eye(3) + np.sin(th) * k + (1 - np.cos(th)) * k @ k


def rigid(axis, degrees: float, translation, centre) -> np.ndarray:
    """4x4 rotation about ``centre`` (mm) followed by ``translation`` (mm)."""
    out = np.eye(4)
    out[:3, :3] = rotation(axis, degrees)
    out[:3, 3] = np.asarray(centre) - out[:3, :3] @ np.asarray(centre) + np.asarray(translation)
    return out


def errors(estimate: np.ndarray, truth: np.ndarray, points: np.ndarray) -> tuple[float, float]:
    """Max displacement (mm) over reference-world ``points`` and residual rotation (degrees)."""
    moving_pts = np.c_[points, np.ones(len(points))] @ np.linalg.inv(truth).T
    disp = np.linalg.norm((moving_pts @ estimate.T)[:, :3] - points, axis=1).max()
    resid = estimate[:3, :3] @ truth[:3, :3].T
    angle = np.degrees(np.arccos(np.clip((np.trace(resid) - 1) / 2, -1, 1)))
    return float(disp), float(angle)


def thick(affine: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Affine of a thick-slice grid: ``factor`` x spacing along ``axis``, same FOV start."""
    out = np.array(affine, dtype=float)
    out[:3, axis] *= factor
    out[:3, 3] = affine[:3, 3] + affine[:3, axis] * (factor - 1) / 2
    return out


def thick_shape(shape, axis: int, factor: int) -> tuple[int, int, int]:
    out = list(shape)
    out[axis] = shape[axis] // factor
    return tuple(out)


def simulate_pair(hr_fixed, hr_moving, affine, truth, fixed_axis, moving_axis, factor):
    """Thick-slice fixed + moving acquisitions; the moving one sees the head moved by ``truth``.

    The moving image's header is the un-moved grid: its voxel v images the
    reference-world point ``truth @ header @ v``, so the transform that
    registration must return is ``truth``.
    """
    fa = thick(affine, fixed_axis, factor)
    ma = thick(affine, moving_axis, factor)
    fixed = acquire(hr_fixed, affine, thick_shape(hr_fixed.shape, fixed_axis, factor), fa, order=3)
    moving = acquire(
        hr_moving, affine, thick_shape(hr_moving.shape, moving_axis, factor), truth @ ma, order=3
    )
    return fixed, fa, moving, ma


def test_to_sitk_maps_ras_affine_to_lps_physical_space():
    rng = np.random.default_rng(0)
    rot = rotation([0.3, -1.0, 0.4], 17.0)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 0.9, 3.5])
    affine[:3, 3] = [-80.0, 95.0, -40.0]
    data = rng.random((5, 6, 7)).astype(np.float32)
    img = to_sitk(data, affine)
    for ijk in [(0, 0, 0), (4, 1, 6), (2.5, 3.25, 1.0)]:
        ras = affine @ np.r_[ijk, 1.0]
        lps = np.asarray(img.TransformContinuousIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(lps, (RAS_TO_LPS @ ras)[:3], atol=1e-9)
    # Array order: sitk index (i, j, k) holds data[i, j, k].
    assert img[4, 1, 6] == pytest.approx(float(data[4, 1, 6]))
    np.testing.assert_allclose(sitk_affine(img), affine, atol=1e-9)


def test_transform_summary_reports_angle_axis_translation():
    truth = rigid([0, 0, 1], 30.0, [3.0, -4.0, 0.0], centre=[10.0, 0.0, 0.0])
    s = transform_summary(truth, centre=[10.0, 0.0, 0.0])
    assert s["RotationDeg"] == pytest.approx(30.0, abs=1e-6)
    np.testing.assert_allclose(s["RotationAxis"], [0, 0, 1], atol=1e-6)
    assert s["DisplacementMm"] == pytest.approx(5.0, abs=1e-6)
    np.testing.assert_allclose(s["TranslationMm"], truth[:3, 3], atol=1e-4)
    assert transform_summary(np.eye(4))["RotationDeg"] == 0.0


def test_transform_file_is_itk_lps_reference_to_source(tmp_path):
    truth = rigid([1, 2, -1], 5.0, [2.5, -2.0, 2.4], centre=[0.0, -18.0, 18.0])
    path = save_transform(tmp_path / "sub-01_from-T2w_to-T1w_mode-image_xfm.txt", truth)
    text = path.read_text()
    assert text.startswith("#Insight Transform File V1.0")
    assert "AffineTransform_double_3_3" in text
    np.testing.assert_allclose(load_transform(path), truth, atol=1e-9)
    # ITK/ANTs semantics: the file maps reference (LPS) points to source (LPS) points.
    tx = sitk.ReadTransform(str(path))
    ref_ras = np.array([12.0, -30.0, 25.0, 1.0])
    src_ras = np.linalg.inv(truth) @ ref_ras
    mapped = tx.TransformPoint([float(v) for v in (RAS_TO_LPS @ ref_ras)[:3]])
    np.testing.assert_allclose(mapped, (RAS_TO_LPS @ src_ras)[:3], atol=1e-6)


def test_load_transform_rejects_non_transform_file(tmp_path):
    bad = tmp_path / "x_xfm.txt"
    bad.write_text("not a transform\n")
    with pytest.raises(ValueError, match="x_xfm.txt"):
        load_transform(bad)


@pytest.fixture(scope="module")
def mni2():
    """nilearn's packaged MNI152 at 2 mm (offline), and a T2-like remapping of it."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    t1 = np.asarray(img.get_fdata(dtype=np.float32))
    # Inverted, non-linear contrast inside the brain: MI must handle it, a
    # correlation metric would not.
    t2 = np.where(t1 > 0.05, 1.2 - t1**0.7, 0.0).astype(np.float32)
    return t1, t2, img.affine


def test_recovers_rigid_transform_between_thick_slice_contrasts(mni2):
    t1, t2, affine = mni2
    centre = affine[:3, :3] @ (np.array(t1.shape) / 2) + affine[:3, 3]
    truth = rigid([1.0, -0.5, 0.8], 6.0, [3.0, -2.0, 3.5], centre)
    fixed, fa, moving, ma = simulate_pair(t1, t2, affine, truth, 2, 0, 3)  # 2x2x6 vs 6x2x2
    fm, mm = foreground_mask(fixed, fa), foreground_mask(moving, ma)
    # The workflow's header-trust rule does not get in the way of a real motion.
    settings = {"fixed_mask": fm, "moving_mask": mm, "seed": 3}
    settings |= {"min_motion_mm": HEADER_TRUST_MM, "min_gain": HEADER_TRUST_GAIN}
    estimate = register_rigid(fixed, fa, moving, ma, **settings)
    brain = np.argwhere(t1[::2, ::2, ::2] > 0.2) * 2 @ affine[:3, :3].T + affine[:3, 3]
    disp, angle = errors(estimate, truth, brain)
    assert disp < 1.0 and angle < 0.5, (disp, angle)
    start_disp, _ = errors(np.eye(4), truth, brain)
    assert start_disp > 5.0  # the test starts far from the answer
    # Deterministic (fixed seed, sample count and threads) up to the order of
    # ITK's multi-threaded sums (~1e-13).
    again = register_rigid(fixed, fa, moving, ma, **settings)
    np.testing.assert_allclose(estimate, again, atol=1e-8)


def test_register_rigid_rejects_mask_of_wrong_shape(mni2):
    t1, _, affine = mni2
    with pytest.raises(ValueError, match="mask shape"):
        register_rigid(t1, affine, t1, affine, fixed_mask=np.ones((3, 3, 3), bool))


@pytest.mark.slow
@pytest.mark.shared
def test_recovers_5deg_4mm_on_icbm_axial_t1w_and_sagittal_t2w():
    folder = SHARED / "icbm2009c"
    if not (folder / "T1w.nii.gz").is_file():
        pytest.skip(f"needs the development data in {SHARED} (../shared/data beside the repo)")
    img1 = nib.load(folder / "T1w.nii.gz")
    t1 = np.asarray(img1.get_fdata(dtype=np.float32))
    t2 = np.asarray(nib.load(folder / "T2w.nii.gz").get_fdata(dtype=np.float32))
    affine = img1.affine
    centre = affine[:3, :3] @ (np.array(t1.shape) / 2) + affine[:3, 3]
    shift = np.array([2.5, -2.0, 2.4])  # |shift| = 4.0 mm
    truth = rigid([1.0, 2.0, -1.0], 5.0, shift, centre)
    fixed, fa, moving, ma = simulate_pair(t1, t2, affine, truth, 2, 0, 4)  # 1x1x4 vs 4x1x1
    estimate = register_rigid(
        fixed,
        fa,
        moving,
        ma,
        fixed_mask=foreground_mask(fixed, fa),
        moving_mask=foreground_mask(moving, ma),
    )
    brain = np.argwhere(t1[::3, ::3, ::3] > 0) * 3 @ affine[:3, :3].T + affine[:3, 3]
    disp, angle = errors(estimate, truth, brain)
    assert disp < 0.5 and angle < 0.5, (disp, angle)


def test_scans_keep_their_headers_unless_the_metric_clearly_asks(mni2):
    # Two contrasts, thick slices in different directions, a 0.8 mm offset between
    # them: registration finds it; with a displacement floor above it (the workflow
    # uses HEADER_TRUST_MM, the MI optimum's own offset on real contrast pairs) the
    # headers are kept.
    t1, t2, affine = mni2
    small = rigid([0, 0, 1], 0.0, [0.8, 0.0, 0.0], [0.0, 0.0, 0.0])
    fixed, fa, moving, ma = simulate_pair(t1, t2, affine, small, 2, 0, 3)
    fm, mm = foreground_mask(fixed, fa), foreground_mask(moving, ma)
    free: dict = {}
    moved = register_rigid(fixed, fa, moving, ma, fixed_mask=fm, moving_mask=mm, report=free)
    assert not free["kept_start"] and 0.5 < free["found_mm"] < 1.0
    assert free["gain"] > 0
    assert not np.allclose(moved, np.eye(4))  # without the rule the pair is moved
    report: dict = {}
    kept = register_rigid(
        fixed,
        fa,
        moving,
        ma,
        fixed_mask=fm,
        moving_mask=mm,
        min_motion_mm=1.0,
        report=report,
    )
    np.testing.assert_array_equal(kept, np.eye(4))
    assert report["kept_start"] and report["found_mm"] == pytest.approx(free["found_mm"])
    assert report["metric"] == report["metric_initial"]
    # A gain threshold alone keeps them too when the metric barely prefers the move.
    gain_only: dict = {}
    register_rigid(
        fixed, fa, moving, ma, fixed_mask=fm, moving_mask=mm, min_gain=1.0, report=gain_only
    )
    assert gain_only["kept_start"]


def test_mean_displacement_of_a_known_shift_and_turn():
    pts = np.array([[10.0, 0, 0], [-10.0, 0, 0], [0, 0, 5.0]])
    turn = rigid([0, 0, 1], 180.0, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert mean_displacement(turn, np.eye(4), pts) == pytest.approx(40.0 / 3)
