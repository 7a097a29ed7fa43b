"""The workflow passes a plausible sidecar SliceThickness to the engine's slice profile."""

import logging
from pathlib import Path

import numpy as np
import pytest

from bids_mcsr.discovery import Candidate
from bids_mcsr.images import Image
from bids_mcsr.workflow import sidecar_slice_thickness

AFFINE = np.diag([1.0, 1.0, 4.0, 1.0])  # 4 mm slices along voxel axis 2


def _pair(metadata: dict) -> tuple[Candidate, Image]:
    path = Path("sub-01_T1w.nii.gz")
    cand = Candidate(path=path, suffix="T1w", entities={"sub": "01"}, metadata=metadata)
    return cand, Image(path=path, data=np.zeros((4, 4, 2), np.float32), affine=AFFINE)


@pytest.mark.parametrize(("value", "expected"), [(1.0, 1.0), (4, 4.0), (8.0, 8.0)])
def test_plausible_sidecar_value_is_used(value, expected, caplog):
    with caplog.at_level(logging.WARNING):
        assert sidecar_slice_thickness(*_pair({"SliceThickness": value})) == expected
    assert not caplog.records


def test_missing_value_means_the_spacing_silently(caplog):
    with caplog.at_level(logging.WARNING):
        assert sidecar_slice_thickness(*_pair({})) is None
    assert not caplog.records


@pytest.mark.parametrize("value", [0, -2.0, 8.5, "4", True])
def test_implausible_value_warns_and_falls_back_to_the_spacing(value, caplog):
    with caplog.at_level(logging.WARNING):
        assert sidecar_slice_thickness(*_pair({"SliceThickness": value})) is None
    assert "sub-01_T1w.nii.gz: sidecar SliceThickness" in caplog.text
    assert "using the spacing" in caplog.text
