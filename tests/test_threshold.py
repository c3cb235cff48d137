"""The threshold at a given ID recall against a brute-force search over every candidate, with ties."""

import numpy as np
import pytest
import torch

from lightning_ood.metrics.threshold import threshold_at_id_recall


def _brute(scores: np.ndarray, recall: float) -> float:
    """The smallest candidate t (every observed score) with at least `recall` of the scores <= t."""
    ok = [t for t in np.unique(scores) if (scores <= t).sum() >= recall * len(scores) - 1e-9]
    return float(min(ok))


@pytest.mark.parametrize("recall", [0.95, 0.9, 0.5, 1.0, 0.01])
@pytest.mark.parametrize("n", [1, 7, 20, 101])
def test_matches_brute_force_with_ties(n, recall):
    rng = np.random.default_rng(n)
    for values in (rng.normal(size=n), rng.integers(0, 4, size=n).astype(float)):  # continuous; heavy ties
        t = threshold_at_id_recall(torch.from_numpy(values), recall)
        assert t == _brute(values, recall)
        assert (values <= t).mean() >= recall - 1e-12  # at least `recall` of ID kept, ties never split


def test_exact_at_95_percent_of_20():
    scores = torch.arange(20, dtype=torch.float64)  # 19 of 20 = exactly 95 %: the 19th smallest
    assert threshold_at_id_recall(scores, 0.95) == 18.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="val_fraction"):
        threshold_at_id_recall(torch.empty(0))
    with pytest.raises(ValueError, match="NaN"):
        threshold_at_id_recall(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        threshold_at_id_recall(torch.zeros(3), 0.0)
