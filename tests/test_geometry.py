"""Affines, slice axes, through-plane directions, output grids, normalisation."""

import numpy as np
import pytest

from bids_mcsr import geometry as g


def _affine(sizes, rot=None, origin=(0.0, 0.0, 0.0)):
    rot = np.eye(3) if rot is None else rot
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(sizes)
    a[:3, 3] = origin
    return a


def _rot(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


@pytest.mark.parametrize(
    ("sizes", "axis", "plane"),
    [
        ((1, 1, 4), 2, "axial"),
        ((1, 4, 1), 1, "coronal"),
        ((4, 1, 1), 0, "sagittal"),
        ((0.72, 0.72, 3.0), 2, "axial"),
    ],
)
def test_slice_axis_and_plane_ras(sizes, axis, plane):
    a = _affine(sizes)
    assert g.slice_axis(a) == axis
    assert g.through_plane(a) == (plane, pytest.approx(0.0, abs=1e-6))
    assert g.is_anisotropic(a)


def test_plane_follows_world_not_voxel_axis():
    # Voxel axes permuted (slices along voxel axis 0 but stacked along world z)
    # and flipped (LPS-like storage): still axial.
    perm = np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0]], float)
    a = _affine((4, 1, 1), rot=perm)
    assert g.slice_axis(a) == 0
    assert g.through_plane(a)[0] == "axial"
    np.testing.assert_allclose(np.abs(g.slice_direction(a)), [0, 0, 1], atol=1e-12)


def test_oblique_affine_reports_angle():
    a = _affine((1, 1, 5), rot=_rot((1, 0, 0), 20))
    plane, angle = g.through_plane(a)
    assert plane == "axial"
    assert angle == pytest.approx(20.0, abs=1e-6)
    a = _affine((1, 1, 5), rot=_rot((0, 1, 0), 60))  # tilted past 45 deg: sagittal
    assert g.through_plane(a) == ("sagittal", pytest.approx(30.0, abs=1e-6))


def test_isotropic_is_not_anisotropic():
    assert not g.is_anisotropic(_affine((1, 1, 1.4)))
    assert g.anisotropy(_affine((1, 1, 1.4))) == pytest.approx(1.4)


def test_voxel_world_round_trip():
    a = _affine((0.7, 0.8, 3.0), rot=_rot((1, 2, 3), 17), origin=(-90, 10, 5))
    ijk = np.array([[0, 0, 0], [3.5, 2, 1], [10, 20, 30]], float)
    np.testing.assert_allclose(g.world_to_voxel(g.voxel_to_world(ijk, a), a), ijk, atol=1e-10)
    centres = g.voxel_centres((2, 3, 4), a)
    assert centres.shape == (24, 3)
    np.testing.assert_allclose(centres[0], a[:3, 3])
    np.testing.assert_allclose(centres[-1], g.voxel_to_world([[1, 2, 3]], a)[0])


def test_world_bounds_include_half_voxels():
    lo, hi = g.world_bounds((10, 10, 4), _affine((1, 1, 4)))
    np.testing.assert_allclose(lo, [-0.5, -0.5, -2.0])
    np.testing.assert_allclose(hi, [9.5, 9.5, 14.0])


def _on_lattice(out_affine, ref_affine, steps):
    """Output voxel centres in reference voxel units are whole multiples of ``steps``."""
    shape = (3, 4, 5)
    idx = g.voxel_grid(shape)
    ref_vox = g.world_to_voxel(g.voxel_to_world(idx, out_affine), ref_affine) / np.asarray(steps)
    np.testing.assert_allclose(ref_vox, np.round(ref_vox), atol=1e-9)


