"""Benchmark cases: high-resolution volumes, which contrasts are scored, masks, views.

A :class:`Case` holds every contrast of one subject on ONE 1 mm grid (shape
``(X, Y, Z)``, voxel-to-world ``affine``). Scored contrasts are genuinely
high-resolution and serve as ground truth; partner contrasts (e.g. the
publisher's thick-slice FLAIR resampled to 1 mm) are only used as input
(re-sliced like any other contrast) and as the MI reference.

The first contrast of a case is acquired axially (thick slices along world z);
the others in the *view* plane (``"sagittal"``: world x, ``"coronal"``: world y),
as in the paper's orthogonal-plane setup.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

#: Through-plane world axis (RAS) of each view name.
PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
VIEWS = ("sagittal", "coronal")
#: The shipped cases, in table order; ``icbm-quick`` is the CI-sized crop.
CASE_NAMES = ("icbm2009c", "ms-patient07", "brats2013-pat0001", "papersize")
QUICK_CASE = "icbm-quick"
PAPER_SHAPE = (160, 224, 160)
QUICK_SHAPE = (48, 56, 48)


@dataclass
class Case:
    """One benchmark subject; all arrays share ``affine`` and shape ``(X, Y, Z)``.

    ``bids`` maps each contrast to its BIDS naming: ``{"suffix": "T1w"}`` plus
    optional entities such as ``{"ce": "gadolinium"}``.
    """

    name: str
    volumes: dict[str, np.ndarray]
    affine: np.ndarray
    scored: tuple[str, ...]
    mask: np.ndarray
    bids: dict[str, dict[str, str]]
    lesions: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """BIDS participant label: the case name without non-alphanumerics."""
        return re.sub(r"[^A-Za-z0-9]", "", self.name)

    @property
    def contrasts(self) -> list[str]:
        return list(self.volumes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mask.shape)  # type: ignore[return-value]


#: Motion of the partner contrast's head in the ``rigid`` cases: at most this many
#: degrees and mm (the issue's bounds for scans of one session).
MOTION_MAX_DEG, MOTION_MAX_MM = 5.0, 10.0
MOTIONS = ("none", "rigid")


def _rng(*keys: str) -> np.random.Generator:
    """A generator seeded by names, so a case's simulation never changes between runs."""
    return np.random.default_rng(zlib.crc32("/".join(keys).encode()))


def slice_shift_mm(case: Case, contrast: str, thickness: int) -> float:
    """Where the scanner puts ``contrast``'s slice grid: its centre's offset (mm) from the
    HR grid's centre along the slice axis, uniform in ``[-thickness/2, thickness/2)``,
    fixed per case and contrast (0.01 mm steps)."""
    return round(float(_rng(case.name, contrast).uniform(-thickness / 2, thickness / 2)), 2)


def case_motion(case: Case, motion: str) -> np.ndarray | None:
    """The rigid head motion (4x4 world transform) of the partner contrasts, or None.

    ``"rigid"``: a rotation of 2-5 degrees about a random axis through the brain's
    centroid and a translation of 4-10 mm in a random direction, fixed per case.
    """
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    if motion == "none":
        return None
    from .simulate import rigid_motion_axis_angle

    rng = _rng(case.name, "motion")
    axis, direction = rng.normal(size=3), rng.normal(size=3)
    angle = rng.uniform(2.0, MOTION_MAX_DEG)
    shift = direction / np.linalg.norm(direction) * rng.uniform(4.0, MOTION_MAX_MM)
    centre = brain_points(case).mean(axis=0)
    return rigid_motion_axis_angle(axis, angle, shift, centre)


def brain_points(case: Case, step: int = 3) -> np.ndarray:
    """World (RAS mm) centres ``(N, 3)`` of every ``step``-th mask voxel per axis."""
    idx = np.argwhere(case.mask[::step, ::step, ::step]) * step
    return idx @ case.affine[:3, :3].T + case.affine[:3, 3]


