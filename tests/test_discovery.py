"""Discovery on synthetic BIDS trees: header-based classification and the selection rule."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
from bidsdata import acquisition, lr_geometry, make_dataset, pair

from bids_mcsr.discovery import (
    classify,
    find_jobs,
    open_layout,
    parse_entities,
    select_contrasts,
    validator_errors,
)
from bids_mcsr.errors import DatasetError, NotEnoughContrasts, ParticipantError

A = "anat/"


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids") / "ds"
    files = {
        # ds001-style: a 1 mm T1w and a thick axial inplaneT2
        "sub-ds001/anat/sub-ds001_T1w.nii.gz": ("iso", "t1"),
        "sub-ds001/anat/sub-ds001_inplaneT2.nii.gz": ("axial", "t2"),
        # one contrast only
        "sub-one/anat/sub-one_T1w.nii.gz": ("axial", "t1"),
        # several runs: T2w run-2 is the only complementary (sagittal) view
        "sub-runs/anat/sub-runs_run-1_T1w.nii.gz": ("axial", "t1"),
        "sub-runs/anat/sub-runs_run-2_T1w.nii.gz": ("axial", "t1"),
        "sub-runs/anat/sub-runs_run-1_T2w.nii.gz": ("axial", "t2"),
        "sub-runs/anat/sub-runs_run-2_T2w.nii.gz": ("sagittal", "t2"),
        # T1w + FLAIR with acq- variants (an isotropic 3D FLAIR is not a default candidate)
        "sub-acq/anat/sub-acq_T1w.nii.gz": ("axial", "t1"),
        "sub-acq/anat/sub-acq_acq-b_FLAIR.nii.gz": ("sagittal", "t2"),
        "sub-acq/anat/sub-acq_acq-a_FLAIR.nii.gz": ("sagittal", "t2"),
        "sub-acq/anat/sub-acq_acq-3D_FLAIR.nii.gz": ("iso", "t2"),
        # a 0-byte placeholder (e.g. an unfetched annex file)
        "sub-empty/anat/sub-empty_T1w.nii.gz": ("axial", "t1"),
        "sub-empty/anat/sub-empty_T2w.nii.gz": b"",
        "sub-empty/anat/sub-empty_FLAIR.nii.gz": ("coronal", "t2"),
        # same direction for both contrasts
        "sub-same/anat/sub-same_T1w.nii.gz": ("axial", "t1"),
        "sub-same/anat/sub-same_FLAIR.nii.gz": ("axial", "t2"),
        **pair("ses", "1"),
        **pair("ses", "2", "T1w", "FLAIR"),
    }
    make_dataset(root, files)
    return open_layout(root)


def _job(layout, sub, ses=None):
    jobs = [j for j in find_jobs(layout, [sub]) if j.session == ses]
    assert len(jobs) == 1
    return jobs[0]


def _names(cands):
    return [c.path.name for c in cands]


def test_jobs_per_subject_and_session(layout):
    jobs = find_jobs(layout)
    names = [j.name for j in jobs]
    assert names == [
        "sub-acq",
        "sub-ds001",
        "sub-empty",
        "sub-one",
        "sub-runs",
        "sub-same",
        "sub-ses ses-1",
        "sub-ses ses-2",
    ]
    assert [j.session for j in find_jobs(layout, ["sub-ses"], ["ses-2"])] == ["2"]


def test_unknown_participant_or_session(layout):
    with pytest.raises(DatasetError, match="nobody not in .*choose from acq, ds001"):
        find_jobs(layout, ["nobody"])
    with pytest.raises(DatasetError, match="session"):
        find_jobs(layout, ["one"], ["9"])


def test_ds001_style_needs_explicit_contrasts(layout):
    job = _job(layout, "ds001")
    with pytest.raises(NotEnoughContrasts, match="sub-ds001: fewer than two.*--contrasts"):
        select_contrasts(job)
    chosen = select_contrasts(job, ["T1w", "inplaneT2"])
    assert _names(chosen) == ["sub-ds001_T1w.nii.gz", "sub-ds001_inplaneT2.nii.gz"]
    assert [c.anisotropic for c in chosen] == [False, True]


def test_single_contrast_is_skipped(layout):
    with pytest.raises(NotEnoughContrasts, match="sub-one"):
        select_contrasts(_job(layout, "one"))


def test_runs_prefer_complementary_then_lowest_run(layout):
    chosen = select_contrasts(_job(layout, "runs"))
    assert _names(chosen) == ["sub-runs_run-1_T1w.nii.gz", "sub-runs_run-2_T2w.nii.gz"]
    assert [c.plane for c in chosen] == ["axial", "sagittal"]


def test_acq_variants_alphabetical_and_anisotropic_only(layout):
    chosen = select_contrasts(_job(layout, "acq"))
    assert _names(chosen) == ["sub-acq_T1w.nii.gz", "sub-acq_acq-a_FLAIR.nii.gz"]
    assert chosen[1].label == "FLAIR (acq-a)"
    # --contrasts order sets the reference, and isotropic images become eligible
    chosen = select_contrasts(_job(layout, "acq"), ["FLAIR", "T1w"])
    assert [c.suffix for c in chosen] == ["FLAIR", "T1w"]


def test_zero_byte_placeholder_is_skipped_with_warning(layout, caplog):
    job = _job(layout, "empty")
    with caplog.at_level(logging.WARNING, logger="bids_mcsr"):
        chosen = select_contrasts(job)
    assert _names(chosen) == ["sub-empty_T1w.nii.gz", "sub-empty_FLAIR.nii.gz"]
    assert "sub-empty_T2w.nii.gz: file is empty (0 bytes)" in caplog.text
    # asking for it explicitly is an error naming the file
    with pytest.raises(ParticipantError, match=r"sub-empty_T2w.nii.gz: file is empty.*fix:"):
        select_contrasts(job, ["T1w", "T2w"])


def test_missing_requested_suffix(layout):
    with pytest.raises(ParticipantError, match="no PDw image found.*FLAIR, T1w"):
        select_contrasts(_job(layout, "acq"), ["T1w", "PDw"])


def test_same_direction_warns(layout, caplog):
    with caplog.at_level(logging.WARNING, logger="bids_mcsr"):
        chosen = select_contrasts(_job(layout, "same"))
    assert len(chosen) == 2
    assert "all contrasts have axial slices" in caplog.text


def test_sessions_are_separate_sets(layout):
    s1 = select_contrasts(_job(layout, "ses", "1"))
    s2 = select_contrasts(_job(layout, "ses", "2"))
    assert _names(s1) == ["sub-ses_ses-1_T1w.nii.gz", "sub-ses_ses-1_T2w.nii.gz"]
    assert _names(s2) == ["sub-ses_ses-2_T1w.nii.gz", "sub-ses_ses-2_FLAIR.nii.gz"]


def test_metadata_is_read(layout):
    chosen = select_contrasts(_job(layout, "ses", "1"))
    assert chosen[0].metadata.get("MagneticFieldStrength") == 3


def test_validator_flags_only_the_placeholder(layout):
    errors = validator_errors(layout.root)
    assert errors
    assert all(e.endswith("/sub-empty/anat/sub-empty_T2w.nii.gz") for e in errors)


# -- classification from the header ---------------------------------------------------


def _rot_x(deg):
    t = np.radians(deg)
    r = np.eye(4)
    r[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


@pytest.mark.parametrize(
    ("kind", "plane", "spacing"),
    [
        ("axial", "axial", (1, 1, 4)),
        ("sagittal", "sagittal", (4, 1, 1)),
        ("coronal", "coronal", (1, 4, 1)),
    ],
)
def test_through_plane_each_orientation(tmp_path, kind, plane, spacing):
    path = tmp_path / "sub-01_T1w.nii.gz"
    acquisition(kind, "t1").to_filename(str(path))
    cand = classify(path)
    assert cand.problem is None
    assert cand.anisotropic
    assert cand.plane == plane
    assert cand.obliquity_deg == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(cand.spacing, spacing)


@pytest.mark.parametrize(("deg", "plane", "angle"), [(20, "axial", 20), (60, "coronal", 30)])
def test_through_plane_oblique(tmp_path, deg, plane, angle):
    shape, aff = lr_geometry("axial")
    path = tmp_path / "sub-01_FLAIR.nii.gz"
    nib.Nifti1Image(np.ones(shape, np.float32), _rot_x(deg) @ aff).to_filename(str(path))
    cand = classify(path)
    assert (cand.plane, cand.obliquity_deg) == (plane, pytest.approx(angle, abs=1e-4))


def test_classification_ignores_the_name_and_voxel_order(tmp_path):
    # Thick axis stored first (voxel axis 0) but pointing along world z: axial slices,
    # even though the file is called "sagittal".
    aff = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [4, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    path = tmp_path / "sub-01_acq-sagittal_T2w.nii.gz"
    nib.Nifti1Image(np.ones((6, 24, 28), np.float32), aff).to_filename(str(path))
    assert classify(path).plane == "axial"
    # 1.4x is below the anisotropy threshold of 1.5
    nib.Nifti1Image(np.ones((6, 6, 6), np.float32), np.diag([1, 1, 1.4, 1])).to_filename(str(path))
    assert not classify(path).anisotropic


def test_parse_entities():
    ents, suffix = parse_entities("sub-01_ses-pre_acq-fast_ce-gad_rec-norm_run-02_T1w.nii.gz")
    assert suffix == "T1w"
    assert ents == {
        "sub": "01",
        "ses": "pre",
        "acq": "fast",
        "ce": "gad",
        "rec": "norm",
        "run": "02",
    }
