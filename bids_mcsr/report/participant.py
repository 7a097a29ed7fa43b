"""Participant report: ``output_dir/sub-<L>[_ses-<S>].html``, one page per fused set.

For every contrast: input vs output slice mosaics in three views, a
through-plane zoom, the re-acquisition residual and the QC metrics; for the
fit: MI and loss curves with the selected epoch and stop reason; provenance
(version, options, device, timings). README section "Reading the QC reports"
explains every panel.

Typical use at the end of a participant run::

    entries = [ContrastEntry(label, in_data, in_affine, out_data, out_affine, sidecar,
                             transform=t, input_mask=m, consistency=cons), ...]
    write_participant_report(report_path(out_dir, "01", None), entries, provenance)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import qc
from ..derivatives import SOFTWARE_VERSION
from ..geometry import compose, through_plane, voxel_sizes
from . import figures
from .html import esc, fmt, img, key_value_table, page, table, write


@dataclass
class ContrastEntry:
    """One super-resolved contrast and what it was made from.

    ``input_affine`` is the input's own header affine; ``transform`` (4x4, input
    world -> output world, None = identity) registers it. ``sidecar`` is the
    output's JSON sidecar (``SuperResolution`` and ``QC`` objects). ``input_mask``
    (bool, input shape) and ``consistency`` (from :func:`bids_mcsr.qc.assess`)
    are recomputed when None.
    """

    label: str
    input_data: np.ndarray
    input_affine: np.ndarray
    output_data: np.ndarray
    output_affine: np.ndarray
    sidecar: dict
    transform: np.ndarray | None = None
    input_mask: np.ndarray | None = None
    consistency: qc.Consistency | None = None
    input_name: str = ""
    output_name: str = ""

    @classmethod
    def from_files(cls, input_path: Path, output_path: Path) -> ContrastEntry:
        """Entry from an input NIfTI and an output NIfTI with its ``.json`` sidecar beside it.

        The input's transform into the output world is read from the sidecar
        by :func:`bids_mcsr.derivatives.input_transform` (registration
        ``Inputs[<input file name>].Matrix``, then ``Template.Matrix``).
        """
        from ..derivatives import input_transform

        output_path = Path(output_path)
        sidecar_path = Path(str(output_path).removesuffix(".nii.gz").removesuffix(".nii") + ".json")
        meta = json.loads(sidecar_path.read_text())
        sr = meta.get("SuperResolution", {})
        label = sr.get("Contrast") or output_path.name.split(".")[0].rsplit("_", 1)[-1]
        transform = input_transform(meta, Path(input_path).name)
        inp = nib.load(str(input_path))
        out = nib.load(str(output_path))
        return cls(
            label=label,
            input_data=np.asarray(inp.dataobj, dtype=np.float32),
            input_affine=inp.affine,
            output_data=np.asarray(out.dataobj, dtype=np.float32),
            output_affine=out.affine,
            sidecar=meta,
            transform=transform,
            input_name=Path(input_path).name,
            output_name=output_path.name,
        )

    @property
    def effective_affine(self) -> np.ndarray:
        """Input voxel -> output world."""
        return compose(self.transform, self.input_affine)


def anchor(label: str) -> str:
    """Element id of a contrast's section: ``c-`` + the label with unsafe characters as ``-``."""
    return "c-" + re.sub(r"[^A-Za-z0-9_-]", "-", label)


def report_name(subject: str, session: str | None = None) -> str:
    """``sub-<L>[_ses-<S>].html`` (labels without their ``sub-``/``ses-`` prefix)."""
    return f"sub-{subject}" + (f"_ses-{session}" if session else "") + ".html"


def report_path(out_dir: Path, subject: str, session: str | None = None) -> Path:
    """Where the participant report of one subject/session goes: the output_dir top level."""
    return Path(out_dir) / report_name(subject, session)


def _complete(entry: ContrastEntry) -> tuple[dict, qc.Consistency]:
    """The entry's QC object (sidecar or recomputed) and its residual map."""
    if entry.input_mask is None:
        from ..masks import foreground_mask

        entry.input_mask = foreground_mask(entry.input_data, entry.input_affine)
    cons = entry.consistency
    qc_obj = entry.sidecar.get("QC")
    pair = (
        entry.output_data,
        entry.output_affine,
        entry.input_data,
        entry.input_affine,
        entry.transform,
        entry.input_mask,
    )
    if qc_obj is None:
        qc_obj, cons = qc.assess(*pair)
    elif cons is None:
        cons = qc.consistency(*pair)
    return qc_obj, cons


def _sharp(qc_obj: dict, which: str, key: str) -> object:
    return qc_obj.get("Sharpness", {}).get(which, {}).get(key)


