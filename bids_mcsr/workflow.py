"""One participant/session, from chosen BIDS inputs to written derivatives.

The work is a chain of small named steps, each a plain function::

    load_inputs -> register_inputs -> input_masks -> output_grid_for -> fit
        -> (template space) -> write_outputs (images, QC, sidecars last)

:func:`run_job` strings them together for one :class:`~bids_mcsr.discovery.Job`
and returns a :class:`JobResult`. Conventions: every transform is a 4x4
*moving world -> reference world* matrix (``None`` = identity); the reference is
the first chosen contrast; the effective affine of input ``i`` is
``geometry.compose(transforms[i], images[i].affine)``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import derivatives, masks, qc
from .discovery import Candidate, Job, select_contrasts, summarise
from .errors import ParticipantError
from .geometry import compose, corners_world, lattice_offset, output_grid, voxel_sizes
from .images import Image, load_image
from .inr.presets import json_ready
from .report.participant import ContrastEntry, report_path, write_participant_report
from .resample import resample_to_grid

log = logging.getLogger(__name__)

#: Output spaces the participant level can write (``--output-space``): the
#: reference's own grid, or a template (``templates.template_space``).
SUPPORTED_SPACES = ("native", "MNI152NLin2009cAsym")

#: Below this fraction of the smaller field of view shared with the reference,
#: an input is fused with a warning (only the shared part has two views).
MIN_OVERLAP_FRACTION = 0.5


@dataclass
class Options:
    """Everything the participant level needs from the command line."""

    method: str = "inr"  # "inr" | "spline"
    preset: str = "fast"
    architecture: str = "split-head"
    epochs: int | None = None
    overrides: dict = field(default_factory=dict)
    device: str = "auto"
    seed: int = 0
    nthreads: int | None = None
    resolution: float | None = None  # mm; None = finest spacing among the inputs
    contrasts: list[str] | None = None
    registration: bool = True
    mask: Path | None = None
    output_space: str = "native"
    overwrite: bool = False
    progress: bool = True

    def engine_overrides(self) -> dict:
        """Preset overrides for the engine: ``--override`` pairs plus ``--epochs``."""
        out = dict(self.overrides)
        if self.epochs is not None:
            out["epochs"] = int(self.epochs)
        return out


@dataclass
class JobResult:
    """What happened to one job: ``status`` is done | complete | skipped | failed."""

    job: Job
    status: str
    outputs: list[Path] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0


@dataclass
class Fit:
    """Output of the fit step, common to the INR engine and the spline baseline."""

    volumes: dict[str, np.ndarray]  # contrast label -> float32 (out_shape)
    sr_fields: dict  # derivatives.super_resolution_fields(...)
    # contrast label -> 4x4 correction (fit world) learned with the field, applied
    # after that input's fit transform (inr.fit.FitResult.pose_corrections)
    pose_corrections: dict[str, np.ndarray] = field(default_factory=dict)


# -- steps ---------------------------------------------------------------------------


def load_inputs(chosen: list[Candidate]) -> list[Image]:
    """Read and validate every chosen input (raises ImageError naming the file)."""
    return [load_image(c.path) for c in chosen]


def auto_masks(images: list[Image]) -> list[np.ndarray]:
    """Automatic foreground mask of each input on its own grid (``masks.foreground_mask``)."""
    return [masks.foreground_mask(img.data, img.affine) for img in images]


def register_inputs(
    images: list[Image], fg: list[np.ndarray], opts: Options
) -> tuple[list[np.ndarray | None], dict]:
    """Rigid transforms (moving world -> reference world) of each input, reference first.

    With ``--no-registration`` every transform is the identity (the scanner
    coordinates are trusted, ``None``); otherwise each input is registered to
    the first one by mutual information inside the foregrounds ``fg``, and a
    pose that moves the reference foreground by less than
    ``registration.HEADER_TRUST_MM`` on average, or improves MI by less than
    ``HEADER_TRUST_GAIN``, is not applied (the headers are kept: ``None``). Returns the transforms and the sidecar's
    ``Registration`` object.
    """
    transforms: list[np.ndarray | None] = [None] * len(images)
    record: dict = {"Method": "none" if not opts.registration else "rigid-mattes-mi"}
    if not opts.registration:
        return transforms, record
    # SimpleITK is imported only here: the app runs without it when registration is off.
    from .registration import (
        HEADER_TRUST_GAIN,
        HEADER_TRUST_MM,
        register_rigid,
        transform_summary,
    )

    ref = images[0]
    record["Reference"] = ref.path.name
    record["HeaderTrust"] = {
        "MinMeanDisplacementMm": HEADER_TRUST_MM,
        "MinMIGain": HEADER_TRUST_GAIN,
    }
    record["Inputs"] = {}
    for i, img in enumerate(images[1:], start=1):
        report: dict = {}
        try:
            transforms[i] = register_rigid(
                ref.data,
                ref.affine,
                img.data,
                img.affine,
                fixed_mask=fg[0],
                moving_mask=fg[i],
                seed=opts.seed,
                threads=opts.nthreads or 2,
                min_motion_mm=HEADER_TRUST_MM,
                min_gain=HEADER_TRUST_GAIN,
                report=report,
            )
        except RuntimeError as exc:  # ITK: too few voxels, no overlap, ...
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ParticipantError(
                f"{img.path}: rigid registration to {ref.path.name} failed ({first}); fix: "
                "check that both scans show the same head, or pass --no-registration"
            ) from None
        found = float(report["found_mm"])
        if report["kept_start"]:
            transforms[i] = None
            log.info(
                "registered %s -> %s: headers kept (the best pose moves the brain %.2f mm "
                "and gains %.2f %% MI; a change needs %.2g mm and %.2g %%)",
                img.path.name,
                ref.path.name,
                found,
                100 * report["gain"],
                HEADER_TRUST_MM,
                100 * HEADER_TRUST_GAIN,
            )
        summary = transform_summary(np.eye(4) if transforms[i] is None else transforms[i])
        if transforms[i] is not None:
            log.info(
                "registered %s -> %s: %.2f deg, %.2f mm (brain moved %.2f mm on average)",
                img.path.name,
                ref.path.name,
                summary["RotationDeg"],
                summary["DisplacementMm"],
                found,
            )
        record["Inputs"][img.path.name] = {
            **summary,
            "HeadersKept": transforms[i] is None,
            "FoundMeanDisplacementMm": round(found, 4),
            "FoundMIGain": round(float(report["gain"]), 6),
            "MetricFinal": report.get("metric"),
            "MetricInitial": report.get("metric_initial"),
        }
    return transforms, record


def write_transforms(
    job: Job,
    chosen: list[Candidate],
    transforms: list[np.ndarray | None],
    registration: dict,
    out_dir: Path,
) -> list[Path]:
    """ITK text file of each registered input's transform, named in the BIDS style
    ``sub-<L>[_ses-<S>]_from-<input>_to-<reference>_mode-image_xfm.txt`` in the anat folder
    (``registration.save_transform`` documents the convention); the sidecar's
    ``Registration.Inputs[<file>].TransformFile`` names it."""
    if not registration.get("Inputs"):
        return []  # --no-registration: nothing estimated, and SimpleITK may be absent
    from .registration import save_transform

    def label(c: Candidate) -> str:  # BIDS labels are alphanumeric
        return "".join(ch for ch in c.label if ch.isalnum())

    folder = derivatives.anat_dir(out_dir, job.subject, job.session)
    prefix = f"sub-{job.subject}" + (f"_ses-{job.session}" if job.session else "")
    written = []
    for c, t in zip(chosen[1:], transforms[1:], strict=True):
        if c.path.name not in registration.get("Inputs", {}):
            continue  # --no-registration: no transform was estimated
        folder.mkdir(parents=True, exist_ok=True)
        # Transforms are not in the BIDS 1.x schema yet (BEP014): keep the validator quiet.
        derivatives.ensure_bidsignore(out_dir, ["*_xfm.txt"])
        path = folder / f"{prefix}_from-{label(c)}_to-{label(chosen[0])}_mode-image_xfm.txt"
        # Headers kept (None): the identity, so every registered input has its file.
        written.append(save_transform(path, np.eye(4) if t is None else t))
        registration["Inputs"][c.path.name]["TransformFile"] = path.name
    return written


def fov_overlap(shape_a, affine_a, shape_b, affine_b) -> float:
    """Fraction of the smaller of two fields of view that lies in both (0..1).

    Measured on the world-axis bounding boxes of the voxel-centre grids (RAS mm),
    so it is exact for axis-aligned scans and approximate for oblique ones.
    """

    def box(shape, affine):
        pts = corners_world(shape, affine)
        return pts.min(axis=0), pts.max(axis=0)

    (lo_a, hi_a), (lo_b, hi_b) = box(shape_a, affine_a), box(shape_b, affine_b)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None).prod()
    smaller = min((hi_a - lo_a).prod(), (hi_b - lo_b).prod())
    return float(inter / smaller) if smaller > 0 else 0.0


def check_overlap(images: list[Image], affines: list[np.ndarray]) -> None:
    """Refuse inputs that share no field of view with the reference; warn when little.

    ``affines`` are in the reference world (header affines before registration,
    which starts from them). Raises ParticipantError naming the file.
    """
    ref = images[0]
    for img, aff in zip(images[1:], affines[1:], strict=True):
        frac = fov_overlap(ref.shape, affines[0], img.shape, aff)
        if frac <= 0:
            raise ParticipantError(
                f"{img.path}: its field of view does not overlap {ref.path.name} in world "
                "coordinates, so the scans cannot be fused; fix: check both headers' "
                "qform/sform (a wrong origin?) or choose other contrasts with --contrasts"
            )
        if frac < MIN_OVERLAP_FRACTION:
            log.warning(
                "%s: only %.0f%% of its field of view overlaps %s; outside the overlap "
                "each output comes from one contrast alone",
                img.path,
                100 * frac,
                ref.path.name,
            )


def effective_affines(images: list[Image], transforms: list[np.ndarray | None]) -> list[np.ndarray]:
    """Voxel -> reference-world affine of each input."""
    return [compose(t, img.affine) for img, t in zip(images, transforms, strict=True)]


def input_masks(
    images: list[Image], affines: list[np.ndarray], fg: list[np.ndarray], mask_file: Path | None
) -> list[np.ndarray]:
    """Foreground mask of each input on its own grid, for fitting, MI and QC.

    ``mask_file`` (``--mask``) is a mask on the reference (first) input's grid;
    it is carried to the other inputs through world space (``affines`` include
    the registration). Without it the automatic masks ``fg`` are used.
    """
    if mask_file is None:
        return fg
    ref = images[0]
    try:
        user = masks.load_mask(mask_file, ref.shape, ref.affine, ref.path.name)
    except ValueError as exc:
        raise ParticipantError(str(exc)) from None
    return [user] + [
        masks.resample_mask(user, affines[0], img.shape, aff)
        for img, aff in zip(images[1:], affines[1:], strict=True)
    ]


def output_grid_for(
    images: list[Image], affines: list[np.ndarray], resolution: float | None
) -> tuple[tuple[int, int, int], np.ndarray, float]:
    """Common isotropic output grid ``(shape, affine, resolution_mm)``.

    Default resolution: the finest voxel spacing among the inputs (their
    in-plane resolution). Covers the union of the inputs' FOVs on the first
    (reference) input's voxel lattice (``geometry.output_grid``).
    """
    if resolution is None:
        resolution = float(min(voxel_sizes(img.affine).min() for img in images))
    shape, affine = output_grid(
        [(img.shape, a) for img, a in zip(images, affines, strict=True)], resolution
    )
    return shape, affine, float(resolution)


def grid_record(out_affine: np.ndarray, lattice_name: str, lattice_affine: np.ndarray) -> dict:
    """The sidecar's ``OutputGrid``: whose voxel lattice the output follows, and where
    output voxel ``(0, 0, 0)`` lies in that grid's voxel coordinates."""
    offset = lattice_offset(out_affine, lattice_affine)
    return {"LatticeOf": lattice_name, "FirstVoxelIn": [round(float(v), 6) for v in offset]}


