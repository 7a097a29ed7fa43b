"""Dense multi-resolution feature grids: a fast coordinate encoding for CPU fits.

A brain fits in a few million 1 mm cells, so every level is a *dense* trainable
grid (no hashing, hence no collisions). Level ``l`` has ``R_l`` nodes per axis
over the normalised cube ``[-1, 1]^3`` (node ``0`` at ``-1``, node ``R_l - 1`` at
``+1``), with ``R_l`` growing geometrically from ``base_resolution`` to
``max_resolution``; a per-axis ``finest_mm`` (x, y, z) makes the finer levels
anisotropic, ``(Rx_l, Ry_l, Rz_l)`` nodes (e.g. 0.68 mm in-plane and 1.33 mm
through-plane for inputs that are all axial with 0.5 mm pixels). A point's
feature vector is the concatenation over levels of the trilinear interpolation
of that level's ``features_per_level`` values (node-centred, as ``F.grid_sample``
with ``align_corners=True``), so ``out_dim = n_levels * features_per_level``.
Points outside the cube read the border values.

Lookup: each level is stored channels-last, ``(Rz, Ry, Rx, F)`` indexed ``[z, y, x]``;
a point gathers its 8 corner rows by flat index and weights them. On CPU this
forward + backward took 47 ms for 32,768 points on the 5 levels of a paper-size
field, against 85 ms for ``F.grid_sample`` (same values; docs/fast-engine.md,
round 4): its backward scatters into a channels-first grid one value at a time.
All levels are read by one autograd function (``_Lookup``) that gathers rows with
``index_select`` and accumulates gradients with a sorted ``index_put_``: the same
numbers as autograd's indexing, 8 % less time per training step (round 11).

Sizing in mm: the normalised cube spans the longest side of the inputs' union
bounding box (``geometry.CoordinateNormaliser``), so a node spacing of ``s`` mm
needs ``R = 2 * half_extent_mm / s + 1`` nodes (``resolution_for_spacing``), e.g.
169 for 1.33 mm over a 224 mm box. Give ``coarsest_mm`` and ``finest_mm`` instead
of resolutions to keep the same physical cell sizes for any field of view; the
engine passes ``half_extent_mm`` to encodings that accept it.

Memory: ``sum_l Rx_l * Ry_l * Rz_l * features_per_level`` float32 parameters (x3
with Adam's moments), e.g. levels 16..128 with 2 features are about 5 M parameters (20 MB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
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


def node_spacing(resolution: int, half_extent_mm: float) -> float:
    """Distance (mm) between neighbouring nodes of ``resolution`` nodes over ``[-1, 1]``."""
    return 2 * half_extent_mm / (resolution - 1)


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
        ``max_resolution``. ``finest_mm`` may be three spacings (x, y, z): each
        axis then grows geometrically from the (isotropic) coarsest level to its own.
    init_std
        Standard deviation of the normal initialisation of the grid values
        (small, so the MLP starts from an almost constant field).

    ``forward`` maps ``(M, 3)`` float32 normalised coordinates ``(x, y, z)`` to
    ``(M, n_levels * features_per_level)`` features, coarse levels first.
    ``resolutions`` lists each level's nodes per axis as ``(Rx, Ry, Rz)``.
    """

    def __init__(
        self,
        n_levels: int = 6,
        base_resolution: int = 16,
        max_resolution: int = 128,
        features_per_level: int = 2,
        init_std: float = 1e-2,
        coarsest_mm: float | None = None,
        finest_mm: float | Sequence[float] | None = None,
        half_extent_mm: float | None = None,
    ):
        super().__init__()
        if features_per_level < 1 or init_std < 0:
            raise ValueError("dense-grid needs features_per_level >= 1 and init_std >= 0")
        finest = [finest_mm] * 3 if isinstance(finest_mm, (int, float)) else finest_mm
        top = [max_resolution] * 3
        if coarsest_mm is not None and finest is not None and half_extent_mm is not None:
            if len(finest) != 3:
                raise ValueError(f"dense-grid finest_mm needs 1 or 3 spacings, got {finest_mm}")
            base_resolution = resolution_for_spacing(coarsest_mm, half_extent_mm)
            top = [max(base_resolution, resolution_for_spacing(f, half_extent_mm)) for f in finest]
        per_axis = [level_resolutions(n_levels, base_resolution, t) for t in top]
        self.resolutions: list[tuple[int, int, int]] = list(zip(*per_axis, strict=True))
        # Stored (Rz, Ry, Rx, F) indexed [z, y, x, feature]: a node's features are one
        # contiguous row of the flat (Rz Ry Rx, F) view, so a lookup gathers 8 rows.
        # Drawn channels-first (the layout of earlier versions) so a seed gives the
        # same initial field; scaled in place, so a large level is held at most twice
        # while it is drawn (a 32 M-node level: 0.5 GB each).
        self.levels = nn.ParameterList(
            nn.Parameter(
                torch.randn(features_per_level, rz, ry, rx)
                .mul_(init_std)
                .permute(1, 2, 3, 0)
                .contiguous()
            )
            for rx, ry, rz in self.resolutions
        )
        self.out_dim = n_levels * features_per_level
        # levels passed to ``restrict_``; each has a buffer ``node_rows_<k>``: the (R^3,)
        # int32 row of every node in the level's compact table, -1 = not stored (reads 0);
        # int32 halves the index of a 1 mm level over a 229 mm field (48 MB, not 96 MB)
        self.restricted: set[int] = set()

    def _node_rows(self, k: int) -> torch.Tensor | None:
        return getattr(self, f"node_rows_{k}") if k in self.restricted else None

    @torch.no_grad()
    def restrict_(self, k: int, active: torch.Tensor) -> int:
        """Keep level ``k``'s values only at the ``active`` nodes (bool ``(Rz, Ry, Rx)``, ``[z, y, x]``).

        The level becomes an ``(n_active, F)`` table (its current values) plus a node
        -> row index; other nodes read 0 and have no parameters, so a fine level costs
        memory and optimiser time only where it is needed (e.g. around the brain).
        Call before creating the optimiser. Returns the number of stored nodes.
        """
        shape = self.resolutions[k][::-1]
        if k in self.restricted or tuple(active.shape) != shape:
            raise ValueError(f"restrict_ needs an unrestricted level and a {shape} mask")
        flat = active.reshape(-1).to(self.levels[k].device)
        n = int(flat.sum())
        if n >= 2**31:
            raise ValueError(f"restrict_ keeps at most 2^31 - 1 nodes per level, got {n}")
        rows = torch.full((flat.numel(),), -1, dtype=torch.int32, device=flat.device)
        rows[flat] = torch.arange(n, dtype=torch.int32, device=flat.device)
        table = self.levels[k].data.reshape(flat.numel(), -1)[flat].clone()
        self.levels[k] = nn.Parameter(table)
        self.register_buffer(f"node_rows_{k}", rows)
        self.restricted.add(k)
        return n

    @torch.no_grad()
    def diffuse_(self, fraction: float, strength: list[torch.Tensor | None] | None = None) -> None:
        """Move every node ``fraction`` of the way toward the mean of its 6 neighbours.

        One explicit step of heat diffusion on each level (mirror boundaries: a face
        node averages only its existing neighbours' differences). ``fraction`` in
        ``[0, 1]``; 1 replaces each node by the mean of its neighbours' values.
        ``strength`` (per level, e.g. from ``reach_strength``: an ``(Rz, Ry, Rx, 1)``
        tensor in ``[0, 1]`` that scales the step node by node, or None to leave that
        level alone); None = 1 everywhere on every level.
        """
        for k, level in enumerate(self.levels):
            if (strength is not None and strength[k] is None) or k in self.restricted:
                continue  # restricted levels have no node grid to diffuse on
            x = level.data  # (D, H, W, F)
            acc = torch.zeros_like(x)
            for dim in (0, 1, 2):
                n = x.shape[dim]
                if n < 2:
                    continue
                d = torch.diff(x, dim=dim)
                acc.narrow(dim, 0, n - 1).add_(d)
                acc.narrow(dim, 1, n - 1).sub_(d)
            # acc = sum of (neighbour - node) over the 6 neighbours = 6 (mean - node)
            if strength is not None:
                acc.mul_(strength[k])
            x.add_(acc, alpha=fraction / 6.0)

    @torch.no_grad()
    def reach(
        self,
        points: torch.Tensor,
        weights: torch.Tensor | None = None,
        levels: list[int] | None = None,
    ) -> list[torch.Tensor | None]:
        """Summed trilinear weight that ``points`` ``(M, 3)`` put on each node, per level.

        ``weights`` ``(M,)`` scales each point's share (e.g. ``1/K`` for the K points
        of one slice profile); None = 1. ``levels``: indices of the levels to count
        (None = all); the others get None. A counted level is one ``(Rz, Ry, Rx)``
        float32 tensor indexed ``[z, y, x]`` like the levels: a node no point's cell
        touches has reach 0; a node of a 1 mm level at the centre of a sampled 1 mm
        voxel gets 1 from that voxel (the same weights as the lookup's gradient).
        """
        out: list[torch.Tensor | None] = []
        for k, level in enumerate(self.levels):
            if levels is not None and k not in levels:
                out.append(None)
                continue
            res = self.resolutions[k]
            index, w = _corner_weights(points.to(level.dtype), res)
            if weights is not None:
                w = w * weights.to(w.dtype)[:, None]
            total = torch.zeros(math.prod(res), dtype=torch.float32, device=level.device)
            total.index_add_(0, index.reshape(-1), w.reshape(-1).float())
            out.append(total.view(res[::-1]))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.levels[0].dtype)
        corners = [_level_corners(x, r, self._node_rows(k)) for k, r in enumerate(self.resolutions)]
        return _Lookup.apply(
            len(self.levels),
            *self.levels,
            *(index for index, _ in corners),
            *(weights for _, weights in corners),
        )