def _summary_table(entries: Sequence[ContrastEntry], qcs: Sequence[dict]) -> str:
    rows = []
    for e, q in zip(entries, qcs, strict=True):
        spacing = "x".join(f"{s:g}" for s in np.round(voxel_sizes(e.input_affine), 2))
        plane, angle = through_plane(e.effective_affine)
        plane_text = plane + (f" ({angle:.0f}&deg; oblique)" if angle >= 1 else "")
        cons = q.get("Consistency", {})
        rows.append(
            (
                f'<a href="#{anchor(e.label)}">{esc(e.label)}</a>',
                esc(e.input_name or "input"),
                esc(spacing),
                plane_text,
                fmt(cons.get("PSNR"), 1),
                fmt(cons.get("NRMSE"), 3),
                f"{fmt(_sharp(q, 'Input', 'Ratio'))} &rarr; {fmt(_sharp(q, 'Output', 'Ratio'))}",
                f"{fmt(_sharp(q, 'Input', 'InPlane'), 3)} &rarr; {fmt(_sharp(q, 'Output', 'InPlane'), 3)}",
            )
        )
    header = [
        "contrast",
        "input",
        "input voxel (mm)",
        "slices stacked",
        "consistency PSNR (dB)",
        "NRMSE",
        "sharpness ratio through/in-plane: input → output",
        "in-plane sharpness (1/mm): input → output",
    ]
    return table(header, rows, numeric=[False, False, False, False, True, True, True, True])


def _fit_section(sr: Mapping) -> str:
    facts = {
        "method": sr.get("Method"),
        "preset": sr.get("Preset"),
        "architecture": sr.get("Architecture"),
        "epochs run": sr.get("EpochsRun"),
        "selected epoch": sr.get("SelectedEpoch"),
        "stop reason": sr.get("StopReason"),
        "fit wall time (s)": sr.get("WallTimeS"),
        "training samples/s": sr.get("SamplesPerS"),
        "device": sr.get("Device"),
    }
    parts = ['<h2 id="fit">Fit</h2>', key_value_table(facts)]
    mi, loss = sr.get("MICurve") or {}, sr.get("LossCurve") or {}
    if mi or loss:
        uri = figures.curves_figure(mi, loss, sr.get("SelectedEpoch"), sr.get("StopReason"))
        parts.append(img(uri, "mutual information and loss per epoch"))
        parts.append(
            '<p class="note">Left: mutual information between the predicted contrasts on the '
            "output grid, per epoch; it rises while the network learns the shared anatomy and "
            "flattens when it starts to fit slice-specific detail. Right: training loss per "
            "contrast. The dashed line marks the epoch whose model wrote the outputs.</p>"
        )
    else:
        parts.append('<p class="note">No training curves: this method is not iterative.</p>')
    return "\n".join(parts)


def _contrast_section(entry: ContrastEntry, q: dict, cons: qc.Consistency) -> str:
    out_ras, out_ras_affine = figures.canonical(entry.output_data, entry.output_affine)
    window = cons.intensity_range
    display_mask = out_ras > window[0] + 0.1 * (window[1] - window[0])
    title = f"{entry.label}"
    parts = [f'<h2 id="{anchor(entry.label)}">{esc(entry.label)}</h2>']
    names = (
        f"input <code>{esc(entry.input_name or 'n/a')}</code> &rarr; output "
        f"<code>{esc(entry.output_name or 'n/a')}</code>"
    )
    parts.append(f'<p class="sub">{names}</p>')
    parts.append("<h3>Input vs output</h3>")
    for view in ("axial", "coronal", "sagittal"):
        uri = figures.mosaic_figure(
            entry.input_data,
            entry.effective_affine,
            out_ras,
            out_ras_affine,
            view,
            window,
            display_mask,
            f"{title}: {view}",
        )
        parts.append(img(uri, f"{entry.label} {view} input vs output"))
    parts.append("<h3>Through-plane zoom</h3>")
    parts.append(
        img(
            figures.zoom_figure(
                entry.input_data,
                entry.effective_affine,
                out_ras,
                out_ras_affine,
                window,
                display_mask,
                title,
            ),
            f"{entry.label} through-plane zoom",
        )
    )
    c = q.get("Consistency", {})
    parts.append("<h3>Re-acquisition residual</h3>")
    parts.append(
        img(
            figures.residual_figure(
                cons.residual,
                cons.mask,
                entry.effective_affine,
                cons.intensity_range,
                f"{entry.label}: re-acquired output - input   (PSNR {fmt(c.get('PSNR'), 1)} dB, "
                f"NRMSE {fmt(c.get('NRMSE'), 3)})",
            ),
            f"{entry.label} re-acquisition residual",
        )
    )
    sharp_rows = []
    for which in ("Input", "Output"):
        s = q.get("Sharpness", {}).get(which, {})
        axes = s.get("Axes") or ["?"] * 3
        grads = s.get("RMSGradient") or [None] * 3
        tp = s.get("ThroughPlaneAxis")
        per_axis = ", ".join(
            f"{'<b>' if i == tp else ''}{esc(a)}: {fmt(g, 3)}{'</b>' if i == tp else ''}"
            for i, (a, g) in enumerate(zip(axes, grads, strict=False))
        )
        sharp_rows.append(
            (
                which.lower(),
                per_axis,
                fmt(s.get("InPlane"), 3),
                fmt(s.get("ThroughPlane"), 3),
                fmt(s.get("Ratio"), 2),
            )
        )
    parts.append(
        table(
            [
                "sharpness",
                "RMS gradient per voxel axis (1/mm; bold = through-plane)",
                "in-plane",
                "through-plane",
                "ratio",
            ],
            sharp_rows,
            numeric=[False, False, True, True, True],
        )
    )
    return "\n".join(parts)