def sidecar_slice_thickness(cand: Candidate, img: Image) -> float | None:
    """The sidecar's ``SliceThickness`` (mm) for the engine's slice profile, or None.

    None (the engine then uses the spacing along the slice axis) when the sidecar
    has none, or, with a warning, when it is implausible: not a number > 0 and
    <= 2x that spacing (a thickness far beyond the spacing is a header mistake
    more often than real overlapping slices).
    """
    value = cand.metadata.get("SliceThickness")
    if value is None:
        return None
    spacing = float(voxel_sizes(img.affine).max())
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 2 * spacing:
        return float(value)
    log.warning(
        "%s: sidecar SliceThickness %r is not in (0, %.3g] mm (2x the %.3g mm slice "
        "spacing); using the spacing as the slice thickness. Fix the sidecar if the "
        "scan's slices really are thicker or thinner",
        img.path,
        value,
        2 * spacing,
        spacing,
    )
    return None


def fit_inr(
    chosen: list[Candidate],
    images: list[Image],
    transforms: list[np.ndarray | None],
    in_masks: list[np.ndarray],
    out_shape: tuple[int, int, int],
    out_affine: np.ndarray,
    out_mask: np.ndarray,
    resolution: float,
    opts: Options,
    refine: list[bool] | None = None,
) -> Fit:
    """Fit the split-head INR (``inr.fit.fit_contrasts``) and sample it on the output grid.

    ``refine`` flags the inputs whose pose the field refines (those registration
    moved; the preset's ``pose_lr`` switches it on).
    """
    from .inr.fit import Contrast, fit_contrasts

    thickness = [sidecar_slice_thickness(c, img) for c, img in zip(chosen, images, strict=True)]
    refine = refine or [False] * len(chosen)
    contrasts = [
        Contrast(
            name=c.label,
            data=img.data,
            affine=img.affine,
            transform=t,
            mask=m,
            slice_thickness=st,
            refine_pose=r,
        )
        for c, img, t, m, st, r in zip(
            chosen, images, transforms, in_masks, thickness, refine, strict=True
        )
    ]
    try:
        res = fit_contrasts(
            contrasts,
            out_shape,
            out_affine,
            preset=opts.preset,
            architecture=opts.architecture,
            overrides=opts.engine_overrides(),
            device=opts.device,
            seed=opts.seed,
            nthreads=opts.nthreads,
            out_mask=out_mask,
            progress=opts.progress,
        )
    except (ValueError, KeyError) as exc:
        # Invalid preset overrides or an unusable device are the user's to fix.
        raise ParticipantError(f"engine rejected the settings: {exc}") from None
    for entry, st in zip(res.config["contrasts"], thickness, strict=True):
        entry["slice_thickness_source"] = "spacing" if st is None else "SliceThickness"
    fields = derivatives.super_resolution_fields(
        method="inr",
        preset=opts.preset,
        architecture=opts.architecture,
        config=res.config,
        seed=res.seed,
        device=res.device,
        epochs_run=res.epochs_run,
        selected_epoch=res.selected_epoch,
        stop_reason=res.stop_reason,
        mi_curve=res.mi_curve,
        loss_curve=res.loss_curve,
        wall_time_s=res.wall_time_s,
        samples_per_s=res.samples_per_s,
        resolution=resolution,
        peak_gpu_mb=res.peak_gpu_mb,
        peak_gpu_allocated_mb=res.peak_gpu_allocated_mb,
    )
    return Fit(volumes=dict(res.volumes), sr_fields=fields, pose_corrections=res.pose_corrections)


