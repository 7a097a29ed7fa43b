"""The dense multi-resolution grid encoding (bids_mcsr/inr/grid.py)."""

import numpy as np
import pytest
import torch

from bids_mcsr.inr import grid as grid_module
from bids_mcsr.inr.encoding import ENCODINGS, build_encoding
from bids_mcsr.inr.grid import DenseGridEncoding, level_resolutions, reach_strength


def test_level_resolutions_are_geometric_between_the_bounds():
    assert level_resolutions(4, 8, 64) == [8, 16, 32, 64]
    assert level_resolutions(1, 8, 64) == [64]
    res = level_resolutions(5, 16, 113)
    assert res[0] == 16 and res[-1] == 113 and res == sorted(res)


@pytest.mark.parametrize("args", [(0, 8, 64), (3, 1, 64), (3, 64, 8)])
def test_bad_level_settings_raise(args):
    with pytest.raises(ValueError, match="dense-grid"):
        level_resolutions(*args)


def test_registered_and_output_shape():
    assert "dense-grid" in ENCODINGS
    enc = build_encoding(
        "dense-grid",
        {"n_levels": 3, "base_resolution": 4, "max_resolution": 16, "features_per_level": 2},
    )
    assert enc.out_dim == 6
    # channels-last (z, y, x, feature)
    assert [lvl.shape for lvl in enc.levels] == [(r, r, r, 2) for r in (4, 8, 16)]
    out = enc(torch.rand(257, 3) * 2 - 1)
    assert out.shape == (257, 6) and out.dtype == torch.float32


