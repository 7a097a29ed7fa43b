"""Ground-truth-free QC metrics on synthetic volumes with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from bids_mcsr import qc
from bids_mcsr.resample import acquire

SHAPE = (40, 40, 40)


def blob_phantom(seed: int = 0) -> np.ndarray:
    """(40, 40, 40) piecewise-constant tissue classes inside a sphere, sharp isotropic edges."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 2.5)
    tissue = np.where(field > 0, 200.0, 120.0)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    inside = np.linalg.norm(ijk - (np.asarray(SHAPE) - 1) / 2, axis=-1) < 17
    return np.where(inside, tissue, 0.0).astype(np.float32)


def thick_axial() -> tuple[tuple[int, int, int], np.ndarray]:
    """1x1x4 mm slices covering the phantom's field of view (HR affine = identity)."""
    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    aff[2, 3] = 1.5  # slice k covers HR voxels 4k..4k+3
    return (40, 40, 10), aff


def rotation(deg: float, shift: tuple[float, float, float]) -> np.ndarray:
    """Rigid 4x4: rotation about z through the phantom centre, then a shift (mm)."""
    t = np.radians(deg)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    centre = np.eye(4)
    centre[:3, 3] = (np.asarray(SHAPE) - 1) / 2
    move = np.eye(4)
    move[:3, 3] = shift
    return move @ centre @ rot @ np.linalg.inv(centre)


@pytest.fixture(scope="module")
def scene():
    hr = blob_phantom()
    lr_shape, lr_aff = thick_axial()
    lr = acquire(hr, np.eye(4), lr_shape, lr_aff)
    mask = lr > 50
    return hr, lr, lr_aff, mask


def test_perfect_output_reacquires_to_the_input(scene):
    hr, lr, lr_aff, mask = scene
    res = qc.consistency(hr, np.eye(4), lr, lr_aff, mask=mask)
    assert res.psnr_db == qc.PSNR_CAP_DB
    assert res.nrmse < 1e-6
    assert res.n_voxels == int(mask.sum())
    assert res.residual.shape == lr.shape
    assert np.abs(res.residual).max() < 1e-3
    lo, hi = res.intensity_range
    assert lo == pytest.approx(np.percentile(lr[mask], 0.5))
    assert hi == pytest.approx(np.percentile(lr[mask], 99.5))


def test_blur_lowers_consistency_monotonically(scene):
    hr, lr, lr_aff, mask = scene
    psnrs, nrmses = [], []
    for sigma in (0.7, 1.5, 3.0):
        res = qc.consistency(ndimage.gaussian_filter(hr, sigma), np.eye(4), lr, lr_aff, mask=mask)
        psnrs.append(res.psnr_db)
        nrmses.append(res.nrmse)
    assert psnrs[0] < 40  # clearly below a perfect output
    assert psnrs[0] > psnrs[1] > psnrs[2]
    assert nrmses[0] < nrmses[1] < nrmses[2]
    # The residual map carries the error: zero outside the compared voxels.
    res = qc.consistency(ndimage.gaussian_filter(hr, 3.0), np.eye(4), lr, lr_aff, mask=mask)
    assert np.all(res.residual[~mask] == 0)
    assert np.sqrt(np.mean(res.residual[mask] ** 2)) == pytest.approx(
        res.nrmse * np.sqrt(np.mean(lr[mask].astype(float) ** 2)), rel=1e-4
    )


def test_psnr_definition_matches_hand_computation(scene):
    hr, lr, lr_aff, mask = scene
    out = hr + 10.0  # constant offset: re-acquired = input + 10 exactly
    res = qc.consistency(out, np.eye(4), lr, lr_aff, mask=mask)
    lo, hi = res.intensity_range
    assert res.psnr_db == pytest.approx(10 * np.log10((hi - lo) ** 2 / 100.0), abs=1e-3)
    expected = np.sqrt(100.0 * mask.sum()) / np.linalg.norm(lr[mask].astype(float))
    assert res.nrmse == pytest.approx(expected, rel=1e-4)


def test_registration_transform_is_used(scene):
    hr, _, lr_aff, _ = scene
    transform = rotation(6.0, (2.0, -1.5, 0.0))  # input world -> output world
    lr_shape = thick_axial()[0]
    # The scanner saw the head moved: its true geometry in the output world is T @ A.
    moved = acquire(hr, np.eye(4), lr_shape, transform @ lr_aff)
    mask = moved > 50
    with_t = qc.consistency(hr, np.eye(4), moved, lr_aff, transform=transform, mask=mask)
    without = qc.consistency(hr, np.eye(4), moved, lr_aff, mask=mask)
    assert with_t.psnr_db > 60
    assert without.psnr_db < with_t.psnr_db - 30