def apply_pose_corrections(
    chosen: list[Candidate],
    fit: Fit,
    transforms: list[np.ndarray | None],
    fit_transforms: list[np.ndarray | None],
    registration: dict,
    space_transform: np.ndarray | None = None,
) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
    """The registration and fit transforms with the field's learned pose applied.

    A correction ``C`` is learned in the fit's world: the fit transform becomes
    ``C @ F``; the registration transform (reference world) ``inv(S) @ C @ S @ T``
    with ``S`` the template transform (identity in native space). The sidecar's
    ``Registration.Inputs`` entry then gives the refined pose, with the plain
    registration under ``BeforeJointRefinement``.
    """
    if not fit.pose_corrections:
        return transforms, fit_transforms
    from .registration import transform_summary

    s = np.eye(4) if space_transform is None else np.asarray(space_transform, dtype=float)
    transforms, fit_transforms = list(transforms), list(fit_transforms)
    for i, c in enumerate(chosen):
        corr = fit.pose_corrections.get(c.label)
        if corr is None or transforms[i] is None:
            continue
        before = transforms[i]
        transforms[i] = np.linalg.inv(s) @ corr @ s @ before
        fit_transforms[i] = corr @ fit_transforms[i]  # S @ T: never None where T is not
        entry = registration["Inputs"][c.path.name]
        entry.update(transform_summary(transforms[i]))
        entry["BeforeJointRefinement"] = transform_summary(before)
        entry["JointRefinement"] = transform_summary(corr)
    return transforms, fit_transforms