def test_output_grid_lies_on_the_reference_lattice_and_covers_the_union():
    # A scanner-placed axial reference (slice centres at 1.37 mm + 4k) and a
    # sagittal partner whose centres sit elsewhere (0.25 mm + 4k).
    axial = ((160, 224, 40), _affine((1, 1, 4), origin=(-80.0, -112.0, 1.37)))
    sagittal = ((41, 224, 161), _affine((4, 1, 1), origin=(-81.75, -112.0, -0.6)))
    shape, a = g.output_grid([axial, sagittal], 1.0)
    np.testing.assert_allclose(g.voxel_sizes(a), [1, 1, 1])
    # In-plane: output centres are the reference's voxel centres; through the
    # slices every 4th output voxel is a slice centre.
    _on_lattice(a, axial[1], (1.0, 1.0, 0.25))
    first_in_ref = g.lattice_offset(a, axial[1])
    assert first_in_ref[2] * 4 == pytest.approx(round(first_in_ref[2] * 4))
    # Every input's field of view is covered by whole output voxels, with no
    # voxel to spare.
    lo, hi = g.world_bounds(shape, a)
    for s, aff in (axial, sagittal):
        ilo, ihi = g.world_bounds(s, aff)
        assert (lo <= ilo + 1e-9).all() and (hi >= ihi - 1e-9).all()
    union_lo = np.minimum(*(g.world_bounds(*x)[0] for x in (axial, sagittal)))
    union_hi = np.maximum(*(g.world_bounds(*x)[1] for x in (axial, sagittal)))
    assert ((lo + 1.0 > union_lo) & (hi - 1.0 < union_hi)).all()
    # x: the partner spans [-83.75, 80.25] mm, the reference [-80.5, 79.5]: centres
    # -84 .. 80 on the reference's lattice.
    assert shape[0] == 165 and a[0, 3] == pytest.approx(-84.0)
    # The reference alone at its own in-plane spacing is its own in-plane grid.
    shape1, a1 = g.output_grid([axial], 1.0)
    assert shape1[:2] == (160, 224) and shape1[2] == 161
    np.testing.assert_allclose(a1[:2, 3], axial[1][:2, 3])
    assert a1[2, 3] == pytest.approx(1.37 - 2.0)


def test_output_grid_follows_reference_axes():
    rot = _rot((0, 0, 1), 30)
    ref = ((20, 20, 5), _affine((1, 1, 4), rot=rot, origin=(3.3, -2.1, 0.4)))
    shape, a = g.output_grid([ref], 2.0)
    np.testing.assert_allclose(g.rotation_of(a), rot, atol=1e-12)
    _on_lattice(a, ref[1], (2.0, 2.0, 0.5))
    # The FOV [-0.5, 19.5] mm from voxel 0's centre needs 11 voxels of 2 mm on that
    # lattice (centres 0..20); the slices' [-2, 18] needs centres -2..18.
    assert shape == (11, 11, 11)
    with pytest.raises(ValueError, match="resolution"):
        g.output_grid([ref], 0)


def test_normaliser_one_scale_for_all_axes():
    n = g.CoordinateNormaliser.from_inputs([((100, 50, 10), _affine((1, 1, 2)))])
    assert n.half_extent == pytest.approx(50.0)
    out = n(np.array([[-0.5, -0.5, -1.0], [99.5, 49.5, 19.0]]))
    np.testing.assert_allclose(out, [[-1, -0.5, -0.2], [1, 0.5, 0.2]], atol=1e-6)
    assert n.scale_mm(5.0) == pytest.approx(0.1)


def test_compose_applies_transform_first_in_world():
    shift = np.eye(4)
    shift[:3, 3] = [1, 2, 3]
    a = _affine((1, 1, 4))
    np.testing.assert_allclose(g.compose(shift, a)[:3, 3], [1, 2, 3])
    np.testing.assert_allclose(g.compose(None, a), a)


def test_mapped_coordinate_matches_voxel_to_world():
    a = _affine((1.0, 1.2, 4.0), _rot((1, 0, 0), 11.0), origin=(3.0, -2.0, 7.0))
    b = _affine((0.9, 0.9, 0.9), _rot((0, 1, 1), -5.0), origin=(-1.0, 4.0, 2.0))
    shape = (4, 5, 3)
    m = g.voxel_map(a, b)
    ijk = g.voxel_grid(shape)
    expected = g.world_to_voxel(g.voxel_to_world(ijk + [0.25, 0.0, -0.5], a), b)
    for axis in range(3):
        got = g.mapped_coordinate(shape, m, axis, shift=(0.25, 0.0, -0.5))
        assert got.shape == shape
        np.testing.assert_allclose(got.ravel(), expected[:, axis], atol=1e-9)
    # a slab that starts at i = 2 is rows 2.. of the whole grid
    np.testing.assert_allclose(
        g.mapped_coordinate((2, 5, 3), m, 1, start=2), g.mapped_coordinate(shape, m, 1)[2:4]
    )
