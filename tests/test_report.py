"""Participant and group HTML reports: produced, parseable, self-contained, images decode."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_mcsr import qc
from bids_mcsr.report.group import (
    GROUP_REPORT,
    failures_from,
    read_job_statuses,
    record_job_status,
    write_group_report,
)
from bids_mcsr.report.participant import (
    ContrastEntry,
    report_path,
    write_participant_report,
)
from bids_mcsr.resample import acquire

SHAPE = (36, 40, 32)


class PageParser(HTMLParser):
    """Collects image sources, link targets, element ids, scripts and table rows."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.ids, self.scripts = [], [], set(), 0
        self.row_classes = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag == "script":
            self.scripts += 1
        elif tag == "tr":
            self.row_classes.append(a.get("class", ""))


def parse(path):
    text = path.read_text()
    parser = PageParser()
    parser.feed(text)
    parser.close()
    return text, parser


def decode_png(src: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    raw = base64.b64decode(src[len(prefix) :], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(io.BytesIO(raw), format="png")


def head(contrast: str) -> np.ndarray:
    """(36, 40, 32) smooth 'head': two tissues inside an ellipsoid; t2 inverts the tissues."""
    rng = np.random.default_rng(3)
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 2.0)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    r = np.linalg.norm((ijk - (np.asarray(SHAPE) - 1) / 2) / (np.asarray(SHAPE) * 0.42), axis=-1)
    hi, lo = (220.0, 140.0) if contrast == "t1" else (90.0, 260.0)
    return np.where(r < 1, np.where(field > 0, hi, lo), 0.0).astype(np.float32)


def sidecar(label: str, curves: bool = True) -> dict:
    epochs = 12
    sr = {
        "Contrast": label,
        "Method": "inr" if curves else "spline",
        "Preset": "fast",
        "Architecture": "split-head",
        "Device": "cpu",
        "Seed": 0,
        "EpochsRun": epochs if curves else 0,
        "SelectedEpoch": 9 if curves else 0,
        "StopReason": "mi-plateau" if curves else "not-iterative",
        "MICurve": {"T1w|T2w": list(np.linspace(0.2, 0.8, epochs))} if curves else {},
        "LossCurve": (
            {c: list(np.geomspace(0.1, 0.01, epochs)) for c in ("T1w", "T2w")} if curves else {}
        ),
        "WallTimeS": 12.5,
        "SamplesPerS": 1.0e5,
        "Config": {"epochs": epochs, "lr": 0.001},
        "SoftwareVersion": "mcsr test",
    }
    sources = [f"bids:raw:sub-01/anat/sub-01_{c}.nii.gz" for c in ("T1w", "T2w")]
    return {"Sources": sources, "SuperResolution": sr}


def make_entries(with_qc: bool = True, curves: bool = True) -> list[ContrastEntry]:
    axial = np.diag([1.0, 1.0, 4.0, 1.0])
    axial[2, 3] = 1.5
    sagittal = np.diag([4.0, 1.0, 1.0, 1.0])
    sagittal[0, 3] = 1.5
    entries = []
    for label, contrast, aff, shape in (
        ("T1w", "t1", axial, (36, 40, 8)),
        ("T2w", "t2", sagittal, (9, 40, 32)),
    ):
        hr = head(contrast)
        lr = acquire(hr, np.eye(4), shape, aff)
        out = ndimage.gaussian_filter(hr, 0.6)
        meta = sidecar(label, curves)
        cons = None
        if with_qc:
            meta["QC"], cons = qc.assess(out, np.eye(4), lr, aff, input_mask=lr > 50)
        entries.append(
            ContrastEntry(
                label,
                lr,
                aff,
                out,
                np.eye(4),
                meta,
                input_mask=lr > 50,
                consistency=cons,
                input_name=f"sub-01_{label}.nii.gz",
                output_name=f"sub-01_desc-superres_{label}.nii.gz",
            )
        )
    return entries


def assert_self_contained(text: str, parser: PageParser) -> None:
    assert parser.scripts == 0
    assert "http://" not in text and "https://" not in text  # nothing fetched from the web
    for src in parser.images:
        img = decode_png(src)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        assert img[..., :3].std() > 0.01  # not a blank canvas
    for href in parser.links:
        if href.startswith("#"):
            assert href[1:] in parser.ids, f"dangling anchor {href}"


def test_participant_report_is_complete_and_self_contained(tmp_path):
    path = write_participant_report(
        report_path(tmp_path, "01"), make_entries(), {"options": {"preset": "fast"}}
    )
    assert path == tmp_path / "sub-01.html"
    text, parser = parse(path)
    # Curves + per contrast: 3 view mosaics, the through-plane zoom, the residual map.
    assert len(parser.images) == 1 + 2 * 5
    assert_self_contained(text, parser)
    assert {"summary", "fit", "c-T1w", "c-T2w", "provenance"} <= parser.ids
    assert "mi-plateau" in text and "options.preset" in text
    assert "bids:raw:sub-01/anat/sub-01_T1w.nii.gz, bids:raw:sub-01/anat/sub-01_T2w.nii.gz" in text
    for label in ("T1w", "T2w"):
        assert f"sub-01_desc-superres_{label}.nii.gz" in text


def test_participant_report_without_curves_or_stored_qc(tmp_path):
    # A spline output has no curves; an old sidecar without QC gets it recomputed.
    entries = make_entries(with_qc=False, curves=False)
    entries[0].label = "T1w (acq-fast run-2)"  # discovery's labels carry spaces: safe anchors
    path = write_participant_report(tmp_path / "sub-02_ses-1.html", entries)
    text, parser = parse(path)
    assert len(parser.images) == 2 * 5
    assert "not iterative" in text
    assert_self_contained(text, parser)
    expected = qc.consistency(
        entries[0].output_data,
        np.eye(4),
        entries[0].input_data,
        entries[0].input_affine,
        mask=entries[0].input_mask,
    ).psnr_db
    assert f"{expected:.1f}" in text
    assert report_path(tmp_path, "02", "1").name == "sub-02_ses-1.html"


def test_entry_from_files_reads_the_registration_transform(tmp_path):
    entry = make_entries()[1]
    transform = np.eye(4)
    transform[:3, 3] = [1.0, -2.0, 0.5]
    # Written by the workflow: Registration.Inputs keyed by the input's file name.
    entry.sidecar["SuperResolution"]["Registration"] = {
        "Method": "rigid-mattes-mi",
        "Inputs": {"sub-01_T2w.nii.gz": {"Matrix": transform.tolist()}},
    }
    inp = tmp_path / "sub-01_T2w.nii.gz"
    out = tmp_path / "sub-01_desc-superres_T2w.nii.gz"
    nib.save(nib.Nifti1Image(entry.input_data, entry.input_affine), str(inp))
    nib.save(nib.Nifti1Image(entry.output_data, entry.output_affine), str(out))
    (tmp_path / "sub-01_desc-superres_T2w.json").write_text(json.dumps(entry.sidecar))
    loaded = ContrastEntry.from_files(inp, out)
    assert loaded.label == "T2w"
    np.testing.assert_allclose(loaded.transform, transform)
    np.testing.assert_allclose(loaded.effective_affine, transform @ entry.input_affine)
    np.testing.assert_allclose(loaded.output_data, entry.output_data)
    assert loaded.output_name == out.name


def test_participant_report_needs_entries(tmp_path):
    with pytest.raises(ValueError, match="no contrasts"):
        write_participant_report(tmp_path / "x.html", [])


def group_rows() -> list[dict]:
    rows = []
    psnr = {
        "T1w": [33.1, 32.8, 33.4, 32.9, 33.0, 21.0],
        "T2w": [30.2, 29.9, 30.4, 30.1, 30.0, 30.3],
    }
    for c in ("T1w", "T2w"):
        for i, value in enumerate(psnr[c], start=1):
            rows.append(
                {
                    "participant_id": f"sub-{i:02d}",
                    "session_id": "n/a",
                    "contrast": c,
                    "method": "inr",
                    "epochs_run": "20",
                    "selected_epoch": "17",
                    "stop_reason": "mi-plateau",
                    "final_mi": f"{0.8 + 0.01 * i:.3f}",
                    "wall_time_s": "60.5",
                    "qc_psnr_db": f"{value}",
                    "qc_nrmse": "0.04",
                    "qc_sharpness_ratio_input": "0.31",
                    "qc_sharpness_ratio_output": "0.96",
                }
            )
    return rows


def test_group_report_flags_links_and_failures(tmp_path):
    (tmp_path / "sub-01.html").write_text("<html></html>")
    failures = [
        {
            "participant_id": "sub-09",
            "session_id": None,
            "status": "failed",
            "message": "sub-09: sub-09_T1w.nii.gz is 0 bytes; fix: re-export it",
        }
    ]
    path = write_group_report(tmp_path, group_rows(), failures)
    assert path == tmp_path / GROUP_REPORT
    text, parser = parse(path)
    assert len(parser.images) == 1
    assert_self_contained(text, parser)
    # Only sub-06 T1w (21 dB among ~33 dB) is an outlier; its row is highlighted.
    flagged = [c for c in parser.row_classes if c == "flag"]
    assert len(flagged) == 1
    assert "consistency PSNR (dB) low" in text
    # Links only to reports that exist; the others say so.
    assert "sub-01.html" in parser.links
    assert "sub-02.html" not in parser.links
    assert "(no report)" in text
    assert "sub-09_T1w.nii.gz is 0 bytes" in text


def test_group_report_with_nothing_to_show(tmp_path):
    text, parser = parse(write_group_report(tmp_path, []))
    assert "No outputs." in text and parser.images == []


def test_job_status_records_round_trip(tmp_path):
    record_job_status(tmp_path, "01", None, "failed", "boom; fix: x", 3.21)
    record_job_status(tmp_path, "02", "a", "skipped", "only one contrast")
    record_job_status(tmp_path, "03", None, "done", "", 10.0)
    assert (tmp_path / "logs" / "sub-02_ses-a_status.json").is_file()
    records = read_job_statuses(tmp_path)
    assert [r["status"] for r in records] == ["failed", "skipped", "done"]
    fails = failures_from(records)
    assert [(f["participant_id"], f["session_id"]) for f in fails] == [
        ("sub-01", None),
        ("sub-02", "ses-a"),
    ]
    # A successful re-run replaces the failure.
    record_job_status(tmp_path, "01", None, "done")
    assert [f["participant_id"] for f in failures_from(read_job_statuses(tmp_path))] == ["sub-02"]


@pytest.mark.slow
def test_reports_from_the_app_end_to_end(tmp_path):
    # Through the CLI: sub-01 is fused, sub-02 has a truncated image and fails,
    # sub-03 has one contrast and is skipped; the group report lists both.
    from bidsdata import make_dataset, pair

    from bids_mcsr.cli import main

    bids = make_dataset(
        tmp_path / "bids",
        {**pair("01"), **pair("02"), "sub-03/anat/sub-03_T1w.nii.gz": ("axial", "t1")},
    )
    bad = bids / "sub-02/anat/sub-02_T2w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:400])
    out = tmp_path / "out"
    fast = ["--method", "spline", "--skip_bids_validator", "--no-registration", "--quiet"]
    assert main([str(bids), str(out), "participant", *fast]) == 1
    assert main([str(bids), str(out), "group", "--quiet"]) == 0

    text, parser = parse(out / "sub-01.html")
    assert len(parser.images) == 2 * 5  # spline: no curves
    assert_self_contained(text, parser)
    meta = json.loads((out / "sub-01/anat/sub-01_desc-superres_T2w.json").read_text())
    assert f"{meta['QC']['Consistency']['PSNR']:.1f}" in text  # the sidecar's numbers
    assert not (out / "sub-02.html").exists()

    text, parser = parse(out / GROUP_REPORT)
    assert_self_contained(text, parser)
    assert "sub-01.html" in parser.links
    assert "sub-02_T2w.nii.gz" in text and "failed" in text
    assert "sub-03" in text and "skipped" in text
    assert ".html" in (out / ".bidsignore").read_text()
