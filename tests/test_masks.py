"""Foreground masks, skull-stripped detection, output-grid mask and --mask files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_mcsr.geometry import voxel_sizes
from bids_mcsr.masks import (
    ellipsoid,
    foreground_mask,
    is_skull_stripped,
    load_mask,
    output_mask,
    resample_mask,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def phantom(noise: bool, seed: int = 0):
    """A thick-slice (1x1x4 mm) 'head': bright ellipsoid shell with a darker core,
    a dark cavity inside, on a zero or noisy background. Returns data, affine, truth."""
    rng = np.random.default_rng(seed)
    shape = (64, 64, 16)
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = np.sqrt(((x - 32) / 24.0) ** 2 + ((y - 32) / 20.0) ** 2 + ((z - 8) * 4 / 22.0) ** 2)
    head = r <= 1.0
    data = np.where(head, 100.0, 0.0)
    data[r < 0.8] = 60.0
    cavity = ((x - 32) ** 2 + (y - 32) ** 2 < 36) & (np.abs(z - 8) <= 1)
    data[cavity] = 5.0  # dark (CSF-like) region inside the object
    if noise:  # Rician-like magnitude noise everywhere
        data = np.hypot(data + rng.normal(0, 4, shape), rng.normal(0, 4, shape))
    return data.astype(np.float32), affine, head


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_ellipsoid_radius_is_in_mm_per_axis():
    se = ellipsoid(4.0, [1.0, 1.0, 4.0])
    assert se.shape == (9, 9, 3)
    assert se[4, 4, 0] and se[4, 4, 2] and not se[0, 4, 0]


@pytest.mark.parametrize("noise", [False, True])
def test_foreground_mask_recovers_thick_slice_phantom(noise):
    data, affine, head = phantom(noise)
    mask = foreground_mask(data, affine)
    assert mask.dtype == bool and mask.shape == data.shape
    assert dice(mask, head) > 0.95
    assert mask[32, 32, 8]  # the dark cavity is filled
    assert not mask[:4].any() and not mask[:, :4].any()  # background stays out


def test_foreground_mask_of_constant_image_is_empty():
    assert not foreground_mask(np.full((8, 8, 8), 7.0)).any()


def test_skull_stripped_detection_on_phantom():
    stripped, affine, _ = phantom(noise=False)
    raw, _, _ = phantom(noise=True)
    assert is_skull_stripped(stripped, affine=affine)
    assert not is_skull_stripped(raw, affine=affine)


def test_resample_mask_follows_world_shift():
    mask = np.zeros((20, 20, 20), bool)
    mask[5:10, 5:10, 5:10] = True
    affine = np.eye(4)
    moved = affine.copy()
    moved[0, 3] = 3.0  # the same voxels sit 3 mm further along +x
    out = resample_mask(mask, moved, mask.shape, affine)
    assert out[8:13, 5:10, 5:10].all() and out.sum() == mask.sum()


def test_output_mask_is_union_of_inputs_on_output_grid():
    a = np.zeros((10, 10, 5), bool)
    a[:5] = True
    aff_a = np.diag([2.0, 2.0, 4.0, 1.0])  # covers x in [-1, 19] mm, first half true
    b = np.zeros((5, 10, 10), bool)
    b[3:] = True
    aff_b = np.diag([4.0, 2.0, 2.0, 1.0])  # thick in x; true for x in [10, 18] mm
    out_affine = np.eye(4)
    out = output_mask([(a, aff_a), (b, aff_b)], (20, 20, 20), out_affine)
    assert out[2, 5, 5] and out[8, 5, 5] and out[11, 5, 5] and out[16, 5, 5]
    assert not out[9, 5, 5] and not out[10, 5, 5]  # between a's edge (9 mm) and b's (10 mm)
    # Union: every voxel true in either resampled mask, and nothing else.
    ua = resample_mask(a, aff_a, out.shape, out_affine)
    ub = resample_mask(b, aff_b, out.shape, out_affine)
    np.testing.assert_array_equal(out, ua | ub)
    assert (out & ~ua).any() and (out & ~ub).any()


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_load_mask_accepts_reference_grid(tmp_path):
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    data = np.zeros((6, 6, 3), np.uint8)
    data[2:4, 2:4, 1] = 1
    mask = load_mask(_write(tmp_path / "m.nii.gz", data, affine), (6, 6, 3), affine)
    assert mask.dtype == bool and mask.sum() == 4


@pytest.mark.parametrize(
    ("shape", "shift", "message"),
    [((6, 6, 4), 0.0, "shape"), ((6, 6, 3), 2.0, "affine differs")],
)
def test_load_mask_rejects_other_grid(tmp_path, shape, shift, message):
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    other = affine.copy()
    other[0, 3] += shift
    path = _write(tmp_path / "brain_mask.nii.gz", np.ones(shape, np.uint8), other)
    with pytest.raises(ValueError, match=message) as info:
        load_mask(path, (6, 6, 3), affine, "sub-01_T1w.nii.gz")
    assert "brain_mask.nii.gz" in str(info.value) and "sub-01_T1w.nii.gz" in str(info.value)
    assert "\n" not in str(info.value)


def test_load_mask_rejects_empty_and_unreadable(tmp_path):
    affine = np.eye(4)
    with pytest.raises(ValueError, match="empty"):
        load_mask(
            _write(tmp_path / "e.nii.gz", np.zeros((4, 4, 4), np.uint8), affine), (4, 4, 4), affine
        )
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not nifti")
    with pytest.raises(ValueError, match="bad.nii.gz"):
        load_mask(bad, (4, 4, 4), affine)


def _real(name: str):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"needs the development data in {SHARED} (../shared/data beside the repo)")
    img = nib.load(path)
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine


@pytest.mark.shared
def test_real_skull_stripped_template_is_detected():
    data, affine = _real("icbm2009c/T1w.nii.gz")
    mask = foreground_mask(data, affine)
    volume_ml = mask.sum() * np.prod(voxel_sizes(affine)) / 1000
    assert 1300 < volume_ml < 2200  # a brain (template space is slightly enlarged)
    assert dice(mask, data > 0) > 0.95
    assert is_skull_stripped(data, mask, affine)


@pytest.mark.shared
def test_real_clinical_head_is_not_skull_stripped():
    data, affine = _real("clinical-ms-patient01/T1w.nii.gz")
    mask = foreground_mask(data, affine)
    volume_ml = mask.sum() * np.prod(voxel_sizes(affine)) / 1000
    assert 1500 < volume_ml < 4000  # a head slab (39 slices of 3 mm), not the brain only
    centre = tuple(n // 2 for n in data.shape)
    assert mask[centre] and not mask[0, 0, centre[2]]
    assert not is_skull_stripped(data, mask, affine)