def fit_spline(
    chosen: list[Candidate],
    images: list[Image],
    affines: list[np.ndarray],
    out_shape: tuple[int, int, int],
    out_affine: np.ndarray,
    resolution: float,
    opts: Options,
) -> Fit:
    """Cubic-spline baseline: each input resampled on its own onto the output grid.

    Plain cubic B-spline interpolation, the paper's baseline 1: values are not
    clipped (clipping the overshoot at edges changes what the benchmark compares
    against, and the min-max normalised PSNR with it).
    """
    start = time.perf_counter()
    volumes = {}
    for c, img, aff in zip(chosen, images, affines, strict=True):
        volumes[c.label] = resample_to_grid(img.data, aff, out_shape, out_affine, order=3)
    fields = derivatives.super_resolution_fields(
        method="spline",
        preset=None,
        architecture=None,
        config={"interpolation": "cubic B-spline", "order": 3, "outside_fov": 0.0},
        seed=opts.seed,
        device="cpu",
        epochs_run=0,
        selected_epoch=0,
        stop_reason="not-iterative",
        mi_curve={},
        loss_curve={},
        wall_time_s=time.perf_counter() - start,
        samples_per_s=None,
        resolution=resolution,
    )
    return Fit(volumes=volumes, sr_fields=fields)


