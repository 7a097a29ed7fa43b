"""Encodings, fields and presets of the INR engine."""

import json

import pytest
import torch
from torch import nn

from bids_mcsr.inr.encoding import ENCODINGS, FourierFeatures, build_encoding, register_encoding
from bids_mcsr.inr.model import SplitHeadField, VanillaField, build_field
from bids_mcsr.inr.presets import PRESETS, Preset, resolve


def test_fourier_features_shape_range_and_seed():
    torch.manual_seed(0)
    enc = FourierFeatures(n_frequencies=16, sigma=2.0)
    x = torch.rand(50, 3) * 2 - 1
    v = enc(x)
    assert enc.out_dim == 32 and v.shape == (50, 32)
    assert torch.all(v.abs() <= 1)
    # cos^2 + sin^2 = 1 per frequency
    torch.testing.assert_close(v[:, :16] ** 2 + v[:, 16:] ** 2, torch.ones(50, 16))
    torch.manual_seed(0)
    assert torch.equal(FourierFeatures(n_frequencies=16, sigma=2.0).B, enc.B)
    assert enc.B.std().item() == pytest.approx(2.0, rel=0.35)


def test_encoding_registry():
    assert {"fourier", "identity"} <= set(ENCODINGS)
    with pytest.raises(ValueError, match="unknown encoding"):
        build_encoding("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_encoding("fourier")(nn.Identity)

    @register_encoding("test-scaled")
    class Scaled(nn.Module):
        out_dim = 3

        def forward(self, x):
            return 2 * x

    try:
        field = build_field(
            "split-head", build_encoding("test-scaled"), 2, PRESETS["fast"].to_dict()
        )
        assert field(torch.zeros(4, 3)).shape == (4, 2)
    finally:
        del ENCODINGS["test-scaled"]


@pytest.mark.parametrize("cls", ["split-head", "vanilla"])
def test_routed_forward_matches_full_forward(cls):
    torch.manual_seed(0)
    field = build_field(
        cls,
        FourierFeatures(8, 1.0),
        3,
        PRESETS["fast"].to_dict() | {"trunk_width": 32, "head_width": 16},
    )
    x = torch.rand(40, 3) * 2 - 1
    which = torch.randint(0, 3, (40,))
    full = field(x)
    assert full.shape == (40, 3)
    torch.testing.assert_close(field(x, which), full.gather(1, which[:, None]).squeeze(1))


def test_paper_preset_is_the_paper_architecture():
    torch.manual_seed(0)
    p = PRESETS["paper"]
    field = build_field("split-head", build_encoding(p.encoding, p.encoding_params), 2, p.to_dict())
    assert isinstance(field, SplitHeadField) and field.encoding.out_dim == 512
    trunk = [m for m in field.trunk if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in trunk] == [(512, 1024)] + [(1024, 1024)] * 4
    for head in field.heads:
        assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [
            (1024, 512),
            (512, 1),
        ]
    assert (p.batch_size, p.lr, p.epochs, p.schedule, p.profile_samples) == (
        1000,
        4e-4,
        50,
        "cosine",
        1,
    )
    assert p.encoding_params == {"n_frequencies": 256, "sigma": 4.0, "factor": 1.0}
    vanilla = build_field("vanilla", build_encoding(p.encoding, p.encoding_params), 2, p.to_dict())
    assert isinstance(vanilla, VanillaField) and vanilla.out.out_features == 2
    # the paper's units are plain ReLUs everywhere
    for net in (field, vanilla):
        acts = [m for m in net.modules() if isinstance(m, nn.ReLU | nn.LeakyReLU)]
        assert acts and all(type(m) is nn.ReLU for m in acts)


@pytest.mark.parametrize("cls", ["split-head", "vanilla"])
def test_trunk_negative_slope_makes_only_the_trunk_leaky(cls):
    assert PRESETS["fast"].trunk_negative_slope == 0.0
    p = resolve("fast", {"trunk_negative_slope": 0.01})
    field = build_field(cls, FourierFeatures(8, 1.0), 2, p.to_dict())
    trunk_acts = [m for m in field.trunk if not isinstance(m, nn.Linear)]
    assert len(trunk_acts) == p.trunk_layers == 2
    assert all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.01 for m in trunk_acts)
    if cls == "split-head":
        for head in field.heads:
            assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    # a leaky unit passes a gradient where a ReLU passes none (input below 0)
    x = torch.full((1, 32), -1.0, requires_grad=True)
    trunk_acts[0](x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((1, 32), 0.01))
    with pytest.raises(ValueError, match="trunk_negative_slope"):
        resolve("fast", {"trunk_negative_slope": 1.0})


def test_resolve_overrides_merge_and_validate():
    p = resolve(
        "paper", {"epochs": 3, "encoding_params": {"sigma": 1.5}, "weight_decay": {"encoding": 0.1}}
    )
    assert p.epochs == 3 and p.encoding_params["sigma"] == 1.5
    assert p.encoding_params["n_frequencies"] == PRESETS["paper"].encoding_params["n_frequencies"]
    assert p.weight_decay == {"encoding": 0.1, "network": 0.0}
    assert resolve("paper").epochs == 50  # the registry is not modified
    swapped = resolve("fast", {"encoding": "identity"})
    assert swapped.encoding_params == {}
    json.dumps(p.to_dict())
    with pytest.raises(ValueError, match="unknown preset override"):
        resolve("fast", {"epoch": 3})
    with pytest.raises(ValueError, match="batch_size"):
        resolve("fast", {"batch_size": 0})
    with pytest.raises(ValueError, match="unknown preset"):
        resolve("slow")
    assert isinstance(PRESETS["fast"], Preset)
