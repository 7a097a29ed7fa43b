"""Dense multi-resolution feature grids: a fast coordinate encoding for CPU fits.

A brain fits in a few million 1 mm cells, so every level is a *dense* trainable
grid (no hashing, hence no collisions). Level ``l`` has ``R_l`` nodes per axis
over the normalised cube ``[-1, 1]^3`` (node ``0`` at ``-1``, node ``R_l - 1`` at
``+1``), with ``R_l`` growing geometrically from ``base_resolution`` to
``max_resolution``. A point's feature vector is the concatenation over levels of
the trilinear interpolation of that level's ``features_per_level`` values
(``F.grid_sample``, ``align_corners=True``), so ``out_dim = n_levels *
features_per_level``. Points outside the cube read the border values.

Sizing in mm: the normalised cube spans the longest side of the inputs' union
bounding box (``geometry.CoordinateNormaliser``), so a node spacing of ``s`` mm
needs ``R = 2 * half_extent_mm / s + 1`` nodes (``resolution_for_spacing``), e.g.
169 for 1.33 mm over a 224 mm box. Give ``coarsest_mm`` and ``finest_mm`` instead
of resolutions to keep the same physical cell sizes for any field of view; the
engine passes ``half_extent_mm`` to encodings that accept it.

Memory: ``sum_l R_l^3 * features_per_level`` float32 parameters (x3 with Adam's
moments), e.g. levels 16..128 with 2 features are about 5 M parameters (20 MB).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .encoding import register_encoding


def level_resolutions(n_levels: int, base_resolution: int, max_resolution: int) -> list[int]:
    """Nodes per axis of each level: geometric from ``base_resolution`` to ``max_resolution``."""
    if n_levels < 1 or base_resolution < 2 or max_resolution < base_resolution:
        raise ValueError(
            "dense-grid needs n_levels >= 1 and 2 <= base_resolution <= max_resolution, got "
            f"{n_levels}, {base_resolution}, {max_resolution}"
        )
    if n_levels == 1:
        return [int(max_resolution)]
    growth = (max_resolution / base_resolution) ** (1.0 / (n_levels - 1))
    return [int(round(base_resolution * growth**level)) for level in range(n_levels)]


def resolution_for_spacing(spacing_mm: float, half_extent_mm: float) -> int:
    """Nodes per axis giving at most ``spacing_mm`` between nodes over ``[-1, 1]``."""
    if spacing_mm <= 0 or half_extent_mm <= 0:
        raise ValueError(
            f"dense-grid needs spacing_mm > 0 and half_extent_mm > 0, got {spacing_mm}, {half_extent_mm}"
        )
    return max(2, math.ceil(2 * half_extent_mm / spacing_mm - 1e-6) + 1)


@register_encoding("dense-grid")
class DenseGridEncoding(nn.Module):
    """Multi-resolution dense feature grids with trilinear interpolation.

    Parameters
    ----------
    n_levels, base_resolution, max_resolution
        Number of levels and nodes per axis of the coarsest and finest level
        (see ``level_resolutions``).
    features_per_level
        Trainable features stored at each node of every level.
    coarsest_mm, finest_mm, half_extent_mm
        Alternative to the two resolutions: node spacings in mm of the coarsest and
        finest level, converted with ``half_extent_mm`` (mm per normalised unit).
        When all three are given they override ``base_resolution`` and
        ``max_resolution``.
    init_std
        Standard deviation of the normal initialisation of the grid values
        (small, so the MLP starts from an almost constant field).

    ``forward`` maps ``(M, 3)`` float32 normalised coordinates ``(x, y, z)`` to
    ``(M, n_levels * features_per_level)`` features, coarse levels first.
    """

    def __init__(
        self,
        n_levels: int = 6,
        base_resolution: int = 16,
        max_resolution: int = 128,
        features_per_level: int = 2,
        init_std: float = 1e-2,
        coarsest_mm: float | None = None,
        finest_mm: float | None = None,
        half_extent_mm: float | None = None,
    ):
        super().__init__()
        if features_per_level < 1 or init_std < 0:
            raise ValueError("dense-grid needs features_per_level >= 1 and init_std >= 0")
        if coarsest_mm is not None and finest_mm is not None and half_extent_mm is not None:
            base_resolution = resolution_for_spacing(coarsest_mm, half_extent_mm)
            max_resolution = max(base_resolution, resolution_for_spacing(finest_mm, half_extent_mm))
        self.resolutions = level_resolutions(n_levels, base_resolution, max_resolution)
        # Stored (1, F, R, R, R) with the last axis indexed by x, as grid_sample
        # reads grid[..., 0] along the last (W) axis: points need no reordering.
        self.levels = nn.ParameterList(
            nn.Parameter(torch.randn(1, features_per_level, r, r, r) * init_std)
            for r in self.resolutions
        )
        self.out_dim = n_levels * features_per_level

    @torch.no_grad()
    def diffuse_(self, fraction: float) -> None:
        """Move every node ``fraction`` of the way toward the mean of its 6 neighbours.

        One explicit step of heat diffusion on each level (mirror boundaries: a face
        node averages only its existing neighbours' differences). ``fraction`` in
        ``[0, 1]``; 1 replaces each node by the mean of its neighbours' values.
        """
        for level in self.levels:
            x = level.data[0]  # (F, D, H, W)
            acc = torch.zeros_like(x)
            for dim in (1, 2, 3):
                n = x.shape[dim]
                if n < 2:
                    continue
                d = torch.diff(x, dim=dim)
                acc.narrow(dim, 0, n - 1).add_(d)
                acc.narrow(dim, 1, n - 1).sub_(d)
            # acc = sum of (neighbour - node) over the 6 neighbours = 6 (mean - node)
            x.add_(acc, alpha=fraction / 6.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = x.reshape(1, -1, 1, 1, 3).to(self.levels[0].dtype)
        feats = [
            F.grid_sample(level, grid, mode="bilinear", padding_mode="border", align_corners=True)
            for level in self.levels
        ]
        # each (1, F, M, 1, 1) -> (M, n_levels * F)
        return torch.cat(feats, dim=1).reshape(self.out_dim, -1).T