def voxel_axis_of(affine: np.ndarray, world_axis: int) -> int:
    """Voxel axis whose direction is closest to world axis ``world_axis`` (0=x, 1=y, 2=z)."""
    return int(np.argmax(np.abs(np.asarray(affine, dtype=float)[world_axis, :3])))


def view_factors(case: Case, view: str, thickness: int = 4) -> dict[str, tuple[int, int, int]]:
    """Integer down-sampling factors per contrast for a view (``"sagittal"``/``"coronal"``).

    The first contrast gets ``thickness`` mm slices along world z (axial), every
    other contrast along the view's world axis; in-plane stays 1 mm.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    out = {}
    for i, name in enumerate(case.contrasts):
        f = [1, 1, 1]
        plane = "axial" if i == 0 else view
        f[voxel_axis_of(case.affine, PLANE_AXIS[plane])] = thickness
        out[name] = (f[0], f[1], f[2])
    return out


def crop_or_pad(
    vol: np.ndarray, affine: np.ndarray, shape: Sequence[int], centre: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Cut or zero-pad ``vol`` to ``shape`` around voxel ``centre``; returns (volume, affine).

    The new voxel 0 sits at old voxel ``start = round(centre - shape / 2)`` (may be
    negative: padding), so world positions of kept voxels are unchanged.
    """
    start = np.round(np.asarray(centre, dtype=float) - np.asarray(shape) / 2).astype(int)
    out = np.zeros(tuple(shape), dtype=vol.dtype)
    src, dst = [], []
    for s, n, m in zip(start, shape, vol.shape, strict=True):
        lo, hi = max(s, 0), min(s + n, m)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = vol[tuple(src)]
    shift = np.eye(4)
    shift[:3, 3] = start
    return out, np.asarray(affine, dtype=float) @ shift


def _reshape_case(
    case: Case, shape: Sequence[int], centre: Sequence[float] | None = None, label: str = ""
) -> Case:
    """``case`` cropped/padded to ``shape`` around ``centre`` (default: mask bounding-box centre).

    ``label`` names the derived case in its note (e.g. "papersize"), default ``case.name``.
    """
    if centre is None:
        idx = np.nonzero(case.mask)
        centre = [(int(i.min()) + int(i.max()) + 1) / 2 for i in idx]

    def fit(v):
        return crop_or_pad(v, case.affine, shape, centre)

    volumes = {k: fit(v)[0] for k, v in case.volumes.items()}
    mask, affine = fit(case.mask)
    lesions = None if case.lesions is None else fit(case.lesions)[0]
    note = (
        f"{label or case.name}: {case.name} cropped/padded to {tuple(shape)} around the brain's "
        "bounding-box centre"
    )
    return Case(
        case.name, volumes, affine, case.scored, mask, case.bids, lesions, [*case.notes, note]
    )


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: benchmark input missing; pass --data-dir pointing at the shared data folder"
        )
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _same_grid(ref_path: Path, ref: tuple, other_path: Path, other: tuple) -> None:
    if ref[0].shape != other[0].shape or not np.allclose(ref[1], other[1], atol=1e-3):
        raise ValueError(
            f"{other_path}: grid {other[0].shape} differs from {ref_path} {ref[0].shape}; "
            "resample it onto the same 1 mm grid first"
        )