def write_outputs(
    job: Job,
    chosen: list[Candidate],
    images: list[Image],
    transforms: list[np.ndarray | None],
    in_masks: list[np.ndarray],
    fit: Fit,
    out_shape: tuple[int, int, int],
    out_affine: np.ndarray,
    out_mask: np.ndarray,
    resolution: float,
    skull_stripped: bool,
    bids_dir: Path,
    out_dir: Path,
    provenance: dict | None = None,
    space=None,
) -> list[Path]:
    """Write every image, then QC it, then write the sidecars (last, so a sidecar's
    presence means its image is complete), then the participant report
    (``provenance``: extra rows for its provenance table). Returns the written
    images and sidecars.

    ``transforms`` map each input's world to the output world (for a template
    ``space``, a ``templates.TemplateSpace``, the template step is included);
    ``space`` adds ``space-<name>`` to the names and ``SpatialReference`` to the
    sidecars."""
    space_name = space.name if space is not None else None
    extra_meta = {"SpatialReference": space.spatial_reference} if space is not None else {}
    written = []
    pending = []
    for c, img, t, m in zip(chosen, images, transforms, in_masks, strict=True):
        nii, js = derivatives.output_paths(out_dir, job.subject, job.session, c, space_name)
        vol = fit.volumes[c.label]
        derivatives.atomic_write_nifti(nii, vol, out_affine)
        qc_obj, cons = qc.assess(vol, out_affine, img.data, img.affine, t, m, out_mask)
        pending.append((c, js, qc_obj, cons, nii))
        written.append(nii)
    entries = []
    for (c, js, qc_obj, cons, nii), img, t, m in zip(
        pending, images, transforms, in_masks, strict=True
    ):
        meta = derivatives.sidecar(
            c,
            chosen,
            bids_dir,
            resolution,
            out_shape,
            fit.sr_fields,
            skull_stripped,
            extra={**extra_meta, "QC": qc_obj},
        )
        written.append(derivatives.atomic_write_json(js, meta))
        entries.append(
            ContrastEntry(
                c.label,
                img.data,
                img.affine,
                fit.volumes[c.label],
                out_affine,
                meta,
                transform=t,
                input_mask=m,
                consistency=cons,
                input_name=c.path.name,
                output_name=nii.name,
            )
        )
    write_report(job, entries, provenance or {}, out_dir)
    return written


def write_report(job: Job, entries: list[ContrastEntry], provenance: dict, out_dir: Path) -> None:
    """Participant report ``out_dir/sub-<L>[_ses-<S>].html`` (README "Reading the QC reports").

    Written after the images and sidecars, so a drawing problem costs the report
    only, never the outputs; it is logged as a warning.
    """
    path = report_path(out_dir, job.subject, job.session)
    try:
        write_participant_report(path, entries, provenance)
    except Exception as exc:  # outputs are complete; the report is their commentary
        log.debug("%s: report traceback", job.name, exc_info=True)
        log.warning(
            "%s: participant report not written (%s: %s)", job.name, type(exc).__name__, exc
        )
    else:
        log.info("%s: report %s", job.name, path)