def test_only_voxels_inside_the_output_fov_are_compared(scene):
    hr, lr, lr_aff, mask = scene
    crop = hr[:, :, :20]  # output covers the lower half of the slab only
    res = qc.consistency(crop, np.eye(4), lr, lr_aff, mask=mask)
    assert res.n_voxels == int(mask[:, :, :5].sum())
    assert res.psnr_db == qc.PSNR_CAP_DB
    far = np.eye(4)
    far[:3, 3] = 500.0
    with pytest.raises(ValueError, match="no input foreground voxel"):
        qc.consistency(hr, far, lr, lr_aff, mask=mask)


def test_sharpness_through_plane_below_in_plane_for_thick_slices(scene):
    hr, lr, lr_aff, mask = scene
    s_in = qc.sharpness(lr, lr_aff, mask)
    assert s_in["ThroughPlaneAxis"] == 2
    assert s_in["Axes"] == ["R", "A", "S"]
    assert s_in["Spacing"] == [1.0, 1.0, 4.0]
    assert s_in["Ratio"] < 0.6
    assert s_in["ThroughPlane"] < s_in["InPlane"]
    hr_mask = hr > 50
    s_hr = qc.sharpness(hr, np.eye(4), hr_mask, through_axis=2)
    assert 0.85 < s_hr["Ratio"] < 1.15  # isotropic structure: no preferred axis
    # Blurring along z hits the through-plane value hardest (oblique edges lose
    # some in-plane contrast too), so the ratio drops well below 1.
    z_blur = ndimage.gaussian_filter1d(hr, 2.0, axis=2)
    s_blur = qc.sharpness(z_blur, np.eye(4), hr_mask, through_axis=2)
    assert s_blur["ThroughPlane"] < 0.6 * s_hr["ThroughPlane"]
    assert s_blur["Ratio"] < 0.75 * s_hr["Ratio"]


def test_sharpness_units_are_per_mm(scene):
    hr, _, _, _ = scene
    mask = hr > 50
    fine = qc.sharpness(hr, np.eye(4), mask)
    # The same samples declared 2 mm apart: gradients per mm halve on every axis.
    coarse = qc.sharpness(hr, np.diag([2.0, 2.0, 2.0, 1.0]), mask)
    for g1, g2 in zip(fine["RMSGradient"], coarse["RMSGradient"], strict=True):
        assert g2 == pytest.approx(g1 / 2, rel=1e-3)


def test_assess_is_json_clean_and_flattens(scene):
    hr, lr, lr_aff, mask = scene
    obj, cons = qc.assess(hr, np.eye(4), lr, lr_aff, input_mask=mask)
    text = json.dumps(obj, allow_nan=False)  # no NaN/Infinity in a sidecar
    assert json.loads(text) == obj
    assert obj["Consistency"]["PSNR"] == qc.PSNR_CAP_DB
    assert obj["Sharpness"]["Output"]["ThroughPlaneAxis"] == 2
    assert obj["Sharpness"]["Output"]["Ratio"] > obj["Sharpness"]["Input"]["Ratio"]
    assert cons.residual.shape == lr.shape
    flat = qc.flatten(obj)
    assert set(flat) == set(qc.TSV_COLUMNS)
    assert flat["qc_psnr_db"] == qc.PSNR_CAP_DB
    assert flat["qc_sharpness_ratio_input"] == obj["Sharpness"]["Input"]["Ratio"]
    assert qc.flatten(None) == dict.fromkeys(qc.TSV_COLUMNS)


def test_output_through_axis_follows_the_input_slice_direction(scene):
    hr, _, _, _ = scene
    sag_aff = np.diag([4.0, 1.0, 1.0, 1.0])
    sag_aff[0, 3] = 1.5
    sag = acquire(hr, np.eye(4), (10, 40, 40), sag_aff)
    obj, _ = qc.assess(hr, np.eye(4), sag, sag_aff, input_mask=sag > 50)
    assert obj["Sharpness"]["Input"]["ThroughPlaneAxis"] == 0
    assert obj["Sharpness"]["Output"]["ThroughPlaneAxis"] == 0
    assert qc.nearest_axis(np.eye(4), np.array([0.1, 0.2, -0.97])) == 2


def test_robust_outliers():
    values = [10.0, 10.5, 9.8, 10.2, 10.1, 2.0, None, 25.0]
    assert qc.robust_outliers(values) == ["", "", "", "", "", "low", "", "high"]
    # More than half identical: MAD = 0, the mean-absolute-deviation scale takes over.
    assert qc.robust_outliers([30, 30, 30, 30, 30, 30, 80]) == [""] * 6 + ["high"]
    assert qc.robust_outliers([5, 5, 5, 5]) == [""] * 4  # no spread, no flags
    assert qc.robust_outliers([1.0, 100.0]) == ["", ""]  # too few to judge
    assert qc.robust_outliers([float("nan"), 1.0, 1.1, 0.9, 9.0])[0] == ""
