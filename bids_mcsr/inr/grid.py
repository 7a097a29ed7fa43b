"""Dense multi-resolution feature grids: a fast coordinate encoding for CPU fits.

A brain fits in a few million 1 mm cells, so every level is a *dense* trainable
grid (no hashing, hence no collisions). Level ``l`` has ``R_l`` nodes per axis
over the normalised cube ``[-1, 1]^3`` (node ``0`` at ``-1``, node ``R_l - 1`` at
``+1``), with ``R_l`` growing geometrically from ``base_resolution`` to
``max_resolution``. A point's feature vector is the concatenation over levels of
the trilinear interpolation of that level's ``features_per_level`` values
(``F.grid_sample``, ``align_corners=True``), so ``out_dim = n_levels *
features_per_level``. Points outside the cube read the border values.

Choosing ``max_resolution``: the normalised cube spans the longest side of the
inputs' union bounding box (``geometry.CoordinateNormaliser``), so a node spacing
of ``s`` mm needs ``R = 2 * half_extent_mm / s + 1`` nodes, e.g. 225 for 1 mm over
a 224 mm box.

Memory: ``sum_l R_l^3 * features_per_level`` float32 parameters (x3 with Adam's
moments), e.g. levels 16..128 with 2 features are about 5 M parameters (20 MB).
"""

from __future__ import annotations

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
    ):
        super().__init__()
        if features_per_level < 1 or init_std < 0:
            raise ValueError("dense-grid needs features_per_level >= 1 and init_std >= 0")
        self.resolutions = level_resolutions(n_levels, base_resolution, max_resolution)
        # Stored (1, F, R, R, R) with the last axis indexed by x, as grid_sample
        # reads grid[..., 0] along the last (W) axis: points need no reordering.
        self.levels = nn.ParameterList(
            nn.Parameter(torch.randn(1, features_per_level, r, r, r) * init_std)
            for r in self.resolutions
        )
        self.out_dim = n_levels * features_per_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = x.reshape(1, -1, 1, 1, 3).to(self.levels[0].dtype)
        feats = [
            F.grid_sample(level, grid, mode="bilinear", padding_mode="border", align_corners=True)
            for level in self.levels
        ]
        # each (1, F, M, 1, 1) -> (M, n_levels * F)
        return torch.cat(feats, dim=1).reshape(self.out_dim, -1).T
