"""The demo dataset (built from nilearn's packaged MNI152) and the demo command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bids_mcsr import demo
from bids_mcsr.discovery import classify, validator_errors
from bids_mcsr.geometry import world_bounds

VOXEL = 6.0  # much coarser than the real demo: these tests check geometry and wiring


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return demo.build_dataset(tmp_path_factory.mktemp("demo"), voxel_mm=VOXEL)


def test_thick_slice_grid_keeps_the_field_of_view():
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-10, -20, -30]
    for axis in range(3):
        shape, lr = demo.thick_slice_grid((8, 12, 16), aff, axis)
        assert shape[axis] == (8, 12, 16)[axis] // 4
        assert lr[axis, axis] == 8.0
        lo, hi = world_bounds(shape, lr)
        lo_hr, hi_hr = world_bounds((8, 12, 16), aff)
        np.testing.assert_allclose(lo, lo_hr)
        np.testing.assert_allclose(hi, hi_hr)


def test_demo_inputs_are_axial_and_sagittal(built):
    anat = built["bids"] / "sub-01" / "anat"
    t1 = classify(anat / "sub-01_T1w.nii.gz")
    t2 = classify(anat / "sub-01_T2w.nii.gz")
    assert (t1.plane, t1.spacing) == ("axial", (VOXEL, VOXEL, 4 * VOXEL))
    assert (t2.plane, t2.spacing) == ("sagittal", (4 * VOXEL, VOXEL, VOXEL))
    assert t1.anisotropic and t2.anisotropic


def test_demo_truth_and_intensities(built):
    import nibabel as nib

    t1 = nib.load(str(built["T1w"])).get_fdata()
    t2 = nib.load(str(built["T2w"])).get_fdata()
    assert t1.shape == t2.shape and all(n % demo.FACTOR == 0 for n in t1.shape)
    brain = t1 > 0.1 * t1.max()
    # MRI-like scale, and the synthetic T2w inverts the T1 tissue ordering:
    # where T1 is brightest (white matter) T2 is darker than where T1 is dim (CSF/GM).
    assert 300 < t1.max() <= demo.T1_SCALE
    bright = t1 > np.percentile(t1[brain], 80)
    dim = brain & (t1 < np.percentile(t1[brain], 20))
    assert t2[bright].mean() < t2[dim].mean()


def test_demo_dataset_is_valid_bids(built):
    assert validator_errors(built["bids"]) == []


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path, capsys):
    # whole brain at 6 mm; unknown options (--seed) go on to mcsr
    argv = ["--out", str(tmp_path), "--voxel", str(VOXEL), "--crop", "0", "--epochs", "2"]
    code = demo.main([*argv, "--nthreads", "1", "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 0
    deriv = tmp_path / "bids" / "derivatives" / "mcsr"
    for name in ("T1w", "T2w"):
        assert (deriv / "sub-01" / "anat" / f"sub-01_desc-superres_{name}.nii.gz").is_file()
    assert (deriv / "group_qc.tsv").is_file()
    meta = json.loads((deriv / "sub-01/anat/sub-01_desc-superres_T2w.json").read_text())
    assert meta["SuperResolution"]["Seed"] == 3
    # a small volume: the fast preset shrinks its batch (min_steps_per_epoch)
    assert meta["SuperResolution"]["Config"]["batch_size_used"][0] < 8192
    assert f"derivatives        : {deriv}" in out
    assert "cubic spline" in out
