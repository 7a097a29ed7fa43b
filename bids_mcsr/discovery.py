"""Finding the anatomical images of each participant/session and choosing what to fuse.

Images are classified from their NIfTI headers, not their names: a contrast is
*anisotropic* when its largest / smallest voxel spacing is at least
:data:`~bids_mcsr.geometry.ANISOTROPY_THRESHOLD` (1.5), and its *through-plane
direction* is the world axis (RAS) closest to its thickest voxel axis
(``axial`` = slices stacked along z, ``coronal`` = y, ``sagittal`` = x; oblique
acquisitions are assigned to the closest axis and their angle is kept).

Selection rule (deterministic; README "Usage"):

* Without ``--contrasts``: only anisotropic, readable images are candidates, at
  most one per suffix. Suffixes are taken in the order of :data:`ANAT_SUFFIXES`;
  the first one found is the reference (the output grid follows its axes).
* With ``--contrasts A B ...``: exactly those suffixes, in that order (the first
  is the reference), isotropic images allowed; a missing suffix is an error.
* Several images of one suffix (``run-``, ``acq-``, ``ce-``, ``rec-``): prefer one
  whose through-plane direction is not yet covered by the contrasts already
  chosen (complementary views carry the most information), then the lowest run
  number, then acq, ce and rec labels alphabetically (none first), then the path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import DatasetError, NotEnoughContrasts, ParticipantError
from .geometry import is_anisotropic, through_plane, voxel_sizes
from .images import header_problem

log = logging.getLogger(__name__)

#: Anatomical suffixes considered, in the default reference order.
ANAT_SUFFIXES = ("T1w", "T2w", "FLAIR", "PDw", "T2starw", "inplaneT1", "inplaneT2", "T1map")

#: Entities kept in output names, in BIDS order (after sub and ses).
NAME_ENTITIES = ("acq", "ce", "rec", "run")

_ENTITY_RE = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")


@dataclass
class Candidate:
    """One anatomical NIfTI file and what its header says about it.

    ``entities`` maps short BIDS keys (``sub``, ``ses``, ``acq``, ``ce``, ``rec``,
    ``run``) to the labels as written in the filename (zero padding kept).
    ``spacing`` is the voxel size (3,) in mm; ``plane`` the through-plane direction
    and ``obliquity_deg`` its angle to the nearest world axis. ``problem`` is the
    one-line reason the file is unusable, or None.
    """

    path: Path
    suffix: str
    entities: dict[str, str]
    metadata: dict = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)
    anisotropic: bool = False
    plane: str = ""
    obliquity_deg: float = 0.0
    problem: str | None = None

    @property
    def label(self) -> str:
        """Short human label, e.g. ``T1w (acq-fast run-2)``."""
        extra = " ".join(f"{k}-{self.entities[k]}" for k in NAME_ENTITIES if k in self.entities)
        return f"{self.suffix} ({extra})" if extra else self.suffix

    def describe(self) -> str:
        sp = "x".join(f"{s:g}" for s in self.spacing)
        kind = f"{self.plane} slices" if self.anisotropic else "isotropic"
        return f"{self.path.name} [{sp} mm, {kind}]"


@dataclass
class Job:
    """One unit of participant-level work: a subject, optionally a session, its candidates."""

    subject: str
    session: str | None
    candidates: list[Candidate]

    @property
    def name(self) -> str:
        return f"sub-{self.subject}" + (f" ses-{self.session}" if self.session else "")


def parse_entities(path: Path | str) -> tuple[dict[str, str], str]:
    """BIDS entities (short keys -> labels) and the suffix from a filename."""
    name = Path(path).name
    stem = name.split(".", 1)[0]
    parts = stem.split("_")
    entities = {}
    for part in parts[:-1]:
        m = _ENTITY_RE.match(part)
        if m:
            entities[m.group(1)] = m.group(2)
    return entities, parts[-1]


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-01`` -> ``01`` (labels may be given with or without the prefix)."""
    return label[len(prefix) :] if label.startswith(prefix) else label


def classify(path: Path, metadata: dict | None = None) -> Candidate:
    """Read the header of ``path`` and describe it as a :class:`Candidate`."""
    entities, suffix = parse_entities(path)
    cand = Candidate(path=Path(path), suffix=suffix, entities=entities, metadata=metadata or {})
    cand.problem = header_problem(cand.path)
    if cand.problem is None:
        img = nib.load(str(cand.path))
        affine = img.affine
        cand.shape = tuple(int(n) for n in img.shape[:3])
        cand.spacing = tuple(float(s) for s in voxel_sizes(affine))  # type: ignore[assignment]
        cand.anisotropic = is_anisotropic(affine)
        cand.plane, cand.obliquity_deg = through_plane(affine)
    return cand


_JSON_ERROR_RE = re.compile(r"decode JSON from file <\w+ filename='([^']+)'>")