def load_case(name: str, data_dir: Path | str) -> Case:
    """Load a shipped case (see :data:`CASE_NAMES`, plus ``icbm-quick``) from ``data_dir``."""
    data_dir = Path(data_dir)
    if name in ("icbm2009c", "papersize", QUICK_CASE):
        t1, affine = _load(data_dir / "icbm2009c" / "T1w.nii.gz")
        t2, _ = _load(data_dir / "icbm2009c" / "T2w.nii.gz")
        case = Case(
            "icbm2009c",
            {"T1w": t1, "T2w": t2},
            affine,
            ("T1w", "T2w"),
            (t1 != 0) | (t2 != 0),
            {"T1w": {"suffix": "T1w"}, "T2w": {"suffix": "T2w"}},
            notes=["icbm2009c: skull-stripped template; mask = nonzero T1w or T2w"],
        )
        if name == "papersize":
            case = _reshape_case(case, PAPER_SHAPE, label=name)
        elif name == QUICK_CASE:
            case = _reshape_case(case, QUICK_SHAPE, label=name)
    elif name == "ms-patient07":
        root = data_dir / name
        flair, affine = _load(root / "FLAIR.nii.gz")
        t1, _ = _load(root / "T1w.nii.gz")
        lesions, _ = _load(root / "lesions.nii.gz")
        case = Case(
            name,
            {"T1w": t1, "FLAIR": flair},
            affine,
            ("FLAIR",),
            (flair != 0) | (t1 != 0),
            {"T1w": {"suffix": "T1w"}, "FLAIR": {"suffix": "FLAIR"}},
            lesions=lesions > 0.5,
            notes=[
                "ms-patient07: FLAIR (HR) scored; the partly thick-slice T1w is re-sliced "
                "like a HR input and used as the MI reference; mask = nonzero FLAIR or T1w"
            ],
        )
    elif name == "brats2013-pat0001":
        root = data_dir / name
        t1c, affine = _load(root / "T1c.nii.gz")
        flair, _ = _load(root / "FLAIR.nii.gz")
        mask, _ = _load(root / "brainmask.nii.gz")
        case = Case(
            name,
            {"T1c": t1c, "FLAIR": flair},
            affine,
            ("T1c",),
            mask > 0.5,
            {"T1c": {"suffix": "T1w", "ce": "gadolinium"}, "FLAIR": {"suffix": "FLAIR"}},
            notes=[
                "brats2013-pat0001: T1c (HR) scored, written as ce-gadolinium T1w; the "
                "thick-slice FLAIR is re-sliced and used as the MI reference; mask = brainmask"
            ],
        )
    else:
        raise ValueError(f"unknown case {name!r}; choose from {(*CASE_NAMES, QUICK_CASE)}")
    case.name = name
    return case


_SUFFIX = re.compile(r"_([A-Za-z0-9]+)\.nii(\.gz)?$")


def user_case(specs: Sequence[str], mask_path: str | None = None) -> Case:
    """A case from user HR volumes ``LABEL=PATH`` or ``PATH`` (label: BIDS suffix or stem).

    All volumes must share one grid; every one is scored. The first is acquired
    axially. The mask is ``mask_path`` (> 0.5) or the voxels nonzero in any volume.
    """
    if len(specs) < 2:
        raise ValueError("--hr needs at least two volumes (e.g. --hr T1w=t1.nii.gz T2w=t2.nii.gz)")
    volumes, bids, affine, first = {}, {}, None, None
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            path = spec
            m = _SUFFIX.search(Path(spec).name)
            label = m.group(1) if m else Path(spec).name.split(".")[0]
        data = _load(Path(path))
        if data[0].ndim != 3:
            raise ValueError(f"{path}: expected a 3-D volume, got shape {data[0].shape}")
        if first is None:
            first, affine = (Path(path), data), data[1]
        else:
            _same_grid(first[0], first[1], Path(path), data)
        if label in volumes:
            raise ValueError(f"{path}: contrast label {label!r} given twice; use LABEL=PATH")
        volumes[label] = data[0]
        bids[label] = {"suffix": re.sub(r"[^A-Za-z0-9]", "", label) or "T1w"}
    if mask_path:
        mdata = _load(Path(mask_path))
        _same_grid(first[0], first[1], Path(mask_path), mdata)
        mask = mdata[0] > 0.5
    else:
        mask = np.any([v != 0 for v in volumes.values()], axis=0)
    return Case(
        "user", volumes, affine, tuple(volumes), mask, bids, notes=[f"user HR: {list(specs)}"]
    )