def reach_strength(reach: list[torch.Tensor | None], threshold: float) -> list[torch.Tensor | None]:
    """Per-node diffusion strength ``clip(1 - reach / threshold, 0, 1)``, ``(Rz, Ry, Rx, 1)``.

    ``reach`` as from ``DenseGridEncoding.reach`` (None levels stay None: not
    diffused); ``threshold`` > 0 in the same units (summed trilinear weight). Nodes
    the data never touch diffuse fully, nodes with at least ``threshold`` of weight
    not at all, so diffusion fills the gaps between point-sampled slices without
    smoothing what the inputs measured.
    """
    if threshold <= 0:
        raise ValueError(f"reach threshold must be > 0, got {threshold}")
    return [None if r is None else (1 - r / threshold).clamp_(0, 1)[..., None] for r in reach]


#: (dx, dy, dz) of the 8 cell corners, x fastest
_CORNERS = [(k & 1, (k >> 1) & 1, k >> 2) for k in range(8)]


def _corner_weights(
    x: torch.Tensor, res: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat node indices ``(M, 8)`` and trilinear weights ``(M, 8)`` of points ``x`` ``(M, 3)``.

    On a level of ``res = (Rx, Ry, Rz)`` nodes stored ``[z, y, x]`` (flat index
    ``(z * Ry + y) * Rx + x``), node ``0`` at ``-1`` and node ``R - 1`` at ``+1`` on
    each axis; points outside are clamped to the border. The weights carry a
    gradient with respect to ``x`` only when ``x`` requires one (a learned pose,
    ``pose.RigidPoses``); otherwise the coordinates are data and none is built.
    """
    rx, ry, _ = res
    top = torch.tensor([r - 1 for r in res], dtype=x.dtype, device=x.device)
    with torch.set_grad_enabled(x.requires_grad and torch.is_grad_enabled()):
        p = torch.minimum(((x + 1) * (0.5 * top)).clamp(min=0), top)
        with torch.no_grad():
            # the last cell's lower corner is node R - 2, so every corner index is valid
            i0 = torch.minimum(p.floor(), top - 1)
            corner = i0.long()  # integer arithmetic: a fine level has > 2^24 nodes
            base = (corner[:, 2] * ry + corner[:, 1]) * rx + corner[:, 0]
            step = torch.tensor(
                [dx + rx * dy + rx * ry * dz for dx, dy, dz in _CORNERS], device=x.device
            )
        frac = p - i0
        both = torch.stack([1 - frac, frac], dim=1)  # (M, 2, 3): weight of the low/high node
        # (M, dz, dy, dx) flattens in _CORNERS order; (wx * wy) * wz as written out per corner
        xy = both[:, None, :, 0] * both[:, :, None, 1]
        weights = (xy[:, None] * both[:, :, None, None, 2]).reshape(len(x), 8)
    return base[:, None] + step, weights


def _level_corners(
    x: torch.Tensor, res: tuple[int, int, int], node_rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``(M, 8)`` of a level's table and their trilinear weights ``(M, 8)`` for points ``x``.

    With ``node_rows`` (a restricted level) nodes that are not stored point to row 0
    with weight 0, so they read 0 and receive no gradient.
    """
    index, weights = _corner_weights(x, res)
    if node_rows is not None:
        # index_select, not node_rows[index]: a row copy instead of a value-by-value walk
        index = node_rows.index_select(0, index.reshape(-1)).view(index.shape)
        weights = weights * (index >= 0)
        index = index.clamp(min=0)
    return index, weights


class _Lookup(torch.autograd.Function):
    """Trilinear reads of all levels at once: ``(M, n_levels * F)`` features.

    ``apply(n, *tables, *indices, *weights)``: per level a table ``(rows, F)`` (or
    ``(Rz, Ry, Rx, F)``), the ``(M, 8)`` rows each point reads and their weights.
    Computes what autograd would for ``(table[index] * weights[..., None]).sum(1)``,
    faster on CPU: the rows are gathered with ``index_select`` (a row copy; advanced
    indexing walks them value by value), and the backward accumulates with
    ``index_put_(accumulate=True)``, which is what autograd uses for indexing but
    not for ``index_select`` (its ``index_add_`` was 1.7x slower here, round 11).
    Weights that require a gradient (coordinates of a learned pose) get
    ``sum_f grad[m, f] * table[index[m, c], f]``.
    """

    @staticmethod
    def forward(ctx, n: int, *args: torch.Tensor) -> torch.Tensor:
        tables, indices, weights = args[:n], args[n : 2 * n], args[2 * n :]
        ctx.save_for_backward(*indices, *weights, *tables)
        ctx.table_shapes = [t.shape for t in tables]
        out = []
        for table, index, w in zip(tables, indices, weights, strict=True):
            flat = table.reshape(-1, table.shape[-1])
            rows = flat.index_select(0, index.reshape(-1)).view(*index.shape, -1)
            out.append((rows * w[..., None]).sum(dim=1))
        return torch.cat(out, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = len(ctx.table_shapes)
        saved = ctx.saved_tensors
        indices, weights, tables = saved[:n], saved[n : 2 * n], saved[2 * n :]
        grads: list[torch.Tensor | None] = [None] * n
        weight_grads: list[torch.Tensor | None] = [None] * n
        start = 0
        for k, shape in enumerate(ctx.table_shapes):
            width = shape[-1]
            g = grad[:, start : start + width]
            if ctx.needs_input_grad[1 + k]:
                rows = (g[:, None, :] * weights[k][..., None]).reshape(-1, width)
                out = grad.new_zeros(math.prod(shape[:-1]), width)
                out.index_put_((indices[k].reshape(-1),), rows, accumulate=True)
                grads[k] = out.view(shape)
            if ctx.needs_input_grad[1 + 2 * n + k]:
                flat = tables[k].reshape(-1, width)
                read = flat.index_select(0, indices[k].reshape(-1)).view(*indices[k].shape, -1)
                weight_grads[k] = (read * g[:, None, :]).sum(dim=2)
            start += width
        return (None, *grads, *([None] * n), *weight_grads)
