"""Coordinate encodings: modules mapping normalised coordinates to feature vectors.

Every encoding is an ``nn.Module`` with an integer attribute ``out_dim`` whose
``forward`` maps ``(M, 3)`` float32 coordinates in ``[-1, 1]`` (normalised world
space, see ``geometry.CoordinateNormaliser``) to ``(M, out_dim)`` features.
Fields (``model.py``) accept any such module, so encodings are swappable.

Encodings are looked up by name in ``ENCODINGS``; another module adds its own with
``register_encoding`` (e.g. ``bids_mcsr/inr/grid.py`` registers a multi-resolution
grid). Random initialisation uses torch's global generator; ``fit.py`` seeds it
inside ``torch.random.fork_rng`` so encodings need no seed argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

#: name -> factory(**params) -> encoding module with ``out_dim``.
ENCODINGS: dict[str, Callable[..., nn.Module]] = {}


def register_encoding(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding an encoding factory (a class or function) to ``ENCODINGS``."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ENCODINGS and ENCODINGS[name] is not factory:
            raise ValueError(f"encoding {name!r} is already registered")
        ENCODINGS[name] = factory
        return factory

    return add


def build_encoding(name: str, params: dict | None = None) -> nn.Module:
    """Instantiate the registered encoding ``name`` with keyword ``params``."""
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; known: {', '.join(sorted(ENCODINGS))}")
    module = ENCODINGS[name](**(params or {}))
    if not isinstance(getattr(module, "out_dim", None), int):
        raise TypeError(f"encoding {name!r} must set an integer attribute out_dim")
    return module


@register_encoding("fourier")
class FourierFeatures(nn.Module):
    """Gaussian random Fourier features (Tancik et al. 2020), as in the paper's Sec. 2.

    ``v = [cos(2 pi factor B x), sin(2 pi factor B x)]`` with ``B`` of shape
    ``(n_frequencies, 3)`` drawn once from ``N(0, sigma^2)`` and kept fixed (a
    buffer, not a parameter). ``out_dim = 2 * n_frequencies``. ``sigma`` is in
    cycles per normalised unit: with the union bounding box mapped to ``[-1, 1]``
    a frequency ``f`` has a period of ``half_extent_mm / f`` mm.
    """

    def __init__(self, n_frequencies: int = 256, sigma: float = 4.0, factor: float = 1.0):
        super().__init__()
        if n_frequencies < 1 or sigma <= 0:
            raise ValueError("fourier encoding needs n_frequencies >= 1 and sigma > 0")
        self.register_buffer("B", torch.randn(n_frequencies, 3) * sigma)
        self.scale = 2.0 * math.pi * factor
        self.out_dim = 2 * n_frequencies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = (x * self.scale) @ self.B.T
        return torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1)


@register_encoding("identity")
class IdentityEncoding(nn.Module):
    """Raw coordinates (``out_dim = 3``): the no-encoding ablation of an MLP field."""

    out_dim = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