def _index(bids_dir: Path, database_dir: Path | None):
    """pybids layout of ``bids_dir``; an invalid JSON sidecar costs only the metadata index.

    pybids gives up on the whole dataset for one unparsable sidecar; then the
    files are indexed without metadata (each image's own sidecar is read by
    :func:`own_sidecar`) and the broken file is named in a warning.
    """
    from bids import BIDSLayout, BIDSLayoutIndexer

    kwargs: dict = {"validate": False}
    if database_dir is not None:
        kwargs["database_path"] = str(database_dir)
    try:
        return BIDSLayout(str(bids_dir), **kwargs)
    except OSError as exc:
        bad = _JSON_ERROR_RE.search(str(exc))
        if bad is None:
            raise
        log.warning(
            "%s: not valid JSON; fix: repair or remove it (its metadata is ignored)", bad.group(1)
        )
    return BIDSLayout(str(bids_dir), indexer=BIDSLayoutIndexer(index_metadata=False), **kwargs)


def open_layout(bids_dir: Path, database_dir: Path | None = None):
    """Index ``bids_dir`` with pybids without validating and without writing into it.

    ``database_dir`` (``--bids-database-dir``) keeps the index for later runs;
    without it the index lives in memory for this process only. The index is
    built in a private temporary folder beside ``database_dir`` and renamed
    into place, so participant processes started together never write the same
    SQLite file: one publishes its index, the others only read it afterwards.
    """
    try:
        if database_dir is None:
            return _index(bids_dir, None)
        db = Path(database_dir)
        if not (db / "layout_index.sqlite").is_file():
            db.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{db.name}.", dir=db.parent))
            try:
                _index(bids_dir, tmp)
                os.rename(tmp, db)  # fails when another process published first
            except OSError:
                if not (db / "layout_index.sqlite").is_file():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return _index(bids_dir, db)
    except Exception as exc:  # pybids raises many types for a broken tree
        raise DatasetError(
            f"{bids_dir}: cannot be indexed as a BIDS dataset ({exc}); fix: check that it "
            "has a dataset_description.json and sub-<label>/ folders"
        ) from None


def own_sidecar(image: Path) -> dict:
    """The JSON sidecar beside ``image`` (same name, ``.json``), {} when absent or invalid.

    An invalid file is named in a warning; it never stops the image from being used.
    """
    path = Path(str(image).removesuffix(".gz").removesuffix(".nii") + ".json")
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: not valid JSON (%s); fix: repair or remove it (ignored)", path, exc)
        return {}
    return meta if isinstance(meta, dict) else {}


def find_jobs(
    layout,
    participant_labels: list[str] | None = None,
    session_labels: list[str] | None = None,
) -> list[Job]:
    """All (subject, session) jobs with their anatomical candidates, sorted.

    Raises :class:`DatasetError` when a requested participant or session does
    not exist.
    """
    subjects = sorted(layout.get_subjects())
    if not subjects:
        raise DatasetError(
            f"{layout.root}: no sub-<label> folders found; fix: point bids_dir at the dataset root"
        )
    if participant_labels:
        wanted = [strip_prefix(p, "sub-") for p in participant_labels]
        missing = [p for p in wanted if p not in subjects]
        if missing:
            raise DatasetError(
                f"participant(s) {', '.join(missing)} not in {layout.root}; "
                f"fix: choose from {', '.join(subjects)}"
            )
        subjects = [s for s in subjects if s in wanted]
    sessions_wanted = [strip_prefix(s, "ses-") for s in session_labels or []]

    jobs = []
    for sub in subjects:
        files = layout.get(
            subject=sub,
            datatype="anat",
            suffix=list(ANAT_SUFFIXES),
            extension=[".nii", ".nii.gz"],
        )
        by_session: dict[str | None, list[Candidate]] = {}
        for f in sorted(files, key=lambda f: f.path):
            try:
                meta = layout.get_metadata(f.path)
            except Exception:  # an unreadable sidecar must not hide the image
                meta = {}
            meta = meta or own_sidecar(Path(f.path))
            cand = classify(Path(f.path), meta)
            by_session.setdefault(cand.entities.get("ses"), []).append(cand)
        for ses in sorted(by_session, key=lambda s: s or ""):
            if sessions_wanted and ses not in sessions_wanted:
                continue
            jobs.append(Job(subject=sub, session=ses, candidates=by_session[ses]))
    if sessions_wanted and not jobs:
        raise DatasetError(
            f"session(s) {', '.join(sessions_wanted)} not found for the selected participants; "
            "fix: check --session_label against the ses-<label> folders"
        )
    return jobs


def _pick_key(cand: Candidate, covered_planes: set[str]) -> tuple:
    run = cand.entities.get("run")
    return (
        cand.plane in covered_planes,
        int(run) if run and run.isdigit() else 0,
        cand.entities.get("acq", ""),
        cand.entities.get("ce", ""),
        cand.entities.get("rec", ""),
        str(cand.path),
    )


