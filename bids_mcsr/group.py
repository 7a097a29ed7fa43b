"""Group level: collect every participant output into ``output_dir/group_qc.tsv``
and write ``output_dir/group_report.html`` (:mod:`bids_mcsr.report.group`).

One row per super-resolved image, read from its sidecar (so the group level
needs neither the inputs nor the engine). Columns, in order:

``participant_id, session_id, contrast, output, method, preset, inputs,
input_voxel_sizes_mm, resolution_mm, output_shape, epochs_run, selected_epoch,
stop_reason, final_mi, wall_time_s, device, peak_gpu_memory_mb`` followed by the QC columns of
:data:`bids_mcsr.qc.TSV_COLUMNS`. Missing values are ``n/a`` (BIDS convention).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from . import qc
from .derivatives import DESC, atomic_write_text
from .discovery import parse_entities, strip_prefix
from .errors import DatasetError
from .report.group import failures_from, read_job_statuses, write_group_report

log = logging.getLogger(__name__)

BASE_COLUMNS = (
    "participant_id",
    "session_id",
    "contrast",
    "output",
    "method",
    "preset",
    "inputs",
    "input_voxel_sizes_mm",
    "resolution_mm",
    "output_shape",
    "epochs_run",
    "selected_epoch",
    "stop_reason",
    "final_mi",
    "wall_time_s",
    "device",
    "peak_gpu_memory_mb",
)
COLUMNS = BASE_COLUMNS + tuple(qc.TSV_COLUMNS)


def find_sidecars(out_dir: Path, participant_labels: list[str] | None = None) -> list[Path]:
    """Sidecars of all super-resolved outputs under ``out_dir`` (sorted)."""
    found = sorted(Path(out_dir).glob(f"sub-*/**/anat/*_desc-{DESC}_*.json"))
    if participant_labels:
        wanted = {f"sub-{strip_prefix(p, 'sub-')}" for p in participant_labels}
        found = [p for p in found if p.relative_to(out_dir).parts[0] in wanted]
    # A sidecar without its image is a leftover of an interrupted run: not an output.
    return [p for p in found if _image_of(p).exists()]


def _image_of(sidecar: Path) -> Path:
    return Path(str(sidecar)[: -len(".json")] + ".nii.gz")


def _final_mi(curves: dict) -> float | None:
    # With more than two contrasts every pair has a curve: report their mean.
    finals = [c[-1] for c in curves.values() if c]
    return sum(finals) / len(finals) if finals else None


def _fmt(value) -> str:
    if value is None or value == "":
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def row_for(sidecar: Path, out_dir: Path) -> dict:
    """The ``group_qc.tsv`` row of one output, from its sidecar."""
    meta = json.loads(sidecar.read_text())
    sr = meta.get("SuperResolution", {})
    entities, _suffix = parse_entities(sidecar)
    inputs = sr.get("Inputs", [])
    image = _image_of(sidecar)
    row = {
        "participant_id": f"sub-{entities.get('sub', '')}",
        "session_id": f"ses-{entities['ses']}" if "ses" in entities else None,
        "contrast": sr.get("Contrast"),
        "output": image.relative_to(out_dir).as_posix(),
        "method": sr.get("Method"),
        "preset": sr.get("Preset"),
        "inputs": ",".join(i.get("Source", "") for i in inputs) or None,
        "input_voxel_sizes_mm": ",".join(
            "x".join(f"{v:g}" for v in i.get("VoxelSizeMM", [])) for i in inputs
        )
        or None,
        "resolution_mm": sr.get("ResolutionMM"),
        "output_shape": "x".join(str(n) for n in sr.get("OutputShape", [])) or None,
        "epochs_run": sr.get("EpochsRun"),
        "selected_epoch": sr.get("SelectedEpoch"),
        "stop_reason": sr.get("StopReason"),
        "final_mi": _final_mi(sr.get("MICurve", {})),
        "wall_time_s": sr.get("WallTimeS"),
        "device": sr.get("Device"),
        "peak_gpu_memory_mb": sr.get("PeakGPUMemoryMB"),
    }
    row.update(qc.flatten(meta.get("QC")))
    return row


def collect(out_dir: Path, participant_labels: list[str] | None = None) -> list[dict]:
    """Rows of all outputs; raises DatasetError when there are none."""
    out_dir = Path(out_dir)
    sidecars = find_sidecars(out_dir, participant_labels)
    if not sidecars:
        raise DatasetError(
            f"{out_dir}: no participant outputs (*_desc-{DESC}_*.json) found; "
            "fix: run the participant level into this output_dir first"
        )
    rows = []
    for path in sidecars:
        try:
            rows.append(row_for(path, out_dir))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable sidecar skipped (%s)", path, exc)
    return rows


def write_group_table(out_dir: Path, rows: list[dict]) -> Path:
    """Write ``group_qc.tsv`` (tab-separated, header row, ``n/a`` for missing)."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_fmt(row.get(col)) for col in COLUMNS])
    return atomic_write_text(Path(out_dir) / "group_qc.tsv", buf.getvalue())


def failed_jobs(out_dir: Path, participant_labels: list[str] | None = None) -> list[dict]:
    """Failed or skipped participant jobs recorded under ``out_dir/logs`` (latest run of each)."""
    records = failures_from(read_job_statuses(out_dir))
    if participant_labels:
        wanted = {f"sub-{strip_prefix(p, 'sub-')}" for p in participant_labels}
        records = [r for r in records if r.get("participant_id") in wanted]
    return records


def run_group(out_dir: Path, participant_labels: list[str] | None = None) -> Path:
    """The group level: collect and write the table; returns its path."""
    rows = collect(out_dir, participant_labels)
    path = write_group_table(out_dir, rows)
    report = write_group_report(out_dir, rows, failed_jobs(out_dir, participant_labels))
    log.info("group: report %s", report)
    log.info(
        "group: %d outputs of %d participants -> %s",
        len(rows),
        len({r["participant_id"] for r in rows}),
        path,
    )
    return path
