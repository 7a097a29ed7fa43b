"""Cubic-spline resampling and slice-profile re-acquisition."""

import numpy as np
import pytest

from bids_mcsr.geometry import voxel_map
from bids_mcsr.resample import acquire, inside_fov, profile_offsets, resample_to_grid, sample_world


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


def _oblique(deg: float, sizes, origin) -> np.ndarray:
    t = np.radians(deg)
    a = np.eye(4)
    a[:3, :3] = [[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]] @ np.diag(sizes)
    a[:3, 3] = origin
    return a


def test_resample_to_grid_equals_pointwise_sampling_on_oblique_grids():
    # the grid path (affine_transform in slabs) against sample_world at every voxel centre
    rng = np.random.default_rng(3)
    data = rng.normal(size=(12, 13, 5))
    src = _oblique(9.0, (1.0, 1.0, 4.0), (-6.0, -6.5, -10.0))
    out_affine = _oblique(-4.0, (0.9, 0.9, 0.9), (-8.0, -8.0, -11.0))
    shape = (17, 18, 24)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ out_affine[:3, :3].T + out_affine[:3, 3]
    for order in (0, 1, 3):
        grid = resample_to_grid(data, src, shape, out_affine, order=order, cval=-7.0, chunk=500)
        points = sample_world(data, src, world, order=order, cval=-7.0).reshape(shape)
        np.testing.assert_allclose(grid, points.astype(np.float32), rtol=1e-6, atol=1e-6)
        assert 0 < np.count_nonzero(grid == -7.0) < grid.size  # partly outside the FOV


def test_inside_fov_is_the_outer_voxel_faces():
    # output voxel i sits at input coordinate i - 0.5 + offset along x
    for offset, first_inside in ((0.0, 0), (-0.01, 1)):
        m = np.eye(4)
        m[0, 3] = -0.5 + offset
        inside = inside_fov((4, 2, 2), m, (3, 2, 2))
        # input x spans [-0.5, 2.5]: voxels at -0.5(+offset), 0.5, 1.5, 2.5 are inside
        assert inside[:, 0, 0].tolist() == [i >= first_inside for i in range(4)]
        assert inside.all(axis=(1, 2)).tolist() == inside[:, 0, 0].tolist()
    # a half-voxel shift along z moves a 1-voxel-thick grid out of a 1-voxel FOV's tolerance
    m = voxel_map(np.eye(4), np.eye(4))
    assert inside_fov((1, 1, 1), m, (1, 1, 1), shift=(0, 0, 0.5)).all()
    assert not inside_fov((1, 1, 1), m, (1, 1, 1), shift=(0, 0, 0.51)).any()
    assert inside_fov((1, 1, 1), m, (1, 1, 1), tolerance=0.02, shift=(0, 0, 0.51)).all()
    # start offsets the first axis: voxel 0 of a slab starting at 3 is voxel 3 of the grid
    np.testing.assert_array_equal(
        inside_fov((2, 1, 1), m, (4, 1, 1), start=3)[:, 0, 0], [True, False]
    )


def test_profile_offsets_span_slice():
    lr = np.diag([1.0, 1.0, 4.0, 1.0])
    off = profile_offsets(lr, 2, 4)
    np.testing.assert_allclose(off[:, 2], [-1.5, -0.5, 0.5, 1.5])
    np.testing.assert_allclose(off[:, :2], 0)


def test_acquire_box_matches_block_average():
    rng = np.random.default_rng(2)
    hr = rng.normal(size=(8, 8, 16))
    # 4 mm slices cut to the HR lattice: slice k covers HR voxels 4k .. 4k + 3.
    lr = hr.reshape(8, 8, 4, 4).mean(axis=-1)
    lr_aff = np.diag([1.0, 1.0, 4.0, 1.0])
    lr_aff[2, 3] = 1.5
    re = acquire(hr, np.eye(4), lr.shape, lr_aff, profile="box", order=1)
    np.testing.assert_allclose(re, lr, atol=1e-5)
    point = acquire(hr, np.eye(4), lr.shape, lr_aff, profile="point", order=1)
    # Point sampling at coarse centres (HR index 4k + 1.5) = mean of the two middle voxels.
    np.testing.assert_allclose(point, (hr[:, :, 1::4] + hr[:, :, 2::4]) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="profile"):
        acquire(hr, np.eye(4), lr.shape, lr_aff, profile="gauss")