def write_participant_report(
    path: Path,
    entries: Sequence[ContrastEntry],
    provenance: Mapping[str, object] | None = None,
    title: str | None = None,
) -> Path:
    """Write the self-contained HTML report of one fused set; returns ``path``.

    Parameters
    ----------
    path
        Destination, normally :func:`report_path`.
    entries
        One :class:`ContrastEntry` per output contrast (the first one's sidecar
        provides the fit curves: all outputs of a set come from one fit).
    provenance
        Extra provenance shown verbatim (e.g. command-line options, step
        timings in s); version, device, seed and timings of the fit are read
        from the sidecar.
    title
        Page heading; default: the output file name's ``sub-``/``ses-`` part.
    """
    if not entries:
        raise ValueError("write_participant_report: no contrasts to report")
    done = [_complete(e) for e in entries]
    qcs = [d[0] for d in done]
    sr = entries[0].sidecar.get("SuperResolution", {})
    if title is None:
        stem = Path(path).name.removesuffix(".html")
        title = stem.replace("_", " ")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    nav = " ".join(
        ['<a href="#summary">summary</a>', '<a href="#fit">fit</a>']
        + [f'<a href="#{anchor(e.label)}">{esc(e.label)}</a>' for e in entries]
        + ['<a href="#provenance">provenance</a>']
    )
    body = [
        f"<h1>mcsr report: {esc(title)}</h1>",
        f'<p class="sub">{esc(sr.get("SoftwareVersion") or SOFTWARE_VERSION)}, '
        f"report written {esc(stamp)}</p>",
        f"<nav>{nav}</nav>",
        '<h2 id="summary">Summary</h2>',
        _summary_table(entries, qcs),
        '<p class="note"><b>Consistency PSNR</b>: the output re-acquired with the input\'s '
        "slice geometry vs the input, inside the input foreground (peak = the input's "
        "0.5-99.5 percentile range). Higher is better; it measures agreement with the measured "
        "data, not detail between slices. <b>Sharpness ratio</b>: RMS gradient through-plane "
        "/ in-plane; thick-slice inputs are well below 1, a good output moves towards 1 while "
        "its in-plane sharpness stays close to the input's (a large in-plane increase means "
        "noise or ringing). See the README, section &ldquo;Reading the QC reports&rdquo;.</p>",
        _fit_section(sr),
    ]
    body += [_contrast_section(e, q, c) for e, (q, c) in zip(entries, done, strict=True)]
    prov: dict = {
        "software": sr.get("SoftwareVersion") or SOFTWARE_VERSION,
        "device": sr.get("Device"),
        "seed": sr.get("Seed"),
        "method": sr.get("Method"),
        "preset": sr.get("Preset"),
        "architecture": sr.get("Architecture"),
        "resolution (mm)": sr.get("ResolutionMM"),
        "fit wall time (s)": sr.get("WallTimeS"),
        "training samples/s": sr.get("SamplesPerS"),
        "inputs": sorted({src for e in entries for src in e.sidecar.get("Sources", [])}),
    }
    if provenance:
        prov.update(provenance)
    body += ['<h2 id="provenance">Provenance</h2>', key_value_table(prov)]
    extra = {"engine configuration": sr.get("Config"), "registration": sr.get("Registration")}
    for name, value in extra.items():
        if value:
            body.append(
                f"<details><summary>{esc(name)}</summary>{key_value_table(value)}</details>"
            )
    return write(Path(path), page(f"mcsr {title}", "\n".join(body)))
