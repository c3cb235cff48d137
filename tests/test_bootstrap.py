"""Bootstrap intervals: each resample equals the exact metric on the explicitly resampled arrays, the 95 %
intervals cover known population values about 95 % of the time, and the result rows carry them."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from lightning_ood.callbacks.results import INTERVAL_COLUMNS, build_rows, columns_for
from lightning_ood.metrics import ood_metrics
from lightning_ood.metrics.bootstrap import (
    BOOTSTRAP_KEYS,
    _draw_counts,
    bootstrap_intervals,
    bootstrap_resamples,
)


def test_each_resample_equals_ood_metrics_on_the_resampled_arrays():
    gen = torch.Generator().manual_seed(0)
    # integer scores: many ties across ID and OOD; ±inf included
    ids = torch.randint(0, 6, (40,), generator=gen).double()
    ood = torch.randint(3, 9, (25,), generator=gen).double()
    ids[0], ood[0] = -math.inf, math.inf
    values = bootstrap_resamples(ids, {"x": ood}, resamples=8, seed=5)["x"]
    # the same draws, made explicitly: the ID counts first, then the OOD counts
    draws = torch.Generator().manual_seed(5)
    id_counts, ood_counts = _draw_counts(len(ids), 8, draws), _draw_counts(len(ood), 8, draws)
    for b in range(8):
        id_b, ood_b = ids.repeat_interleave(id_counts[b].long()), ood.repeat_interleave(ood_counts[b].long())
        assert len(id_b) == len(ids) and len(ood_b) == len(ood)  # sizes kept: ID and OOD resampled apart
        ref = ood_metrics(
            torch.cat([id_b, ood_b]), torch.cat([torch.zeros(len(id_b)), torch.ones(len(ood_b))])
        )
        for key in BOOTSTRAP_KEYS:
            assert float(values[key][b]) == pytest.approx(ref[key], abs=1e-12), (b, key)
    assert len({round(float(v), 9) for v in values["auroc"]}) > 1  # the resamples differ


def test_intervals_cover_known_gaussian_values_at_the_nominal_rate():
    """ID ~ N(0, 1), OOD ~ N(mu, 1): AUROC = Phi(mu / sqrt 2); both FPR95s = Phi(z_0.95 - mu).

    200 independent experiments; a 95 % interval covers the truth a Binomial(200, ~0.95) number of times,
    so coverage outside [0.90, 0.99] would be a > 3-sigma event for a correct method.
    """
    mu, n, experiments = 1.0, 400, 200
    truth = {"auroc": norm.cdf(mu / math.sqrt(2))}
    truth["fpr95_idpos"] = truth["fpr95_oodpos"] = norm.cdf(norm.ppf(0.95) - mu)
    gen = torch.Generator().manual_seed(1)
    hits = dict.fromkeys(BOOTSTRAP_KEYS, 0)
    for e in range(experiments):
        ids = torch.randn(n, generator=gen, dtype=torch.float64)
        ood = torch.randn(n, generator=gen, dtype=torch.float64) + mu
        iv = bootstrap_intervals(ids, {"x": ood}, resamples=300, seed=e)["x"]
        for key in BOOTSTRAP_KEYS:
            hits[key] += iv[f"{key}_lo"] <= truth[key] <= iv[f"{key}_hi"]
    coverage = {k: v / experiments for k, v in hits.items()}
    assert all(0.90 <= c <= 0.99 for c in coverage.values()), coverage


def test_group_interval_is_the_interval_of_the_mean_and_seeded():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randn(300, generator=gen)
    oods = {"a": torch.randn(200, generator=gen) + 1, "b": torch.randn(100, generator=gen) + 2}
    per_set = bootstrap_resamples(ids, oods, resamples=400, seed=3)
    iv = bootstrap_intervals(ids, oods, {"all": ["a", "b"]}, resamples=400, seed=3)
    mean = (per_set["a"]["auroc"] + per_set["b"]["auroc"]) / 2
    lo, hi = torch.quantile(mean, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert iv["all"]["auroc_lo"] == pytest.approx(lo) and iv["all"]["auroc_hi"] == pytest.approx(hi)
    assert iv == bootstrap_intervals(ids, oods, {"all": ["a", "b"]}, resamples=400, seed=3)
    assert iv["a"] != bootstrap_intervals(ids, oods, resamples=400, seed=4)["a"]
    point = ood_metrics(torch.cat([ids, oods["a"]]), torch.cat([torch.zeros(300), torch.ones(200)]))
    assert iv["a"]["auroc_lo"] < point["auroc"] < iv["a"]["auroc_hi"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="'x' scores"):
        bootstrap_resamples(torch.randn(5), {"x": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        bootstrap_resamples(torch.randn(5), {"x": torch.randn(5)}, resamples=0)
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_intervals(torch.randn(5), {"x": torch.randn(5)}, level=95)


def test_rows_carry_intervals_for_sets_and_groups():
    metrics = dict(ood_metrics(torch.tensor([0.0, 1.0]), torch.tensor([0, 1])))
    per_set = {"msp": {"a": metrics, "b": metrics}}
    intervals = {"msp": {s: dict.fromkeys(INTERVAL_COLUMNS, 0.5) for s in ("a", "b", "far", "all")}}
    rows = build_rows(per_set, {"a": 1, "b": 1}, {"a": "far", "b": "far"}, 1, 1.0, {}, intervals)
    assert {r["set"] for r in rows} == {"a", "b", "far", "all"}
    assert (
        all(r["auroc_lo"] == 0.5 for r in rows)
        and columns_for(rows)[-len(INTERVAL_COLUMNS) :] == INTERVAL_COLUMNS
    )
    assert "auroc_lo" not in columns_for(
        build_rows(per_set, {"a": 1, "b": 1}, {"a": "far", "b": "far"}, 1, 1.0, {})
    )
