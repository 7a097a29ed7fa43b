"""Rigid poses learned jointly with the field.

Inter-contrast MI registration of thick-slice scans stops at the metric's own
optimum, a few tenths of a millimetre from the truth (docs/registration.md). The
field sees every input at its own resolution, so a small rigid correction of
each registered input's sample points can be learned with it: the points of
input ``o`` move to ``R_o x + t_o`` (normalised coordinates, rotation about the
normaliser centre) before the field reads them, and the reconstruction loss
moves ``R_o, t_o`` to where the field explains both contrasts best. Inputs
that are not refined (at least one per field, the anchor) keep their points.

Parameters are stored as a rotation vector in degrees and a translation in mm,
so an optimiser's learning rate reads as degrees or mm per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def _skew(v: torch.Tensor) -> torch.Tensor:
    """``(n, 3, 3)`` cross-product matrices of ``(n, 3)`` vectors."""
    zero = torch.zeros_like(v[:, 0])
    return torch.stack(
        [
            torch.stack([zero, -v[:, 2], v[:, 1]], dim=1),
            torch.stack([v[:, 2], zero, -v[:, 0]], dim=1),
            torch.stack([-v[:, 1], v[:, 0], zero], dim=1),
        ],
        dim=1,
    )


class RigidPoses(nn.Module):
    """One learned rigid correction per output of a field.

    Parameters
    ----------
    refine
        Per output (the field's ``which`` index): learn its pose (True) or keep
        the points as given (False). At least one output must stay fixed.
    half_extent_mm
        mm per normalised unit (``geometry.CoordinateNormaliser.half_extent``).
    """

    def __init__(self, refine: Sequence[bool], half_extent_mm: float):
        super().__init__()
        refine = [bool(r) for r in refine]
        if not any(refine) or all(refine):
            raise ValueError(f"RigidPoses needs some outputs refined and one fixed, got {refine}")
        self.half_extent_mm = float(half_extent_mm)
        self.register_buffer("refine", torch.tensor(refine, dtype=torch.float32)[:, None])
        self.rotation_deg = nn.Parameter(torch.zeros(len(refine), 3))
        self.translation_mm = nn.Parameter(torch.zeros(len(refine), 3))

    def rotations(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(n_outputs, 3, 3)`` rotation matrices (the identity for fixed outputs)."""
        vec = torch.deg2rad((self.rotation_deg * self.refine).to(dtype))
        return torch.linalg.matrix_exp(_skew(vec))

    def forward(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """Move points ``x`` ``(M, 3)`` (normalised) of outputs ``which`` ``(M,)``."""
        rot = self.rotations().to(x.dtype)
        shift = (self.translation_mm * self.refine / self.half_extent_mm).to(x.dtype)
        return torch.einsum("mij,mj->mi", rot[which], x) + shift[which]

    def world_corrections(self, centre_mm: Sequence[float]) -> list[np.ndarray]:
        """Per output, the 4x4 world -> world transform the learned pose applies.

        ``world' = c + R (world - c) + t`` with ``c`` the normaliser centre (mm):
        composed after an input's registration transform, it gives the pose the
        field used for that input's points.
        """
        c = np.asarray(centre_mm, dtype=float)
        with torch.no_grad():
            rot = self.rotations(torch.float64).cpu().numpy()
            shift = (self.translation_mm * self.refine).double().cpu().numpy()
        out = []
        for r, t in zip(rot, shift, strict=True):
            m = np.eye(4)
            m[:3, :3] = r
            m[:3, 3] = c - r @ c + t
            out.append(m)
        return out
