"""Neural fields: an encoding followed by MLPs predicting one intensity per contrast.

A field maps ``(M, 3)`` normalised coordinates to ``(M, n_outputs)`` intensities
(normalised scale). ``forward(x, which)`` with ``which`` ``(M,)`` int64 returns
only each row's own output ``(M,)``; the split-head field then runs each head on
its own rows only, which saves the other heads' compute during training.

* ``SplitHeadField``: shared ReLU trunk, one ReLU head per contrast (the paper);
  ``trunk_negative_slope`` > 0 makes the trunk's units leaky (``LeakyReLU``).
* ``VanillaField``: one trunk with ``n_outputs`` linear outputs, no heads
  (the paper's "vanilla INR" ablation; with ``n_outputs=1`` its single-contrast INR).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def mlp(in_dim: int, width: int, n_layers: int, negative_slope: float = 0.0) -> nn.Sequential:
    """``n_layers`` x (Linear + ReLU): ``in_dim -> width -> ... -> width``.

    ``negative_slope`` > 0: ``LeakyReLU`` with that slope instead of ReLU.
    """
    if n_layers < 1:
        raise ValueError("an MLP needs at least one layer")
    layers: list[nn.Module] = []
    for i in range(n_layers):
        act = nn.LeakyReLU(negative_slope) if negative_slope > 0 else nn.ReLU()
        layers += [nn.Linear(in_dim if i == 0 else width, width), act]
    return nn.Sequential(*layers)


class SplitHeadField(nn.Module):
    """Encoding -> shared trunk -> one head per output (McGinnis et al., Fig. 1).

    trunk: ``trunk_layers`` x (Linear + ReLU), width ``trunk_width`` (LeakyReLU with
    ``trunk_negative_slope`` > 0);
    head: ``head_layers`` x (Linear + ReLU) of width ``head_width`` then Linear(.., 1).
    """

    def __init__(
        self,
        encoding: nn.Module,
        n_outputs: int,
        trunk_width: int,
        trunk_layers: int,
        head_width: int,
        head_layers: int = 1,
        trunk_negative_slope: float = 0.0,
    ):
        super().__init__()
        self.encoding = encoding
        self.n_outputs = n_outputs
        self.trunk = mlp(encoding.out_dim, trunk_width, trunk_layers, trunk_negative_slope)
        self.heads = nn.ModuleList(
            nn.Sequential(*mlp(trunk_width, head_width, head_layers), nn.Linear(head_width, 1))
            if head_layers > 0
            else nn.Linear(trunk_width, 1)
            for _ in range(n_outputs)
        )

    def forward(self, x: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        h = self.trunk(self.encoding(x))
        if which is None:
            return torch.cat([head(h) for head in self.heads], dim=1)
        out = h.new_empty(len(h))
        for c, head in enumerate(self.heads):
            rows = torch.nonzero(which == c).squeeze(1)
            if len(rows):
                out = out.index_copy(0, rows, head(h.index_select(0, rows)).squeeze(1))
        return out


class VanillaField(nn.Module):
    """Encoding -> one trunk -> Linear(trunk_width, n_outputs) (no contrast heads)."""

    def __init__(
        self,
        encoding: nn.Module,
        n_outputs: int,
        trunk_width: int,
        trunk_layers: int,
        trunk_negative_slope: float = 0.0,
    ):
        super().__init__()
        self.encoding = encoding
        self.n_outputs = n_outputs
        self.trunk = mlp(encoding.out_dim, trunk_width, trunk_layers, trunk_negative_slope)
        self.out = nn.Linear(trunk_width, n_outputs)

    def forward(self, x: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        y = self.out(self.trunk(self.encoding(x)))
        return y if which is None else y.gather(1, which[:, None]).squeeze(1)


def build_field(architecture: str, encoding: nn.Module, n_outputs: int, preset: dict) -> nn.Module:
    """Field for ``architecture`` ("split-head" or "vanilla") sized by a resolved preset dict."""
    builders: dict[str, Callable[[], nn.Module]] = {
        "split-head": lambda: SplitHeadField(
            encoding,
            n_outputs,
            preset["trunk_width"],
            preset["trunk_layers"],
            preset["head_width"],
            preset["head_layers"],
            preset["trunk_negative_slope"],
        ),
        "vanilla": lambda: VanillaField(
            encoding,
            n_outputs,
            preset["trunk_width"],
            preset["trunk_layers"],
            preset["trunk_negative_slope"],
        ),
    }
    if architecture not in builders:
        raise ValueError(f"unknown field {architecture!r}; known: {', '.join(builders)}")
    return builders[architecture]()
