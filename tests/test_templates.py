"""Template space: local-only TemplateFlow lookup, nilearn fallback, rigid alignment, no network."""

from __future__ import annotations

import socket

import nibabel as nib
import numpy as np
import pytest

from bids_mcsr import templates
from bids_mcsr.resample import resample_to_grid

NAME = "MNI152NLin2009cAsym"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture()
def tf_home(tmp_path, monkeypatch):
    home = tmp_path / "templateflow"
    (home / f"tpl-{NAME}").mkdir(parents=True)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def mni2():
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine


def _tf_file(home, stripped: bool = False):
    desc = "_desc-brain" if stripped else ""
    return home / f"tpl-{NAME}" / f"tpl-{NAME}_res-01{desc}_T1w.nii.gz"


def test_placeholder_templateflow_file_falls_back_to_nilearn(tf_home):
    _tf_file(tf_home).touch()  # a fresh TemplateFlow skeleton holds 0-byte files
    assert templates.local_templateflow_file(NAME, False) is None
    tpl = templates.load_template(NAME)
    assert tpl.source == templates.NILEARN_SOURCE
    assert tpl.skull_stripped and tpl.data.shape == (197, 233, 189)


def test_local_templateflow_file_is_used(tf_home, mni2):
    data, affine = mni2
    path = _tf_file(tf_home, stripped=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    tpl = templates.load_template(NAME, skull_stripped=True)
    assert tpl.source == str(path) and tpl.skull_stripped
    np.testing.assert_allclose(tpl.affine, affine)
    # Asked for a head template, the brain one is still better than none.
    assert templates.load_template(NAME, skull_stripped=False).source == str(path)


def test_unknown_space_is_a_clear_error():
    with pytest.raises(ValueError, match="--output-space MNI305: unsupported"):
        templates.load_template("MNI305")


def test_template_space_recovers_rigid_pose(tf_home, mni2):
    data, affine = mni2
    nib.save(nib.Nifti1Image(data, affine), str(_tf_file(tf_home, stripped=True)))
    # A "subject": the template seen by a scanner whose frame is rotated by
    # 8 degrees and shifted by 25 mm (so reference world != template world).
    th = np.radians(8.0)
    truth = np.eye(4)  # reference world -> template world
    truth[:3, :3] = [[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]]
    truth[:3, 3] = [6.0, -15.0, 19.0]
    ref_affine = affine.copy()
    ref_affine[:3, 2] *= 2  # 2x2x4 mm thick-slice reference
    ref_shape = (data.shape[0], data.shape[1], data.shape[2] // 2)
    ref = resample_to_grid(data, affine, ref_shape, truth @ ref_affine, order=1)
    space = templates.template_space(ref, ref_affine, NAME, 2.0, skull_stripped=True)
    assert space.name == NAME and space.source.endswith("desc-brain_T1w.nii.gz")
    assert "templateflow" in space.spatial_reference
    # Brain points in the reference world land where the truth puts them.
    pts = np.argwhere(ref[::2, ::2, ::2] > 0.2) * 2
    world = np.c_[pts, np.ones(len(pts))] @ ref_affine.T
    err = np.linalg.norm((world @ space.transform.T - world @ truth.T)[:, :3], axis=1).max()
    assert err < 2.0, err
    # Output grid: isotropic 2 mm over the template's field of view.
    np.testing.assert_allclose(np.abs(space.affine[:3, :3]), 2.0 * np.eye(3))
    assert space.shape == (99, 117, 95)