def select_contrasts(job: Job, contrasts: list[str] | None = None) -> list[Candidate]:
    """Choose the images of ``job`` to fuse (see the module docstring for the rule).

    Returns at least two candidates, the reference first. Raises
    :class:`NotEnoughContrasts` when fewer than two usable contrasts exist, and
    :class:`ParticipantError` when a suffix named in ``contrasts`` is missing or
    all its files are unusable. Logs a warning for each unusable file and when
    all chosen contrasts share one through-plane direction.
    """
    usable = []
    for cand in job.candidates:
        if cand.problem:
            log.warning("%s: skipping unusable file: %s", job.name, cand.problem)
        else:
            usable.append(cand)

    if contrasts:
        order = list(dict.fromkeys(contrasts))
        for suffix in order:
            if not any(c.suffix == suffix for c in job.candidates):
                found = sorted({c.suffix for c in job.candidates}) or ["none"]
                raise ParticipantError(
                    f"{job.name}: no {suffix} image found (anat suffixes present: "
                    f"{', '.join(found)}); fix: check --contrasts"
                )
            if not any(c.suffix == suffix for c in usable):
                bad = next(c for c in job.candidates if c.suffix == suffix)
                raise ParticipantError(bad.problem or f"{job.name}: no usable {suffix} image")
        pool = usable
    else:
        order = [s for s in ANAT_SUFFIXES if any(c.suffix == s for c in usable)]
        pool = [c for c in usable if c.anisotropic]
        order = [s for s in order if any(c.suffix == s for c in pool)]

    chosen: list[Candidate] = []
    for suffix in order:
        options = [c for c in pool if c.suffix == suffix]
        covered = {c.plane for c in chosen if c.anisotropic}
        best = min(options, key=lambda c: _pick_key(c, covered))
        if len(options) > 1:
            log.info("%s: %d %s images, using %s", job.name, len(options), suffix, best.path.name)
        chosen.append(best)

    if len(chosen) < 2:
        listed = "; ".join(c.describe() for c in usable) or "no usable anatomical images"
        hint = (
            "fix: name the contrasts to fuse with --contrasts (isotropic ones are then allowed)"
            if len(usable) >= 2
            else "fix: mcsr needs at least two contrasts of one session"
        )
        raise NotEnoughContrasts(
            f"{job.name}: fewer than two anisotropic contrasts to fuse ({listed}); {hint}"
        )

    planes = {c.plane for c in chosen if c.anisotropic}
    if len(planes) == 1 and all(c.anisotropic for c in chosen):
        log.warning(
            "%s: all contrasts have %s slices; fusing views with the same through-plane "
            "direction recovers little through-plane detail",
            job.name,
            planes.pop(),
        )
    return chosen


def summarise(cands: list[Candidate]) -> str:
    """One line per chosen candidate, for logs."""
    return ", ".join(
        f"{c.label}: {'x'.join(f'{s:g}' for s in c.spacing)} mm "
        f"{c.plane if c.anisotropic else 'isotropic'} (ratio {anisotropy_of(c):.1f})"
        for c in cands
    )


def anisotropy_of(cand: Candidate) -> float:
    sp = np.asarray(cand.spacing, dtype=float)
    return float(sp.max() / sp.min()) if sp.min() > 0 else float("nan")


def find_validator() -> str | None:
    """Path of the ``bids-validator-deno`` executable (PATH, then next to this Python)."""
    import shutil
    import sys

    exe = shutil.which("bids-validator-deno")
    if exe:
        return exe
    beside = Path(sys.executable).parent / "bids-validator-deno"
    return str(beside) if beside.is_file() else None


def validator_issues(root: Path, timeout_s: float = 600) -> list[dict]:
    """Run the BIDS validator on ``root`` (offline) and return its issues.

    Each issue is the validator's JSON record (``code``, ``severity``,
    ``location``, ...). Raises FileNotFoundError when the validator is not
    installed and RuntimeError when it crashes or prints no JSON.
    """
    import json
    import subprocess

    exe = find_validator()
    if exe is None:
        raise FileNotFoundError("bids-validator-deno")
    proc = subprocess.run(
        [exe, "--format", "json", str(root)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(
            f"bids-validator-deno failed (exit {proc.returncode}): {tail[0]}"
        ) from None
    return list(report.get("issues", {}).get("issues", []))


def validator_errors(root: Path) -> list[str]:
    """Error-level validator issues of ``root`` as ``CODE at /location`` lines."""
    return [
        f"{i.get('code')}{'/' + i['subCode'] if i.get('subCode') else ''} at "
        f"{i.get('location', '/')}"
        for i in validator_issues(root)
        if i.get("severity") == "error"
    ]
