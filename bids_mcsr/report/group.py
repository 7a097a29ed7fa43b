"""Group report ``output_dir/group_report.html`` and the job-status records behind it.

The group report shows the ``group_qc.tsv`` rows (one per participant, session
and contrast) with their QC metrics, strip plots of the key metrics across
participants, robust outlier flags (:func:`bids_mcsr.qc.robust_outliers`,
computed per contrast), links to the participant reports, and the
participants/sessions that failed or were skipped, with the reason.

Failures leave no outputs to read back, so the participant level records the
outcome of every job in ``output_dir/logs/sub-<L>[_ses-<S>]_status.json``
(:func:`record_job_status`); the group level reads them
(:func:`read_job_statuses`). A re-run overwrites the record, so a participant
that failed once and then succeeded is no longer listed as failed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import __version__, qc
from ..derivatives import atomic_write_json
from . import figures
from .html import esc, fmt, img, page, table, write
from .participant import report_name

#: Report file name at the top of output_dir.
GROUP_REPORT = "group_report.html"
#: Folder (listed in ``.bidsignore``) of the per-job status records.
LOGS_DIR = "logs"

#: ``group_qc.tsv`` column -> label of the metrics that are plotted and screened for outliers.
GROUP_METRICS = {
    "qc_psnr_db": "consistency PSNR (dB)",
    "qc_sharpness_ratio_output": "output sharpness ratio",
    "final_mi": "final MI (nats)",
    "epochs_run": "epochs run",
    "wall_time_s": "fit wall time (s)",
}


def status_path(out_dir: Path, subject: str, session: str | None = None) -> Path:
    """``output_dir/logs/sub-<L>[_ses-<S>]_status.json``."""
    stem = report_name(subject, session).removesuffix(".html")
    return Path(out_dir) / LOGS_DIR / f"{stem}_status.json"


def record_job_status(
    out_dir: Path,
    subject: str,
    session: str | None,
    status: str,
    message: str = "",
    seconds: float | None = None,
) -> Path:
    """Record the outcome of one participant job (status: done | complete | skipped | failed)."""
    record = {
        "participant_id": f"sub-{subject}",
        "session_id": f"ses-{session}" if session else None,
        "status": status,
        "message": message,
        "seconds": None if seconds is None else round(float(seconds), 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "version": __version__,
    }
    return atomic_write_json(status_path(out_dir, subject, session), record)


def read_job_statuses(out_dir: Path) -> list[dict]:
    """All status records under ``output_dir/logs`` (unreadable ones are skipped), sorted."""
    records = []
    for path in sorted((Path(out_dir) / LOGS_DIR).glob("sub-*_status.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


def failures_from(records: Sequence[Mapping]) -> list[dict]:
    """The failed or skipped jobs among ``read_job_statuses`` records."""
    return [dict(r) for r in records if r.get("status") in ("failed", "skipped")]


def outlier_flags(
    rows: Sequence[Mapping[str, object]],
    metrics: Mapping[str, str] = GROUP_METRICS,
    group_key: str = "contrast",
) -> dict[str, list[str]]:
    """Per metric column, a ``"low"``/``"high"``/``""`` flag per row, within each contrast.

    Contrasts are screened separately: a FLAIR's PSNR is not comparable with a T1w's.
    """
    flags = {column: [""] * len(rows) for column in metrics}
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(str(row.get(group_key, "")), []).append(i)
    for column in metrics:
        for members in groups.values():
            values = [figures.to_number(rows[i].get(column)) for i in members]
            for i, flag in zip(members, qc.robust_outliers(values), strict=True):
                flags[column][i] = flag
    return flags


def _label(value: object, prefix: str) -> str | None:
    text = None if value is None else str(value)
    if not text or text == "n/a":
        return None
    return text.removeprefix(prefix)


def _participant_cell(out_dir: Path, row: Mapping[str, object]) -> str:
    subject = _label(row.get("participant_id"), "sub-") or ""
    session = _label(row.get("session_id"), "ses-")
    name = report_name(subject, session)
    text = esc(row.get("participant_id"))
    if (Path(out_dir) / name).is_file():
        return f'<a href="{esc(name)}">{text}</a>'
    return f'{text} <span class="flag" title="participant report missing">(no report)</span>'


def write_group_report(
    output_dir: Path,
    rows: Sequence[Mapping[str, object]],
    failures: Sequence[Mapping[str, object]] = (),
) -> Path:
    """Write ``output_dir/group_report.html``; returns its path.

    Parameters
    ----------
    output_dir
        The derivatives folder (participant reports are linked relative to it).
    rows
        ``group_qc.tsv`` rows as mappings (values as numbers or TSV text;
        ``n/a``/None for missing), see :mod:`bids_mcsr.group`.
    failures
        Failed or skipped jobs: mappings with ``participant_id``, ``session_id``,
        ``status``, ``message`` (e.g. ``failures_from(read_job_statuses(out))``).
    """
    output_dir = Path(output_dir)
    rows = list(rows)
    flags = outlier_flags(rows)
    n_participants = len({r.get("participant_id") for r in rows})
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = [
        "<h1>mcsr group report</h1>",
        f'<p class="sub">mcsr {esc(__version__)}, {len(rows)} outputs of {n_participants} '
        f"participants, {len(failures)} failed or skipped; report written {esc(stamp)}</p>",
        '<nav><a href="#plots">plots</a> <a href="#table">outputs</a> '
        '<a href="#failures">failed / skipped</a></nav>',
        '<h2 id="plots">Metrics across participants</h2>',
    ]
    if rows:
        body.append(
            img(
                figures.group_figure(GROUP_METRICS, rows, "contrast", flags),
                "QC metrics across participants",
            )
        )
    body.append(
        '<p class="note">One point per output, grouped by contrast. <span class="flag">Red</span> '
        f"points are robust outliers within their contrast: more than {qc.OUTLIER_K:g} robust "
        "standard deviations (1.4826 &times; median absolute deviation) from the median, "
        f"screened only when a contrast has at least {qc.OUTLIER_MIN_N} outputs. An outlier is "
        "a reason to open that participant's report, not a verdict: low consistency PSNR "
        "points to motion, misregistration or artefacts; a much shorter or longer fit to an "
        "unusual MI curve.</p>"
    )
    header = [
        "participant",
        "session",
        "contrast",
        "method",
        "epochs run",
        "selected epoch",
        "stop reason",
        "final MI",
        "fit time (s)",
        "consistency PSNR (dB)",
        "NRMSE",
        "sharpness ratio in → out",
        "flags",
    ]
    table_rows, classes = [], []
    for i, r in enumerate(rows):
        flagged = [f"{GROUP_METRICS[c]} {flags[c][i]}" for c in GROUP_METRICS if flags[c][i]]
        table_rows.append(
            (
                _participant_cell(output_dir, r),
                esc(r.get("session_id")),
                esc(r.get("contrast")),
                esc(r.get("method")),
                fmt(r.get("epochs_run"), 0),
                fmt(r.get("selected_epoch"), 0),
                esc(r.get("stop_reason")),
                fmt(r.get("final_mi"), 3),
                fmt(r.get("wall_time_s"), 1),
                fmt(r.get("qc_psnr_db"), 1),
                fmt(r.get("qc_nrmse"), 3),
                f"{fmt(r.get('qc_sharpness_ratio_input'))} &rarr; "
                f"{fmt(r.get('qc_sharpness_ratio_output'))}",
                f'<span class="flag">{esc("; ".join(flagged))}</span>'
                if flagged
                else '<span class="ok">ok</span>',
            )
        )
        classes.append("flag" if flagged else "")
    numeric = [False] * 4 + [True, True, False, True, True, True, True, True, False]
    body += [
        '<h2 id="table">Outputs</h2>',
        '<p class="note">The rows of <code>group_qc.tsv</code>; participant names link to '
        "their reports. Metrics are explained in the README, section &ldquo;Reading the "
        "QC reports&rdquo;.</p>",
        table(header, table_rows, numeric, classes) if rows else "<p>No outputs.</p>",
    ]
    body.append('<h2 id="failures">Failed or skipped</h2>')
    if failures:
        body.append(
            table(
                ["participant", "session", "status", "reason"],
                [
                    (
                        esc(f.get("participant_id")),
                        esc(f.get("session_id")),
                        f'<span class="flag">{esc(f.get("status"))}</span>',
                        esc(f.get("message")),
                    )
                    for f in failures
                ],
            )
        )
    else:
        body.append("<p>None: every participant/session that was run produced outputs.</p>")
    return write(output_dir / GROUP_REPORT, page("mcsr group report", "\n".join(body)))
