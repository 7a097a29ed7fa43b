"""MI estimate and the MI-plateau stopping/selection rule, on synthetic curves."""

import numpy as np
import pytest

from bids_mcsr.inr.mi import (
    PlateauRule,
    epoch_changes,
    mutual_information,
    pairwise_mi,
    plateau_status,
    select_epoch,
)

RULE = PlateauRule(min_epochs=10, patience=5, window=3, rel_tol=0.1)


def run_rule(curve, rule=RULE):
    """Feed a curve epoch by epoch like the training loop; return (stop epoch or None, status)."""
    for e in range(1, len(curve) + 1):
        status = plateau_status({"A|B": curve[:e]}, rule)
        if status.stop:
            return e - 1, status
    return None, status


def test_mi_of_identical_uniform_samples_is_log_bins():
    x = np.random.default_rng(0).uniform(size=200_000)
    assert mutual_information(x, x, bins=32) == pytest.approx(np.log(32), abs=1e-3)


def test_mi_independent_is_near_zero_and_symmetric():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=100_000), rng.normal(size=100_000)
    assert mutual_information(a, b) < 0.01
    c = a + 0.5 * b
    assert mutual_information(a, c) == pytest.approx(mutual_information(c, a), rel=1e-9)
    # invariant to affine intensity changes (bins follow each sample's range)
    assert mutual_information(a, c) == pytest.approx(mutual_information(3 * a + 7, c), rel=1e-9)


def test_pairwise_keys_every_pair():
    values = np.random.default_rng(2).normal(size=(1000, 3))
    assert list(pairwise_mi(values, ["T1w", "T2w", "FLAIR"])) == [
        "T1w|T2w",
        "T1w|FLAIR",
        "T2w|FLAIR",
    ]


def plateau_curve(n=40, tau=4.0, noise=0.002, seed=0):
    """MI falling from a random-init high to a plateau (paper Fig. 3), plus noise."""
    e = np.arange(n)
    return 0.45 + 0.3 * np.exp(-e / tau) + np.random.default_rng(seed).normal(0, noise, n)


@pytest.mark.parametrize("seed", range(5))
def test_stops_on_plateau_after_min_epochs(seed):
    curve = plateau_curve(seed=seed)
    stop, status = run_rule(curve)
    assert stop is not None and RULE.min_epochs - 1 <= stop <= 30
    assert status.run_start is not None and stop - status.run_start + 1 >= RULE.patience
    d = epoch_changes([curve[: stop + 1]])
    chosen = select_epoch({"A|B": curve[: stop + 1]}, RULE, stopped=True)
    assert status.run_start <= chosen <= stop
    assert d[chosen] == np.min(d[status.run_start : stop + 1])


@pytest.mark.parametrize("seed", range(10))
def test_does_not_stop_on_noise(seed):
    curve = 0.5 + np.random.default_rng(seed).normal(0, 0.02, 60)
    assert run_rule(curve)[0] is None


def test_does_not_stop_on_steady_trend():
    assert run_rule(np.linspace(0.8, 0.3, 50))[0] is None


def test_min_epochs_and_patience_respected():
    flat_early = np.r_[0.9, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    stop, _ = run_rule(flat_early, PlateauRule(min_epochs=10, patience=5, window=1, rel_tol=0.1))
    assert stop == 9  # flat from epoch 3 on, but min_epochs=10 holds it back
    stop, _ = run_rule(flat_early, PlateauRule(min_epochs=1, patience=5, window=1, rel_tol=0.1))
    assert stop == 7  # epochs 3..7 are the first 5 flat epochs


def test_selection_without_plateau_is_last_epoch():
    assert select_epoch({"A|B": [0.1, 0.2, 0.3]}, RULE, stopped=False) == 2
    with pytest.raises(ValueError):
        select_epoch({"A|B": [0.1, 0.2, 0.3]}, RULE, stopped=True)


def test_pairs_are_averaged():
    d = epoch_changes({"A|B": [0.0, 1.0, 1.0], "A|C": [0.0, 0.0, 2.0]})
    assert np.isnan(d[0]) and d[1:].tolist() == [0.5, 1.0]