def template_step(ref: Image, ref_mask: np.ndarray, skull_stripped: bool, resolution: float, opts):
    """Rigid alignment of the reference to ``opts.output_space`` (``templates.template_space``).

    Returns the ``TemplateSpace`` (reference world -> template world transform
    and the output grid on the template's field of view at ``resolution`` mm).
    A missing template or a failed alignment fails the participant with one line.
    """
    from .templates import template_space

    try:
        space = template_space(
            ref.data,
            ref.affine,
            opts.output_space,
            resolution,
            ref_mask=ref_mask,
            skull_stripped=skull_stripped,
            seed=opts.seed,
        )
    except ValueError as exc:
        raise ParticipantError(
            f"{exc}; fix: pre-fetch the template into TEMPLATEFLOW_HOME or use --output-space native"
        ) from None
    except RuntimeError as exc:  # ITK: no overlap with the template, ...
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ParticipantError(
            f"{ref.path}: rigid alignment to {opts.output_space} failed ({first}); fix: check "
            "that the reference contrast is a head scan, or use --output-space native"
        ) from None
    log.info("aligned %s to %s (%s)", ref.path.name, space.name, space.source)
    return space


def template_record(space) -> dict:
    """The sidecar's ``Registration.Template``: space, template file and the 4x4 ``Matrix``
    (reference world -> template world, RAS mm) with its rotation/translation summary."""
    from .registration import transform_summary

    return {"Space": space.name, "Source": space.source, **transform_summary(space.transform)}


# -- the chain -----------------------------------------------------------------------


#: ``JobResult.message`` of a job whose outputs exist and match the current settings
OUTPUTS_EXIST = "outputs exist"


def changed_settings(sidecar: Path, opts: Options) -> str:
    """What differs between the run that wrote ``sidecar`` and ``opts`` ("" = nothing).

    Compares the software version, method, preset, architecture, seed and engine
    overrides recorded in the sidecar's ``SuperResolution``, e.g. after an upgrade
    that changed a preset: ``"SoftwareVersion 'mcsr 0.1.0' -> 'mcsr 0.2.0'"``.
    An unreadable sidecar counts as changed.
    """
    try:
        sr = json.loads(sidecar.read_text()).get("SuperResolution", {})
    except (OSError, ValueError):
        return f"{sidecar.name} unreadable"
    inr = opts.method == "inr"
    now = {
        "SoftwareVersion": derivatives.SOFTWARE_VERSION,
        "Method": opts.method,
        "Preset": opts.preset if inr else None,
        "Architecture": opts.architecture if inr else None,
        "Seed": opts.seed,
    }
    before = {key: sr.get(key) for key in now}
    if inr:
        now["overrides"] = json_ready(opts.engine_overrides())
        before["overrides"] = (sr.get("Config") or {}).get("overrides")
    return "; ".join(f"{k} {before[k]!r} -> {v!r}" for k, v in now.items() if before[k] != v)


def run_job(job: Job, bids_dir: Path, out_dir: Path, opts: Options) -> JobResult:
    """Process one participant/session; never raises for per-participant problems.

    Returns status ``complete`` without work when every output already exists
    (unless ``opts.overwrite``), ``skipped`` when there are fewer than two
    contrasts, ``failed`` (with the one-line reason) on any error.
    """
    from .errors import McsrError, NotEnoughContrasts

    start = time.perf_counter()
    try:
        chosen = select_contrasts(job, opts.contrasts)
    except NotEnoughContrasts as exc:
        return JobResult(job, "skipped", message=str(exc))
    except McsrError as exc:
        return JobResult(job, "failed", message=str(exc))

    space = None if opts.output_space == "native" else opts.output_space
    expected = derivatives.expected_outputs(out_dir, job.subject, job.session, chosen, space)
    if not opts.overwrite and derivatives.is_complete(expected):
        changed = changed_settings(next(p for p in expected if p.suffix == ".json"), opts)
        message = OUTPUTS_EXIST + (f", made with other settings: {changed}" if changed else "")
        return JobResult(job, "complete", outputs=expected, message=message)

    log.info("%s: fusing %s", job.name, summarise(chosen))
    # A run killed between writing and renaming leaves hidden temporary files;
    # this job's folder and report name belong to this job alone.
    folder = derivatives.anat_dir(out_dir, job.subject, job.session)
    derivatives.remove_stale_temps(folder)
    # (the trailing dot keeps sub-01 from matching sub-010's files)
    report_stem = report_path(out_dir, job.subject, job.session).stem
    derivatives.remove_stale_temps(out_dir, report_stem + ".")
    message = ""
    try:
        outputs = _process(job, chosen, bids_dir, out_dir, opts)
    except McsrError as exc:
        message = str(exc)
    except MemoryError:
        message = f"{job.name}: out of memory; fix: a coarser --resolution or more RAM"
    except Exception as exc:  # one participant's crash must not stop the others
        log.debug("%s: traceback", job.name, exc_info=True)
        message = (
            f"{job.name}: unexpected {type(exc).__name__}: {exc} (rerun with --verbose "
            "for the traceback and report it)"
        )
    else:
        return JobResult(job, "done", outputs=outputs, seconds=time.perf_counter() - start)
    remove_partial_outputs(job, expected, out_dir)
    return JobResult(job, "failed", message=message, seconds=time.perf_counter() - start)


