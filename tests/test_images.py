"""Input validation: every broken NIfTI gives one line naming the file and a fix."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from bids_mcsr.errors import ImageError
from bids_mcsr.images import header_problem, load_image


def _save(path, data, affine=None):
    affine = np.diag([1.0, 1.0, 4.0, 1.0]) if affine is None else affine
    nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine).to_filename(str(path))
    return path


@pytest.fixture
def good(tmp_path):
    data = np.arange(24 * 28 * 6, dtype=np.float32).reshape(24, 28, 6)
    return _save(tmp_path / "good.nii.gz", data)


def _one_line_error(path, match):
    with pytest.raises(ImageError) as info:
        load_image(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    assert "fix:" in msg
    assert match in msg
    # The cheap header check agrees for header-level problems.
    return msg


def test_load_valid_image(good):
    img = load_image(good)
    assert img.shape == (24, 28, 6)
    assert img.data.dtype == np.float32
    np.testing.assert_allclose(img.zooms, [1, 1, 4])
    assert img.data[1, 2, 3] == pytest.approx(1 * 28 * 6 + 2 * 6 + 3)
    assert header_problem(good) is None


def test_trailing_singleton_4d_is_3d(tmp_path):
    path = _save(tmp_path / "x.nii.gz", np.ones((24, 28, 6, 1)))
    assert load_image(path).shape == (24, 28, 6)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    _one_line_error(path, "0 bytes")
    assert "0 bytes" in header_problem(path)


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.nii.gz", "does not exist")


def test_not_nifti(tmp_path):
    path = tmp_path / "text.nii.gz"
    path.write_bytes(gzip.compress(b"this is not an image" * 50))
    _one_line_error(path, "not a readable NIfTI")
    assert header_problem(path) is not None


def test_truncated_gzip(good, tmp_path):
    raw = good.read_bytes()
    path = tmp_path / "trunc.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    msg = _one_line_error(path, "truncated")
    assert "gzip -t" in msg


def test_nan_and_inf(tmp_path):
    data = np.ones((24, 28, 6), dtype=np.float32)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    _one_line_error(_save(tmp_path / "nan.nii.gz", data), "2 NaN/Inf voxels")


def test_all_zero(tmp_path):
    _one_line_error(_save(tmp_path / "zero.nii.gz", np.zeros((24, 28, 6))), "every voxel is zero")


def test_4d_series(tmp_path):
    path = _save(tmp_path / "bold.nii.gz", np.ones((24, 28, 6, 3)))
    _one_line_error(path, "4-D")
    assert "4-D" in header_problem(path)


def test_2d_image(tmp_path):
    _one_line_error(_save(tmp_path / "slice.nii.gz", np.ones((24, 28))), "3-D volume")
    _one_line_error(_save(tmp_path / "slab.nii.gz", np.ones((24, 28, 1))), "3-D volume")


def test_qform_sform_disagreement(tmp_path):
    img = nib.Nifti1Image(np.ones((24, 28, 6), dtype=np.float32), np.diag([1.0, 1, 4, 1]))
    shifted = np.diag([1.0, 1, 4, 1])
    shifted[:3, 3] = [10.0, 0, 0]
    img.set_qform(np.diag([1.0, 1, 4, 1]), code=1)
    img.set_sform(shifted, code=1)
    path = tmp_path / "ambiguous.nii.gz"
    img.to_filename(str(path))
    msg = _one_line_error(path, "qform and sform disagree by up to 10.0 mm")
    assert "set_qform" in msg
    # A qform without code (unset) is not a disagreement.
    img.set_qform(np.diag([1.0, 1, 4, 1]), code=0)
    img.to_filename(str(path))
    assert load_image(path).affine[0, 3] == pytest.approx(10.0)