def test_trilinear_lookup_is_exact_for_linear_fields_and_follows_xyz_order():
    enc = DenseGridEncoding(n_levels=1, base_resolution=5, max_resolution=5, features_per_level=3)
    node = torch.linspace(-1, 1, 5)
    with torch.no_grad():
        level = enc.levels[0]
        # storage is (z, y, x, F): feature 0 = x, 1 = y, 2 = 2x - y + 3z
        zz, yy, xx = torch.meshgrid(node, node, node, indexing="ij")
        level[..., 0], level[..., 1], level[..., 2] = xx, yy, 2 * xx - yy + 3 * zz
    pts = torch.rand(1000, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = enc(pts)
    expected = torch.stack([pts[:, 0], pts[:, 1], 2 * pts[:, 0] - pts[:, 1] + 3 * pts[:, 2]], 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # Outside the cube the border value is read (no zero padding).
    far = enc(torch.tensor([[3.0, 0.0, 0.0]]))
    assert far[0, 0].item() == pytest.approx(1.0)


def test_lookup_matches_grid_sample_inside_and_outside_the_cube():
    # F.grid_sample (align_corners, border padding) is the reference trilinear
    # interpolation the gather-based lookup replaces.
    torch.manual_seed(2)
    enc = DenseGridEncoding(n_levels=2, base_resolution=6, max_resolution=11, features_per_level=3)
    pts = torch.rand(2000, 3) * 2.4 - 1.2  # some points outside [-1, 1]
    expected = torch.cat(
        [
            torch.nn.functional.grid_sample(
                level.detach().permute(3, 0, 1, 2)[None],
                pts.reshape(1, -1, 1, 1, 3),
                mode="bilinear",
                padding_mode="border",
                align_corners=True,
            )
            .reshape(3, -1)
            .T
            for level in enc.levels
        ],
        dim=1,
    )
    torch.testing.assert_close(enc(pts).detach(), expected, atol=1e-6, rtol=0)


def test_gradient_reaches_only_the_eight_neighbouring_nodes_with_unit_total_weight():
    enc = DenseGridEncoding(n_levels=2, base_resolution=5, max_resolution=9, features_per_level=1)
    enc(torch.tensor([[0.1, -0.3, 0.45]])).sum().backward()
    for level in enc.levels:
        g = level.grad.numpy()
        assert np.count_nonzero(g) == 8
        assert g.sum() == pytest.approx(1.0, abs=1e-6) and (g >= 0).all()


def test_lookup_and_its_gradients_equal_autograd_indexing_on_dense_and_restricted_levels():
    # The lookup's own backward (index_select forward, sorted accumulation backward)
    # must give exactly what autograd gives for table[index] * weights.
    torch.manual_seed(5)
    enc = DenseGridEncoding(n_levels=3, base_resolution=4, max_resolution=13, features_per_level=2)
    r = enc.resolutions[2][0]
    node = torch.linspace(-1, 1, r)
    zz, yy, xx = torch.meshgrid(node, node, node, indexing="ij")
    enc.restrict_(2, xx**2 + yy**2 + zz**2 < 0.6)
    pts = torch.rand(3000, 3) * 2.2 - 1.1
    upstream = torch.randn(3000, enc.out_dim)
    (enc(pts) * upstream).sum().backward()
    reference = [level.detach().clone().requires_grad_(True) for level in enc.levels]
    parts = []
    for k, table in enumerate(reference):
        index, weights = grid_module._corner_weights(pts, enc.resolutions[k])
        if k == 2:
            index = enc.node_rows_2[index]
            weights = weights * (index >= 0)
            rows = table[index.clamp(min=0)]
        else:
            rows = table.reshape(-1, 2)[index]
        parts.append((rows * weights[..., None]).sum(dim=1))
    expected = torch.cat(parts, dim=1)
    assert torch.equal(enc(pts).detach(), expected.detach())
    (expected * upstream).sum().backward()
    for level, ref in zip(enc.levels, reference, strict=True):
        assert level.grad.shape == ref.shape
        # float32 sums of ~1000 terms per coarse node, possibly in another order
        scale = ref.grad.abs().max().item()
        torch.testing.assert_close(level.grad, ref.grad, atol=1e-5 * scale, rtol=1e-5)
    assert enc.levels[2].grad.abs().sum() > 0 and enc.levels[0].grad.abs().sum() > 0


def test_initialisation_is_seeded_and_outputs_deterministic():
    params = {"n_levels": 3, "base_resolution": 4, "max_resolution": 16, "init_std": 0.1}
    torch.manual_seed(5)
    a = build_encoding("dense-grid", params)
    torch.manual_seed(5)
    b = build_encoding("dense-grid", params)
    pts = torch.rand(300, 3) * 2 - 1
    assert torch.equal(a(pts), b(pts))
    assert 0.05 < float(a.levels[-1].detach().std()) < 0.15


def _phantom(n=32):
    """Two contrasts of one smooth tissue map in a ball, 4 mm box slices along axes 2 and 0."""
    from scipy import ndimage

    from bids_mcsr.resample import acquire

    rng = np.random.default_rng(0)
    t = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 3.0)
    t = np.tanh(1.5 * t / t.std())
    g = np.indices((n, n, n)) - (n - 1) / 2
    ball = (g**2).sum(0) <= (0.42 * n) ** 2
    hr = {
        "A": np.where(ball, 1.0 + 0.5 * t, 0.0).astype(np.float32),
        "B": np.where(ball, 120 - 60 * t + 30 * t**2, 0.0).astype(np.float32),
    }
    lr = {}
    for name, axis in (("A", 2), ("B", 0)):
        shape, aff = [n, n, n], np.eye(4)
        shape[axis] //= 4
        aff[axis, axis], aff[axis, 3] = 4.0, 1.5  # LR voxel k covers HR voxels 4k .. 4k+3
        lr[name] = (acquire(hr[name], np.eye(4), shape, aff, profile="box"), aff)
    return hr, lr, ball


def test_fast_preset_beats_cubic_spline_on_a_phantom():
    from bids_mcsr.inr.fit import Contrast, fit_contrasts
    from bids_mcsr.resample import resample_to_grid

    hr, lr, ball = _phantom()
    shape = ball.shape
    # A 32^3 phantom has 16k LR voxels: as it is, the preset's batch of 8192 would
    # give 2 steps per epoch; min_steps_per_epoch shrinks the batch to 64 instead.
    result = fit_contrasts(
        [Contrast(n, *lr[n]) for n in ("A", "B")],
        shape,
        np.eye(4),
        preset="fast",
        overrides={"early_stopping": False},
        nthreads=1,
        progress=False,
    )
    assert result.config["encoding"] == "dense-grid"
    assert result.config["batch_size_used"] == [64]
    for name in ("A", "B"):
        ref = hr[name][ball]
        spline = resample_to_grid(*lr[name], shape, np.eye(4), order=3)[ball]
        fit = result.volumes[name][ball]
        gain = 10 * np.log10(np.mean((spline - ref) ** 2) / np.mean((fit - ref) ** 2))
        assert gain > 2.0, f"{name}: fast preset only {gain:+.2f} dB over cubic spline"


def test_diffusion_moves_nodes_toward_their_neighbour_mean_and_keeps_linear_fields():
    enc = DenseGridEncoding(n_levels=1, base_resolution=5, max_resolution=5, features_per_level=1)
    with torch.no_grad():
        enc.levels[0].zero_()
        enc.levels[0][2, 2, 2, 0] = 6.0  # one spike in the interior
    enc.diffuse_(0.5)
    level = enc.levels[0].detach()[..., 0]
    # the spike keeps half its value; each of its 6 neighbours gets (0.5 / 6) * 6
    assert float(level[2, 2, 2]) == pytest.approx(3.0)
    for d in [(1, 2, 2), (3, 2, 2), (2, 1, 2), (2, 3, 2), (2, 2, 1), (2, 2, 3)]:
        assert float(level[d]) == pytest.approx(0.5)
    assert float(level.sum()) == pytest.approx(6.0)  # mirror boundaries conserve the total
    # a field linear along one axis is a fixed point away from the boundary faces
    node = torch.arange(5.0)
    with torch.no_grad():
        enc.levels[0][..., 0] = node[:, None, None].expand(5, 5, 5)
    enc.diffuse_(1.0)
    assert torch.allclose(
        enc.levels[0].detach()[1:4, ..., 0], node[1:4, None, None].expand(3, 5, 5)
    )


@pytest.mark.parametrize(
    "bad", [{"diffusion": 1.5}, {"diffusion_every": 0}, {"diffusion_reach": -1.0}]
)
def test_diffusion_settings_are_validated(bad):
    from bids_mcsr.inr.presets import resolve

    with pytest.raises(ValueError, match=next(iter(bad))):
        resolve("fast", bad)


@pytest.mark.parametrize(
    ("encoding", "thickness", "reach", "applied"),
    [
        ("dense-grid", None, 0.0, True),  # uniform diffusion: every node, any slices
        ("dense-grid", 1.0, 1.0, True),  # point samples 4 mm apart leave fine nodes out
        ("dense-grid", None, 1.0, False),  # contiguous 4 mm box slices reach every node
        ("fourier", None, 0.0, False),  # no nodes to diffuse
    ],
)
def test_diffusion_applied_is_recorded(encoding, thickness, reach, applied):
    from bids_mcsr.inr.fit import Contrast, fit_contrasts

    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    data = np.random.default_rng(0).random((8, 8, 2)).astype(np.float32)
    params = {} if encoding == "dense-grid" else {"n_frequencies": 8}
    res = fit_contrasts(
        [Contrast("A", data, aff, slice_thickness=thickness)],
        (8, 8, 8),
        np.eye(4),
        preset="fast",
        architecture="single",
        overrides={
            "encoding": encoding,
            "encoding_params": params,
            "epochs": 1,
            "diffusion": 0.3,
            "diffusion_reach": reach,
        },
        nthreads=1,
        progress=False,
    )
    assert res.config["diffusion_applied"] is applied


def test_reach_sums_each_points_trilinear_weights_on_its_eight_nodes():
    enc = DenseGridEncoding(n_levels=2, base_resolution=5, max_resolution=9, features_per_level=1)
    # node spacing 0.5 on the coarse level: (0.25, 0, 0) sits halfway between x-nodes 2 and 3
    pts = torch.tensor([[0.25, 0.0, 0.0], [0.0, 0.0, 0.0]])
    coarse, fine = enc.reach(pts, torch.tensor([1.0, 2.0]))
    assert coarse.shape == (5, 5, 5) and fine.shape == (9, 9, 9)
    assert float(coarse[2, 2, 2]) == pytest.approx(0.5 + 2.0)  # [z, y, x]
    assert float(coarse[2, 2, 3]) == pytest.approx(0.5)
    assert float(coarse.sum()) == pytest.approx(3.0) and int((coarse > 0).sum()) == 2
    # the same weights as the lookup's gradient (one unit per point, 8 nodes each)
    many = torch.rand(500, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1
    enc(many).sum().backward()
    for level, reach in zip(enc.levels, enc.reach(many), strict=True):
        torch.testing.assert_close(reach, level.grad[..., 0])


def test_reach_strength_ramps_from_untouched_to_threshold():
    reach = [torch.tensor([[[0.0, 0.25, 0.5, 2.0]]])]
    (s,) = reach_strength(reach, 0.5)
    assert s.shape == (1, 1, 4, 1)
    assert s[..., 0].flatten().tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="threshold"):
        reach_strength(reach, 0.0)


def test_diffusion_with_strength_moves_only_the_weak_nodes():
    enc = DenseGridEncoding(n_levels=1, base_resolution=5, max_resolution=5, features_per_level=2)
    with torch.no_grad():
        enc.levels[0].zero_()
        enc.levels[0][2, 2, 2] = 6.0
    strength = torch.zeros(5, 5, 5, 1)
    strength[2, 2, 3] = 1.0  # one neighbour of the spike may move, nothing else
    enc.diffuse_(0.6, [strength])
    level = enc.levels[0].detach()
    assert level[2, 2, 3].tolist() == pytest.approx([0.6, 0.6])  # 0.6 x (mean 1 - 0)
    assert level[2, 2, 2].tolist() == [6.0, 6.0]
    assert float(level.abs().sum()) == pytest.approx(12.0 + 1.2)
    before = level.clone()
    enc.diffuse_(1.0, [None])  # None: that level is left alone
    assert torch.equal(enc.levels[0].detach(), before)


def test_restricted_level_reads_its_values_where_stored_and_zero_elsewhere():
    torch.manual_seed(3)
    enc = DenseGridEncoding(n_levels=2, base_resolution=4, max_resolution=9, features_per_level=2)
    pts = torch.rand(3000, 3, generator=torch.Generator().manual_seed(4)) * 2 - 1
    before = enc(pts)
    dense_fine = enc.levels[1].detach().clone()
    # keep the nodes with x index <= 4 (normalised x <= 0) of the 9^3 finest level
    active = torch.zeros(9, 9, 9, dtype=torch.bool)
    active[..., :5] = True
    assert enc.restrict_(1, active) == 9 * 9 * 5
    assert enc.levels[1].shape == (405, 2) and enc.levels[0].shape == (4, 4, 4, 2)
    after = enc(pts)
    # the coarse level is untouched; on the fine level cells with all 8 corners stored
    # read as before, cells with none read 0
    torch.testing.assert_close(after[:, :2], before[:, :2])
    left, right = pts[:, 0] <= 0, pts[:, 0] > 0.25
    torch.testing.assert_close(after[left, 2:], before[left, 2:])
    assert torch.all(after[right, 2:] == 0)
    # gradients reach only the stored rows; diffusion leaves the table alone
    after[:, 2:].sum().backward()
    assert enc.levels[1].grad.shape == (405, 2) and enc.levels[1].grad.abs().sum() > 0
    table = enc.levels[1].detach().clone()
    enc.diffuse_(1.0)
    torch.testing.assert_close(enc.levels[1].detach(), table)
    torch.testing.assert_close(table.view(9, 9, 5, 2), dense_fine[..., :5, :])
    # the node grid is still counted on (reach), and the buffers follow state_dict
    assert enc.reach(pts, levels=[1])[1].shape == (9, 9, 9)
    assert "node_rows_1" in enc.state_dict() and enc.node_rows_1.dtype == torch.int32
    with pytest.raises(ValueError, match="unrestricted level"):
        enc.restrict_(1, active)


def test_per_axis_finest_spacing_gives_anisotropic_levels_with_exact_lookup():
    # 16 mm half extent: coarsest 8 mm (5 nodes); finest 1 mm in x, 2 mm in y, 8 mm in z
    enc = DenseGridEncoding(
        n_levels=2,
        features_per_level=3,
        coarsest_mm=8.0,
        finest_mm=(1.0, 2.0, 8.0),
        half_extent_mm=16.0,
    )
    assert enc.resolutions == [(5, 5, 5), (33, 17, 5)]
    assert enc.levels[1].shape == (5, 17, 33, 3)  # stored [z, y, x, feature]
    with torch.no_grad():
        zz, yy, xx = torch.meshgrid(
            torch.linspace(-1, 1, 5),
            torch.linspace(-1, 1, 17),
            torch.linspace(-1, 1, 33),
            indexing="ij",
        )
        level = enc.levels[1]
        level[..., 0], level[..., 1], level[..., 2] = xx, yy, 2 * xx - yy + 3 * zz
    pts = torch.rand(1000, 3, generator=torch.Generator().manual_seed(6)) * 2 - 1
    expected = torch.stack([pts[:, 0], pts[:, 1], 2 * pts[:, 0] - pts[:, 1] + 3 * pts[:, 2]], 1)
    torch.testing.assert_close(enc(pts)[:, 3:], expected, atol=1e-5, rtol=0)
    # a point's gradient lands on 8 nodes with total weight 1; reach counts the same
    enc(torch.tensor([[0.1, -0.3, 0.45]]))[:, 3].sum().backward()
    g = enc.levels[1].grad[..., 0]
    assert np.count_nonzero(g.numpy()) == 8 and g.sum().item() == pytest.approx(1.0)
    reach = enc.reach(pts, levels=[1])[1]
    assert reach.shape == (5, 17, 33) and reach.sum().item() == pytest.approx(1000.0, rel=1e-5)
    # restriction takes a (Rz, Ry, Rx) mask; stored cells read as before
    before = enc(pts).detach()
    active = torch.zeros(5, 17, 33, dtype=torch.bool)
    active[..., :17] = True  # x <= 0
    assert enc.restrict_(1, active) == 5 * 17 * 17
    left = pts[:, 0] <= 0
    torch.testing.assert_close(enc(pts)[left].detach(), before[left])
    with pytest.raises(ValueError, match=r"\(5, 17, 33\) mask"):
        DenseGridEncoding(
            n_levels=2, coarsest_mm=8.0, finest_mm=(1.0, 2.0, 8.0), half_extent_mm=16.0
        ).restrict_(1, torch.ones(33, 17, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="1 or 3 spacings"):
        DenseGridEncoding(coarsest_mm=8.0, finest_mm=(1.0, 2.0), half_extent_mm=16.0)


def test_coordinate_gradient_matches_finite_differences_on_dense_and_restricted_levels():
    torch.manual_seed(0)
    enc = DenseGridEncoding(
        n_levels=3, base_resolution=4, max_resolution=9, features_per_level=2, init_std=1.0
    ).double()
    x = (torch.rand(6, 3, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    scale = torch.arange(1.0, 7.0, dtype=torch.float64)[:, None]
    assert torch.autograd.gradcheck(lambda p: enc(p) * scale, (x,), eps=1e-6, atol=1e-6)
    enc.restrict_(2, torch.rand(9, 9, 9) > 0.3)
    assert torch.autograd.gradcheck(lambda p: enc(p) * scale, (x,), eps=1e-6, atol=1e-6)


def test_data_coordinates_build_no_coordinate_graph():
    enc = DenseGridEncoding(n_levels=2, base_resolution=4, max_resolution=8)
    out = enc(torch.rand(10, 3) * 2 - 1)
    out.sum().backward()
    assert all(level.grad is not None for level in enc.levels)
    inner = out.grad_fn.next_functions
    # the weights enter the lookup as constants: only the tables have a graph
    assert sum(fn is not None for fn, _ in inner) == len(enc.levels)