def remove_partial_outputs(job: Job, expected: list[Path], out_dir: Path) -> None:
    """After a failure, delete what the job may have written: its outputs (images,
    sidecars), transform files and report, so it has either all outputs or none."""
    folder = derivatives.anat_dir(out_dir, job.subject, job.session)
    doomed = [*expected, report_path(out_dir, job.subject, job.session)]
    if folder.is_dir():
        prefix = f"sub-{job.subject}" + (f"_ses-{job.session}" if job.session else "")
        doomed += folder.glob(f"{prefix}_from-*_xfm.txt")
    for p in doomed:
        p.unlink(missing_ok=True)
    for d in (folder, folder.parent, folder.parent.parent):  # empty anat/, ses-/, sub-/
        if d != Path(out_dir) and d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def _process(
    job: Job, chosen: list[Candidate], bids_dir: Path, out_dir: Path, opts: Options
) -> list[Path]:
    images = load_inputs(chosen)
    check_overlap(images, [img.affine for img in images])
    fg = auto_masks(images)
    transforms, registration = register_inputs(images, fg, opts)
    affines = effective_affines(images, transforms)
    in_masks = input_masks(images, affines, fg, opts.mask)
    skull_stripped = all(
        masks.is_skull_stripped(img.data, m, img.affine)
        for img, m in zip(images, in_masks, strict=True)
    )
    out_shape, out_affine, resolution = output_grid_for(images, affines, opts.resolution)
    space = None
    fit_transforms = transforms
    if opts.output_space != "native":
        space = template_step(images[0], in_masks[0], skull_stripped, resolution, opts)
        # The fit and QC map every input straight into the template world; the
        # transform files and Registration.Inputs keep the plain registration.
        fit_transforms = [space.transform if t is None else space.transform @ t for t in transforms]
        affines = effective_affines(images, fit_transforms)
        out_shape, out_affine = space.shape, space.affine
        registration["Template"] = template_record(space)
        # templates.template_space puts the grid on the template's own lattice.
        grid = {"LatticeOf": f"{space.name} template ({Path(space.source).name})"}
    else:
        grid = grid_record(out_affine, images[0].path.name, images[0].affine)
    out_mask = masks.output_mask(list(zip(in_masks, affines, strict=True)), out_shape, out_affine)
    log.info(
        "%s: output grid %s at %g mm (%.1f M voxels)",
        job.name,
        "x".join(map(str, out_shape)),
        resolution,
        np.prod(out_shape) / 1e6,
    )
    if opts.method == "spline":
        fit = fit_spline(chosen, images, affines, out_shape, out_affine, resolution, opts)
    else:
        fit = fit_inr(
            chosen,
            images,
            fit_transforms,
            in_masks,
            out_shape,
            out_affine,
            out_mask,
            resolution,
            opts,
            refine=[t is not None for t in transforms],
        )
        transforms, fit_transforms = apply_pose_corrections(
            chosen,
            fit,
            transforms,
            fit_transforms,
            registration,
            None if space is None else space.transform,
        )
    xfm_files = write_transforms(job, chosen, transforms, registration, out_dir)
    fit.sr_fields["Registration"] = registration
    fit.sr_fields["OutputGrid"] = grid
    return xfm_files + write_outputs(
        job,
        chosen,
        images,
        fit_transforms,
        in_masks,
        fit,
        out_shape,
        out_affine,
        out_mask,
        resolution,
        skull_stripped,
        bids_dir,
        out_dir,
        provenance={"options": asdict(opts), "command": " ".join(sys.argv)},
        space=space,
    )
