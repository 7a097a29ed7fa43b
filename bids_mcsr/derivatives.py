"""The derivatives dataset: output names, sidecars, dataset_description, atomic writes.

Layout (README "Outputs")::

    output_dir/
      dataset_description.json      DatasetType "derivative", GeneratedBy, SourceDatasets
      .bidsignore                    reports and tables the validator should not check
      group_qc.tsv                   group level
      sub-<L>/[ses-<S>/]anat/
        sub-<L>[_ses-<S>][_acq-..][_ce-..][_rec-..][_run-..]_desc-superres_<suffix>.nii.gz
        ... .json                    sidecar, written last

Every file is written under a hidden temporary name in the destination folder
and renamed into place (``os.replace`` is atomic on POSIX), so a killed run
never leaves a half-written output under its final name. Sidecars are written
after their images; a participant counts as done only when every expected
image and sidecar exists (:func:`is_complete`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from . import __version__
from .discovery import NAME_ENTITIES, Candidate

DESC = "superres"
PIPELINE_NAME = "mcsr"
#: ``SuperResolution.SoftwareVersion`` of every sidecar this version writes
SOFTWARE_VERSION = f"{PIPELINE_NAME} {__version__}"
CODE_URL = "https://github.com/mcsr-bids/mcsr"
BIDS_VERSION = "1.9.0"
#: Name under which the raw dataset is referenced in BIDS URIs (``bids:raw:...``).
RAW_LINK = "raw"

#: Non-BIDS files of the derivatives dataset, listed in ``.bidsignore``.
BIDSIGNORE_PATTERNS = ("*.html", "figures/", "group_qc.tsv", "logs/", "*_xfm.txt")


def output_stem(
    subject: str,
    session: str | None,
    entities: dict[str, str],
    suffix: str,
    space: str | None = None,
) -> str:
    """``sub-<L>[_ses-<S>][_acq-..][_ce-..][_rec-..][_run-..][_space-..]_desc-superres_<suffix>``.

    Built by hand, in BIDS entity order, because pybids' ``build_path`` drops
    entities its config does not list. ``space`` is a template space name
    (``--output-space``); None or ``native`` adds no ``space-`` entity.
    """
    parts = [f"sub-{subject}"]
    if session:
        parts.append(f"ses-{session}")
    parts += [f"{key}-{entities[key]}" for key in NAME_ENTITIES if entities.get(key)]
    if space and space != "native":
        parts.append(f"space-{space}")
    parts += [f"desc-{DESC}", suffix]
    return "_".join(parts)


def anat_dir(out_dir: Path, subject: str, session: str | None) -> Path:
    """``out_dir/sub-<L>/[ses-<S>/]anat``."""
    d = Path(out_dir) / f"sub-{subject}"
    return (d / f"ses-{session}" if session else d) / "anat"


def output_paths(
    out_dir: Path, subject: str, session: str | None, cand: Candidate, space: str | None = None
) -> tuple[Path, Path]:
    """``(image.nii.gz, sidecar.json)`` paths of the super-resolved version of ``cand``."""
    stem = output_stem(subject, session, cand.entities, cand.suffix, space)
    d = anat_dir(out_dir, subject, session)
    return d / f"{stem}.nii.gz", d / f"{stem}.json"


def expected_outputs(
    out_dir: Path,
    subject: str,
    session: str | None,
    chosen: Sequence[Candidate],
    space: str | None = None,
) -> list[Path]:
    """Every file a finished participant/session has: images and sidecars."""
    return [p for c in chosen for p in output_paths(out_dir, subject, session, c, space)]


def is_complete(paths: Iterable[Path]) -> bool:
    """True when every path exists and is non-empty (files are only ever renamed in whole)."""
    return all(p.is_file() and p.stat().st_size > 0 for p in paths)


def bids_uri(path: Path, bids_dir: Path) -> str:
    """BIDS URI of an input file: ``bids:raw:sub-01/anat/sub-01_T1w.nii.gz``."""
    rel = Path(path).resolve().relative_to(Path(bids_dir).resolve())
    return f"bids:{RAW_LINK}:{rel.as_posix()}"


# -- atomic writes -----------------------------------------------------------------


def _temp_path(path: Path) -> Path:
    # Hidden (validators and globbing skip it), same folder (rename stays atomic),
    # same suffixes (nibabel picks gzip from the extension).
    suffixes = "".join(path.suffixes)
    fd, name = tempfile.mkstemp(
        prefix=f".{path.name[: -len(suffixes)] if suffixes else path.name}.",
        suffix=f".tmp{suffixes}",
        dir=path.parent,
    )
    os.close(fd)
    return Path(name)


def is_temp_file(path: Path) -> bool:
    """True for a temporary file of :func:`_temp_path` (left behind by a killed run)."""
    name = Path(path).name
    return name.startswith(".") and ".tmp" in name


def remove_stale_temps(folder: Path, prefix: str = "") -> list[Path]:
    """Delete temporary files in ``folder`` whose final name starts with ``prefix``.

    Only a run killed between writing and renaming leaves them; call it for
    folders (and name prefixes) that no other running process writes to.
    """
    removed = []
    for p in Path(folder).glob(f".{prefix}*"):
        if p.is_file() and is_temp_file(p):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _commit(tmp: Path, path: Path) -> None:
    try:
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        tmp.write_text(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _commit(tmp, path)
    return path


def atomic_write_json(path: Path, obj: dict) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a float32 3-D NIfTI (qform = sform = ``affine``, mm units), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=float))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = _temp_path(path)
    try:
        nib.save(img, str(tmp))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _commit(tmp, path)
    return path


# -- dataset-level files -----------------------------------------------------------


def generated_by() -> dict:
    """The ``GeneratedBy`` entry; ``Container`` when ``MCSR_CONTAINER`` is set (Docker image)."""
    entry: dict = {"Name": PIPELINE_NAME, "Version": __version__, "CodeURL": CODE_URL}
    container = os.environ.get("MCSR_CONTAINER")
    if container:
        kind = "singularity" if os.environ.get("SINGULARITY_NAME") else "docker"
        entry["Container"] = {"Type": kind, "Tag": container}
    return entry


def dataset_description(bids_dir: Path) -> dict:
    """``dataset_description.json`` content for the derivatives of ``bids_dir``."""
    bids_dir = Path(bids_dir).resolve()
    source: dict = {"URL": bids_dir.as_uri()}
    try:
        raw = json.loads((bids_dir / "dataset_description.json").read_text())
    except (OSError, ValueError):
        raw = {}
    if raw.get("DatasetDOI"):
        source["DOI"] = raw["DatasetDOI"]
    raw_name = raw.get("Name") or bids_dir.name
    return {
        "Name": f"mcsr super-resolution of {raw_name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by()],
        "SourceDatasets": [source],
        "DatasetLinks": {RAW_LINK: bids_dir.as_uri()},
        "HowToAcknowledge": (
            "Cite McGinnis, Shit et al., Single-subject Multi-contrast MRI Super-resolution "
            "via Implicit Neural Representations, MICCAI 2023."
        ),
    }


def _is_derivative_description(path: Path) -> bool:
    try:
        return json.loads(Path(path).read_text()).get("DatasetType") == "derivative"
    except (OSError, ValueError, AttributeError):
        return False


def create_once(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists; True when this call created it.

    The text goes to a temporary file that is then hard-linked to ``path``:
    ``link`` fails when ``path`` exists, so of several processes racing, exactly
    one creates the file and nobody ever sees it half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def write_dataset_files(out_dir: Path, bids_dir: Path) -> None:
    """Write ``dataset_description.json`` once and make sure ``.bidsignore`` lists our extras.

    Safe when several participant processes share ``out_dir``: the description
    is created once (:func:`create_once`) and kept on later runs; only an
    unreadable or non-derivative one is replaced.
    """
    path = Path(out_dir) / "dataset_description.json"
    text = json.dumps(dataset_description(bids_dir), indent=2) + "\n"
    if not create_once(path, text) and not _is_derivative_description(path):
        atomic_write_text(path, text)
    ensure_bidsignore(out_dir, BIDSIGNORE_PATTERNS)


def ensure_bidsignore(out_dir: Path, patterns: Iterable[str]) -> None:
    """Append the missing ``patterns`` to ``out_dir/.bidsignore`` (lines of others are kept)."""
    path = Path(out_dir) / ".bidsignore"
    lines = path.read_text().splitlines() if path.exists() else []
    missing = [p for p in patterns if p not in lines]
    if missing or not path.exists():
        atomic_write_text(path, "\n".join(lines + missing) + "\n")


# -- sidecars ----------------------------------------------------------------------


def input_record(cand: Candidate, bids_dir: Path) -> dict:
    """How one input looked: source URI, suffix, grid and slice direction."""
    return {
        "Source": bids_uri(cand.path, bids_dir),
        "Suffix": cand.suffix,
        "Shape": list(cand.shape),
        "VoxelSizeMM": [round(s, 4) for s in cand.spacing],
        "ThroughPlane": cand.plane if cand.anisotropic else "isotropic",
        "ObliquityDeg": round(cand.obliquity_deg, 2),
    }


def sidecar(
    cand: Candidate,
    chosen: Sequence[Candidate],
    bids_dir: Path,
    resolution: float,
    out_shape: Sequence[int],
    super_resolution: dict,
    skull_stripped: bool,
    extra: dict | None = None,
) -> dict:
    """Sidecar JSON of the super-resolved ``cand`` (one of ``chosen``).

    ``super_resolution`` is the method-specific part of the ``SuperResolution``
    object (see :func:`super_resolution_fields`); the inputs, partners and
    software version are added here. ``extra`` (e.g. QC metrics) is merged at the
    top level.
    """
    # The spline baseline interpolates each contrast on its own: no partners.
    fused = super_resolution.get("Method", "inr") != "spline"
    sources = list(chosen) if fused else [cand]
    partners = [c.label for c in sources if c is not cand]
    sr = {
        "Contrast": cand.label,
        "PartnerContrasts": partners,
        "Inputs": [input_record(c, bids_dir) for c in sources],
        "OutputShape": [int(n) for n in out_shape],
        **super_resolution,
        "SoftwareVersion": SOFTWARE_VERSION,
    }
    how = (
        "an implicit neural representation fitted jointly to"
        if fused
        else "cubic-spline interpolation of"
    )
    out = {
        "Description": (
            f"Isotropic {resolution:g} mm {cand.suffix} from {how} "
            f"{', '.join(c.path.name for c in sources)}"
        ),
        "Sources": [bids_uri(c.path, bids_dir) for c in sources],
        "SkullStripped": bool(skull_stripped),
        "Resolution": f"{resolution:g} mm isotropic",
        "SuperResolution": sr,
    }
    if extra:
        out.update(extra)
    return out


def super_resolution_fields(
    *,
    method: str,
    preset: str | None,
    architecture: str | None,
    config: dict,
    seed: int,
    device: str,
    epochs_run: int,
    selected_epoch: int,
    stop_reason: str,
    mi_curve: dict,
    loss_curve: dict,
    wall_time_s: float,
    samples_per_s: float | None,
    resolution: float,
    registration: dict | None = None,
    peak_gpu_mb: float | None = None,
    peak_gpu_allocated_mb: float | None = None,
) -> dict:
    """The fit-specific keys of the sidecar's ``SuperResolution`` object (README "Outputs")."""

    def rounded(curves: dict) -> dict:
        return {k: [round(float(v), 6) for v in vals] for k, vals in curves.items()}

    return {
        "Method": method,
        "Preset": preset,
        "Architecture": architecture,
        "ResolutionMM": float(resolution),
        "Config": config,
        "Seed": int(seed),
        "Device": device,
        "EpochsRun": int(epochs_run),
        "SelectedEpoch": int(selected_epoch),
        "StopReason": stop_reason,
        "MICurve": rounded(mi_curve),
        "LossCurve": rounded(loss_curve),
        "WallTimeS": round(float(wall_time_s), 3),
        "SamplesPerS": None if samples_per_s is None else round(float(samples_per_s), 1),
        "PeakGPUMemoryMB": None if peak_gpu_mb is None else round(float(peak_gpu_mb), 1),
        "PeakGPUAllocatedMB": (
            None if peak_gpu_allocated_mb is None else round(float(peak_gpu_allocated_mb), 1)
        ),
        "Registration": registration or {},
    }


def input_transform(sidecar_obj: dict, input_name: str) -> np.ndarray | None:
    """World transform (4, 4) of input file ``input_name`` into the output's world, or None.

    Reads what the workflow records in ``SuperResolution.Registration``: the
    input's rigid registration ``Inputs[<file name>].Matrix`` (input world ->
    reference world; absent for the reference and with ``--no-registration``)
    followed, for template-space outputs, by ``Template.Matrix`` (reference
    world -> template world). None means identity.
    """
    reg = sidecar_obj.get("SuperResolution", {}).get("Registration", {}) or {}
    moving = (reg.get("Inputs", {}) or {}).get(input_name, {}).get("Matrix")
    template = (reg.get("Template", {}) or {}).get("Matrix")
    mats = [np.asarray(m, dtype=float) for m in (moving, template) if m is not None]
    if not mats:
        return None
    out = np.eye(4)
    for m in mats:  # moving first, then template
        out = m @ out
    return out
