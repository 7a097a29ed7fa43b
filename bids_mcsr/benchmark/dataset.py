"""Write a simulated case as a tiny raw BIDS dataset the app can read.

Layout (one subject, no sessions)::

    root/dataset_description.json
    root/README
    root/participants.tsv
    root/sub-<label>/anat/sub-<label>[_ce-<ce>]_<suffix>.nii.gz  (+ .json sidecar)

Each sidecar has ``SliceThickness`` (mm) and a ``Simulation`` object saying how the
volume was made (mode, source, down-sampling factors per voxel axis, plane, the
slice grid's shift from the HR grid's centre, and the head motion, if any, as the
4x4 world matrix ``Motion``: the registration that undoes it is its inverse).
``SliceThickness`` is what the simulated scanner integrated across a slice: the
coarse slice spacing in ``profile`` mode (box average over the slice), and the HR
voxel size in ``paper`` mode (cubic point samples at slice centres are physically
slices as thin as the HR voxel, with gaps between them).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from ..geometry import voxel_sizes
from .cases import Case, case_motion, slice_shift_mm, view_factors
from .simulate import simulate_acquisition

#: BIDS entity order for the filenames we write (subset of the spec's order).
_ENTITY_ORDER = ("ses", "acq", "ce", "rec", "run")


def bids_stem(label: str, naming: dict[str, str]) -> str:
    """``sub-<label>[_ce-..]_<suffix>`` for a contrast's ``{"suffix": .., <entity>: ..}``."""
    parts = [f"sub-{label}"]
    parts += [f"{k}-{naming[k]}" for k in _ENTITY_ORDER if k in naming]
    return "_".join(parts) + "_" + naming["suffix"]


def _plane(factors: tuple[int, int, int], affine: np.ndarray) -> str:
    axis = int(np.argmax(factors))
    world = int(np.argmax(np.abs(np.asarray(affine)[:3, axis])))
    return ("sagittal", "coronal", "axial")[world]


def slice_thickness_mm(lr_affine: np.ndarray, factors: tuple[int, int, int], mode: str) -> float:
    """Simulated ``SliceThickness`` (mm): the slice spacing (``profile``) or one HR voxel (``paper``)."""
    axis = int(np.argmax(factors))
    spacing = float(voxel_sizes(lr_affine)[axis])
    return spacing if mode == "profile" else spacing / factors[axis]


def write_case_dataset(
    case: Case, root: Path | str, mode: str, view: str, thickness: int = 4, motion: str = "none"
) -> dict[str, Path]:
    """Simulate every contrast of ``case`` and write it under ``root`` as BIDS.

    Slice grids are placed as a scanner does (``cases.slice_shift_mm``); with
    ``motion="rigid"`` every contrast but the first (the app's reference) is
    acquired after the head moved (``cases.case_motion``). Returns the written
    NIfTI path per contrast. Existing files are overwritten, so a re-run always
    reflects the current simulation code.
    """
    root = Path(root)
    anat = root / f"sub-{case.label}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    description = {
        "Name": f"mcsr benchmark: {case.name} ({mode} simulation, {view} partner view)",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "Authors": ["mcsr benchmark (simulated from the source named in README)"],
        "GeneratedBy": [{"Name": "bids_mcsr.benchmark"}],
    }
    (root / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")
    (root / "README").write_text(
        f"Simulated anisotropic acquisitions of {case.name} for the mcsr benchmark.\n"
        + "".join(f"{n}\n" for n in case.notes)
    )
    (root / "participants.tsv").write_text(f"participant_id\nsub-{case.label}\n")
    paths = {}
    moved = case_motion(case, motion)
    for i, (name, factors) in enumerate(view_factors(case, view, thickness).items()):
        shift = slice_shift_mm(case, name, thickness)
        head = None if i == 0 else moved
        lr, affine = simulate_acquisition(
            case.volumes[name], case.affine, factors, mode, shift_mm=shift, motion=head
        )
        stem = bids_stem(case.label, case.bids[name])
        img = nib.Nifti1Image(lr, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        path = anat / f"{stem}.nii.gz"
        nib.save(img, str(path))
        sidecar = {
            "SliceThickness": slice_thickness_mm(affine, factors, mode),
            "Simulation": {
                "Mode": mode,
                "Source": f"{case.name}/{name}",
                "Factors": list(factors),
                "Plane": _plane(factors, affine),
                "ShiftMm": shift,
                "Motion": None if head is None else head.tolist(),
                "Scored": name in case.scored,
            },
        }
        (anat / f"{stem}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        paths[name] = path
    return paths
