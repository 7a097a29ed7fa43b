"""Cubic-spline resampling and slice-profile re-acquisition."""

import numpy as np
import pytest

from bids_mcsr.benchmark.simulate import simulate_acquisition
from bids_mcsr.resample import acquire, profile_offsets, resample_to_grid


def _ramp(shape):
    i, j, k = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    return 2 * i + 3 * j - k + 5


def test_resample_identity_grid_is_exact():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 7, 8)).astype(np.float32)
    out = resample_to_grid(data, np.eye(4), data.shape, np.eye(4), order=3)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, data, atol=1e-5)


def test_resample_linear_function_and_outside_fov():
    hr = _ramp((8, 8, 8))
    shift = np.eye(4)
    shift[:3, 3] = [0.5, 0, 0]  # output voxel i sits at input coordinate i + 0.5
    out = resample_to_grid(hr, np.eye(4), (8, 8, 8), shift, order=1, cval=-1)
    np.testing.assert_allclose(out[:7], hr[:7] + 1.0, atol=1e-6)  # slope 2 in i
    shift[:3, 3] = [1.0, 0, 0]  # last output voxel at i = 8: beyond the FOV edge (7.5)
    out = resample_to_grid(hr, np.eye(4), (8, 8, 8), shift, order=1, cval=-1)
    np.testing.assert_allclose(out[:7], hr[1:], atol=1e-6)
    assert np.all(out[7] == -1)


def test_resample_chunking_does_not_change_result():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(9, 9, 9))
    a = np.diag([0.5, 0.5, 0.5, 1.0])
    full = resample_to_grid(data, np.eye(4), (16, 16, 16), a, order=3)
    chunked = resample_to_grid(data, np.eye(4), (16, 16, 16), a, order=3, chunk=777)
    np.testing.assert_array_equal(full, chunked)


def test_profile_offsets_span_slice():
    lr = np.diag([1.0, 1.0, 4.0, 1.0])
    off = profile_offsets(lr, 2, 4)
    np.testing.assert_allclose(off[:, 2], [-1.5, -0.5, 0.5, 1.5])
    np.testing.assert_allclose(off[:, :2], 0)


def test_acquire_box_matches_block_average_simulation():
    rng = np.random.default_rng(2)
    hr = rng.normal(size=(8, 8, 16))
    lr, lr_aff = simulate_acquisition(hr, np.eye(4), (1, 1, 4), mode="profile")
    re = acquire(hr, np.eye(4), lr.shape, lr_aff, profile="box", order=1)
    np.testing.assert_allclose(re, lr, atol=1e-5)
    point = acquire(hr, np.eye(4), lr.shape, lr_aff, profile="point", order=1)
    # Point sampling at coarse centres (HR index 4k + 1.5) = mean of the two middle voxels.
    np.testing.assert_allclose(point, (hr[:, :, 1::4] + hr[:, :, 2::4]) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="profile"):
        acquire(hr, np.eye(4), lr.shape, lr_aff, profile="gauss")
