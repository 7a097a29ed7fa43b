"""Rigid poses learned with the field (bids_mcsr/inr/pose.py)."""

import numpy as np
import pytest
import torch

from bids_mcsr.geometry import CoordinateNormaliser
from bids_mcsr.inr.pose import RigidPoses


def test_pose_moves_only_refined_outputs_and_matches_its_world_transform():
    norm = CoordinateNormaliser(centre=np.array([10.0, -20.0, 5.0]), half_extent=80.0)
    poses = RigidPoses([False, True], norm.half_extent)
    with torch.no_grad():
        poses.rotation_deg[:] = torch.tensor([[3.0, 3.0, 3.0], [1.5, -2.0, 4.0]])
        poses.translation_mm[:] = torch.tensor([[9.0, 9.0, 9.0], [0.7, -1.2, 2.5]])
    world = np.random.default_rng(0).uniform(-60, 60, size=(5, 3))
    x = torch.from_numpy(norm(world))
    fixed = poses(x, torch.zeros(5, dtype=torch.long))
    moved = poses(x, torch.ones(5, dtype=torch.long)).detach().numpy()
    assert torch.equal(fixed, x)
    fixed_m, moved_m = poses.world_corrections(norm.centre)
    assert np.array_equal(fixed_m, np.eye(4))
    expected = norm(world @ moved_m[:3, :3].T + moved_m[:3, 3])
    np.testing.assert_allclose(moved, expected, atol=1e-6)
    rot = moved_m[:3, :3]
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    angle = np.degrees(np.arccos((np.trace(rot) - 1) / 2))
    assert angle == pytest.approx(np.linalg.norm([1.5, -2.0, 4.0]), rel=1e-6)


def test_translation_gradient_reaches_refined_outputs_only():
    poses = RigidPoses([True, False], 100.0)
    x = torch.rand(8, 3)
    which = torch.tensor([0, 1] * 4)
    poses(x, which)[:, 1].sum().backward()
    grad = poses.translation_mm.grad
    assert grad[0, 1].item() == pytest.approx(4 / 100.0)
    assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[0, [0, 2]]) == 0


@pytest.mark.parametrize("refine", [[False, False], [True, True]])
def test_a_field_needs_one_refined_and_one_fixed_output(refine):
    with pytest.raises(ValueError, match="refined and one fixed"):
        RigidPoses(refine, 100.0)


def test_workflow_composes_the_learned_pose_into_transforms_and_sidecar(tmp_path):
    from bids_mcsr.discovery import Candidate
    from bids_mcsr.workflow import Fit, apply_pose_corrections

    chosen = [
        Candidate(tmp_path / "sub-01_T1w.nii.gz", "T1w", {"sub": "01"}),
        Candidate(tmp_path / "sub-01_FLAIR.nii.gz", "FLAIR", {"sub": "01"}),
    ]
    reg = np.eye(4)
    reg[:3, 3] = [4.0, -2.0, 1.0]
    corr = np.eye(4)
    corr[:3, 3] = [0.0, 0.3, 0.0]
    space = np.eye(4)
    space[:3, 3] = [10.0, 0.0, 0.0]
    fit = Fit(volumes={}, sr_fields={}, pose_corrections={chosen[1].label: corr})
    record = {"Inputs": {"sub-01_FLAIR.nii.gz": {"Matrix": reg.tolist()}}}
    transforms, fit_transforms = apply_pose_corrections(
        chosen, fit, [None, reg], [space, space @ reg], record, space
    )
    assert transforms[0] is None and np.array_equal(fit_transforms[0], space)
    np.testing.assert_allclose(transforms[1][:3, 3], [4.0, -1.7, 1.0])
    np.testing.assert_allclose(fit_transforms[1], corr @ space @ reg)
    entry = record["Inputs"]["sub-01_FLAIR.nii.gz"]
    assert entry["Matrix"] == transforms[1].tolist()
    assert entry["BeforeJointRefinement"]["Matrix"] == reg.tolist()
    assert entry["JointRefinement"]["TranslationMm"] == pytest.approx([0.0, 0.3, 0.0])


def test_fit_refines_only_flagged_inputs_and_reports_their_correction():
    from bids_mcsr.inr.fit import Contrast, fit_contrasts

    rng = np.random.default_rng(0)
    hr = rng.random((16, 16, 16)).astype(np.float32)
    axial = hr.reshape(16, 16, 4, 4).mean(3)
    sagittal = hr.reshape(4, 4, 16, 16).mean(1)
    a_aff, s_aff = np.diag([1.0, 1, 4, 1]), np.diag([4.0, 1, 1, 1])
    a_aff[2, 3] = s_aff[0, 3] = 1.5
    common = {
        "overrides": {"epochs": 2, "min_steps_per_epoch": 8, "pose_lr": 0.0},
        "progress": False,
    }
    inputs = [Contrast("A", axial, a_aff), Contrast("B", sagittal, s_aff, refine_pose=True)]
    off = fit_contrasts(inputs, (16, 16, 16), np.eye(4), **common)
    assert off.pose_corrections == {} and off.config["pose_refined"] == []
    common["overrides"] = {**common["overrides"], "pose_lr": 0.05, "pose_start_epoch": 0}
    on = fit_contrasts(inputs, (16, 16, 16), np.eye(4), **common)
    assert sorted(on.pose_corrections) == ["B"] and on.config["pose_refined"] == ["B"]
    moved = on.pose_corrections["B"]
    assert 0 < np.abs(moved - np.eye(4)).max() < 1.0  # mm / rotation entries, a small step


def test_pose_gradient_from_a_sample_fraction_recovers_a_known_shift():
    """A partner displaced 2 mm along y is pulled towards it by a quarter of its samples."""
    from scipy import ndimage

    from bids_mcsr.inr.fit import Contrast, fit_contrasts

    rng = np.random.default_rng(1)
    hr = ndimage.gaussian_filter(rng.random((24, 24, 24)), 2.0).astype(np.float32)
    hr = (hr - hr.min()) / np.ptp(hr)
    shifted = ndimage.shift(hr, (0, -2, 0), order=1, mode="nearest")  # content at y - 2
    axial = hr.reshape(24, 24, 8, 3).mean(3)
    sagittal = (1 - shifted).reshape(8, 3, 24, 24).mean(1)
    a_aff, s_aff = np.diag([1.0, 1, 3, 1]), np.diag([3.0, 1, 1, 1])
    a_aff[2, 3] = s_aff[0, 3] = 1.0
    inputs = [Contrast("A", axial, a_aff), Contrast("B", sagittal, s_aff, refine_pose=True)]
    overrides = {
        "epochs": 4,
        "min_steps_per_epoch": 64,
        "pose_lr": 0.05,
        "pose_start_epoch": 1,
        "pose_sample_fraction": 0.25,
    }
    r = fit_contrasts(inputs, (24, 24, 24), np.eye(4), overrides=overrides, progress=False)
    tx, ty, tz = r.pose_corrections["B"][:3, 3]
    # B shows at y what A shows at y + 2 mm: the correction moves B's points up in y
    # (0.65 mm in 3 epochs; the field absorbs part of the offset at first), not across
    assert 0.4 < ty < 2.5 and max(abs(tx), abs(tz)) < ty / 4


def test_pose_sample_fraction_is_validated():
    from bids_mcsr.inr.presets import resolve

    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="pose_sample_fraction"):
            resolve("fast", {"pose_sample_fraction": bad})
