"""Exact OOD metrics against scikit-learn (the independent references listed in the README, Conventions -> Metrics)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from lightning_ood.metrics import METRIC_KEYS, OODMetrics, ood_metrics, roc_curve

torch.set_num_threads(1)

INF = np.inf


def inf_stand_in(scores: np.ndarray) -> float:
    """A finite value beyond every finite score, to stand in for +inf (and its negative for -inf)."""
    finite = scores[np.isfinite(scores)]
    return 2 * float(np.abs(finite).max()) + 1 if finite.size else 1.0


def finite_stand_ins(scores: np.ndarray) -> np.ndarray:
    """sklearn rejects infinite scores: swap ±inf for finite values beyond the others (same ranking)."""
    big = inf_stand_in(scores)
    return np.where(scores == INF, big, np.where(scores == -INF, -big, scores))


def sklearn_reference(scores: np.ndarray, is_ood: np.ndarray) -> dict[str, float]:
    """The scikit-learn reference formulas of the README's metric table, verbatim."""
    s, y = finite_stand_ins(np.asarray(scores, dtype=np.float64)), np.asarray(is_ood)
    fpr_in, tpr_in, _ = skm.roc_curve(1 - y, -s, drop_intermediate=False)
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": skm.roc_auc_score(y, s),
        "aupr_in": skm.average_precision_score(1 - y, -s),
        "aupr_out": skm.average_precision_score(y, s),
        "fpr95_idpos": fpr_in[np.searchsorted(tpr_in, 0.95)],
        "fpr95_oodpos": fpr[np.searchsorted(tpr, 0.95)],
        "detection_error": np.min(0.5 * (1 - tpr) + 0.5 * fpr),
    }


def make(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ID and OOD scores and interleave them with a fixed permutation."""
    s = np.concatenate([np.asarray(id_scores, float), np.asarray(ood_scores, float)])
    y = np.concatenate([np.zeros(len(id_scores), int), np.ones(len(ood_scores), int)])
    perm = np.random.default_rng(0).permutation(len(s))
    return s[perm], y[perm]


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(1, 300, size=2)
    kind = seed % 3
    if kind == 0:  # continuous, overlapping
        return make(rng.normal(0, 1, n_id), rng.normal(0.7, 1.3, n_ood))
    if kind == 1:  # heavy ties
        return make(rng.integers(0, 4, n_id), rng.integers(1, 5, n_ood))
    return make(rng.normal(0, 3e4, n_id).round(), rng.normal(1e4, 3e4, n_ood).round())  # large, ties


_rng = np.random.default_rng(1234)
HARD_CASES = {
    "heavy_ties": make(_rng.integers(0, 3, 200), _rng.integers(1, 4, 150)),
    "large_magnitude": make(_rng.normal(-2e4, 1e4, 100), _rng.normal(3e4, 2e4, 80)),
    "large_offset_small_gaps": make(
        1e6 + _rng.integers(0, 50, 90) * 1e-6, 1e6 + _rng.integers(20, 70, 60) * 1e-6
    ),
    "mixed_signs": make(_rng.normal(-0.5, 2, 120), _rng.normal(0.5, 2, 130)),
    "inf_both_ends": make([-INF, -INF, 0.0, 1.0, INF, 2.0], [INF, INF, 3.0, -INF, 1.0, 0.5]),
    "inf_with_ties": make([INF, 1, 1, 2, -INF], [INF, INF, 1, 2, 2, -INF]),
    "all_plus_inf": make([INF] * 3, [INF] * 2),
    "id_minus_inf_ood_plus_inf": make([-INF] * 4, [INF] * 3),
    "one_vs_one": make([0.3], [0.7]),
    "one_vs_one_inverted": make([0.7], [0.3]),
    "one_vs_one_tied": make([0.5], [0.5]),
    "one_id_many_ood": make([0.0], _rng.normal(0, 1, 40)),
    "many_id_one_ood": make(_rng.normal(0, 1, 40), [0.0]),
    "perfectly_separated": make(_rng.uniform(-3, -1, 50), _rng.uniform(1, 3, 70)),
    "perfectly_inverted": make(_rng.uniform(1, 3, 50), _rng.uniform(-3, -1, 70)),
    "all_equal": make(np.full(30, 2.5), np.full(17, 2.5)),
    "tpr_exactly_095": make(_rng.integers(0, 10, 20), _rng.integers(3, 13, 20)),
    "tpr_exactly_095_unbalanced": make(_rng.normal(0, 1, 100), _rng.normal(1, 1, 20)),
    "scores_in_unit_interval_and_outside": make(
        np.r_[_rng.uniform(0, 1, 40), _rng.normal(5, 2, 20)],
        np.r_[_rng.uniform(0.3, 1, 40), _rng.normal(8, 2, 20)],
    ),
}
HARD_CASES |= {f"random_seed{seed}": _random_case(seed) for seed in range(24)}


@pytest.mark.parametrize("case", list(HARD_CASES))
def test_ood_metrics_match_sklearn(case: str) -> None:
    s, y = HARD_CASES[case]
    got = ood_metrics(torch.from_numpy(s), torch.from_numpy(y))
    ref = sklearn_reference(s, y)
    assert tuple(got) == METRIC_KEYS
    for key in METRIC_KEYS:
        assert isinstance(got[key], float)
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key


@pytest.mark.parametrize("case", list(HARD_CASES))
def test_roc_curve_matches_sklearn(case: str) -> None:
    s, y = HARD_CASES[case]
    fpr, tpr, thr = roc_curve(torch.from_numpy(s), torch.from_numpy(y))
    ref_fpr, ref_tpr, ref_thr = skm.roc_curve(y, finite_stand_ins(s), drop_intermediate=False)
    assert fpr.dtype == tpr.dtype == thr.dtype == torch.float64
    np.testing.assert_allclose(fpr.numpy(), ref_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr.numpy(), ref_tpr, rtol=0, atol=1e-12)
    # Thresholds equal sklearn's, except that a group of +inf / -inf scores keeps its infinite threshold.
    big = inf_stand_in(s)
    ref_thr = np.where(ref_thr == big, INF, np.where(ref_thr == -big, -INF, ref_thr))
    assert (
        np.isinf(ref_thr).sum() == 1 + np.isinf(np.unique(s)).sum()
    )  # the stand-ins were really mapped back
    np.testing.assert_allclose(thr.numpy(), ref_thr, rtol=1e-12, atol=0)


def test_closed_form_values() -> None:
    """Hand-computed numbers (not sklearn): ID {0, 1, 2}, OOD {1, 3}; one tie between ID 1 and OOD 1."""
    got = ood_metrics(torch.tensor([0.0, 1.0, 2.0, 1.0, 3.0]), torch.tensor([0, 0, 0, 1, 1]))
    # Pairs (ood, id): 3 beats all 3; 1 beats 0, ties 1, loses to 2 -> (3 + 1 + 0.5) / 6.
    assert got["auroc"] == pytest.approx(4.5 / 6, abs=1e-15)
    # OOD positive, thresholds 3, 2, 1: P = 1, 1/2, 2/4 at R = 1/2, 1/2, 1 -> AP = 1/2 + 1/2 * 1/2.
    assert got["aupr_out"] == pytest.approx(0.75, abs=1e-15)
    # OOD recall reaches 95% only at threshold 1, where ID {1, 2} of 3 are flagged.
    assert got["fpr95_oodpos"] == pytest.approx(2 / 3, abs=1e-15)
    # Keeping >= 95% of ID needs threshold "s <= 2"; OOD sample 1 is kept too -> 1/2.
    assert got["fpr95_idpos"] == pytest.approx(0.5, abs=1e-15)
    # Best threshold flags only {3}: 0.5 * (1 - 1/2) + 0.5 * 0 = 0.25.
    assert got["detection_error"] == pytest.approx(0.25, abs=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_brute_force_pair_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s_id, s_ood = rng.integers(-3, 3, 60).astype(float), rng.integers(-2, 4, 45).astype(float)
    s_id[:3], s_ood[:2] = -INF, INF
    pairs = s_ood[:, None] - s_id[None, :]  # inf - (-inf) = inf: fine, no inf - inf pairs here
    brute = (np.sum(pairs > 0) + 0.5 * np.sum(pairs == 0)) / pairs.size
    s, y = make(s_id, s_ood)
    assert ood_metrics(s, y)["auroc"] == pytest.approx(brute, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_input_dtypes(dtype: torch.dtype) -> None:
    s, y = HARD_CASES["scores_in_unit_interval_and_outside"]
    s_typed = torch.from_numpy(s).to(dtype)
    # The reference sees exactly the values the metric sees after the cast (float16 rounding creates ties).
    ref = sklearn_reference(s_typed.double().numpy(), y)
    for is_ood in (torch.from_numpy(y), torch.from_numpy(y).bool(), torch.from_numpy(y).to(dtype)):
        got = ood_metrics(s_typed, is_ood)
        for key in METRIC_KEYS:
            assert got[key] == pytest.approx(ref[key], abs=1e-6), key


def test_numpy_inputs_and_bfloat16() -> None:
    s, y = HARD_CASES["heavy_ties"]  # small integers: exact in bfloat16
    ref = sklearn_reference(s, y)
    for got in (
        ood_metrics(s.astype(np.float32), y.astype(bool)),
        ood_metrics(torch.tensor(s).bfloat16(), y),
    ):
        for key in METRIC_KEYS:
            assert got[key] == pytest.approx(ref[key], abs=1e-6), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs() -> None:
    s, y = HARD_CASES["mixed_signs"]
    got = ood_metrics(torch.from_numpy(s).cuda().float(), torch.from_numpy(y).cuda())
    assert got == pytest.approx(ood_metrics(torch.from_numpy(s).float(), torch.from_numpy(y)), abs=1e-12)


def _batches(s: np.ndarray, y: np.ndarray, how: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split (s, y) into batches; "by_class" yields ID-only and OOD-only batches, "random" random sizes."""
    st, yt = torch.from_numpy(s).float(), torch.from_numpy(y)
    if how == "single":
        return [(st, yt)]
    if how == "by_class":
        order = torch.argsort(yt, stable=True)
        st, yt = st[order], yt[order]
    rng = np.random.default_rng(seed)
    cuts = rng.choice(np.arange(1, len(s)), size=min(7, len(s) - 1), replace=False)
    if how == "by_class":  # a cut between the classes: the batches on either side hold one class only
        cuts = np.append(cuts, int((yt == 0).sum()))
    cuts = np.unique(cuts)
    edges = [0, *cuts.tolist(), len(s)]
    return [(st[a:b], yt[a:b]) for a, b in itertools.pairwise(edges)]


@pytest.mark.parametrize("how", ["single", "random", "by_class"])
@pytest.mark.parametrize("case", ["heavy_ties", "inf_with_ties", "scores_in_unit_interval_and_outside"])
def test_metric_independent_of_batching(case: str, how: str) -> None:
    s, y = HARD_CASES[case]
    metric = OODMetrics(set_name=case)
    batches = _batches(s, y, how, seed=len(case))
    if how == "by_class":
        assert any(bool((b_y == 0).all()) for _, b_y in batches)
        assert any(bool((b_y == 1).all()) for _, b_y in batches)
    for b_s, b_y in batches:
        metric.update(b_s, b_y)
    got = metric.compute()
    functional = ood_metrics(torch.from_numpy(s).float(), y)
    ref = sklearn_reference(torch.from_numpy(s).float().double().numpy(), y)
    assert tuple(got) == METRIC_KEYS
    for key in METRIC_KEYS:
        assert got[key].dtype == torch.float64 and got[key].ndim == 0
        assert float(got[key]) == pytest.approx(functional[key], abs=1e-12), key
        assert float(got[key]) == pytest.approx(ref[key], abs=1e-6), key


def test_metric_merge_state_equals_one_process() -> None:
    """Two metrics each seeing half the data (as two DDP ranks would) merge to the single-process result."""
    s, y = HARD_CASES["tpr_exactly_095_unbalanced"]
    st, yt = torch.from_numpy(s), torch.from_numpy(y)
    rank0, rank1 = OODMetrics(), OODMetrics()
    rank0.update(st[::2], yt[::2])
    rank1.update(st[1::2], yt[1::2])
    rank0.merge_state(rank1)
    got = rank0.compute()
    ref = sklearn_reference(s, y)
    for key in METRIC_KEYS:
        assert float(got[key]) == pytest.approx(ref[key], abs=1e-6), key


def test_metric_reset() -> None:
    metric = OODMetrics(set_name="faces")
    metric.update(torch.tensor([5.0, 0.0]), torch.tensor([0, 1]))  # inverted: auroc 0
    assert float(metric.compute()["auroc"]) == 0.0
    metric.reset()
    metric.update(torch.tensor([0.0, 5.0]), torch.tensor([0, 1]))
    assert float(metric.compute()["auroc"]) == 1.0


# --- errors --------------------------------------------------------------------------------------------


def test_nan_scores_raise_with_set_name_and_counts() -> None:
    s = torch.tensor([0.1, float("nan"), 0.3, float("nan"), float("nan"), 2.0])
    y = torch.tensor([0, 0, 1, 1, 1, 0])
    for fn in (ood_metrics, roc_curve):
        with pytest.raises(ValueError, match="NaN") as err:
            fn(s, y, set_name="svhn")
        msg = str(err.value)
        assert "'svhn'" in msg and "3 NaN scores" in msg and "1 ID" in msg and "2 OOD" in msg


def test_nan_in_metric_reported_at_compute_with_total_count() -> None:
    metric = OODMetrics(set_name="digits")
    metric.update(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 1]))
    metric.update(torch.tensor([float("nan"), 2.0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"'digits'.*2 NaN scores \(1 ID, 1 OOD\)"):
        metric.compute()


@pytest.mark.parametrize(
    ("is_ood", "which"), [([1, 1, 1], "ID set is empty"), ([0, 0, 0], "OOD set is empty"), ([], "ID and OOD")]
)
def test_empty_class_raises_naming_it(is_ood: list[int], which: str) -> None:
    s = torch.arange(len(is_ood), dtype=torch.float32)
    for fn in (ood_metrics, roc_curve):
        with pytest.raises(ValueError, match=which) as err:
            fn(s, torch.tensor(is_ood), set_name="textures")
        assert "'textures'" in str(err.value)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric OODMetrics was called before")
def test_metric_without_updates_or_single_class_raises() -> None:
    metric = OODMetrics(set_name="places")
    with pytest.raises(ValueError, match=r"'places'.*ID and OOD set is empty"):
        metric.compute()
    metric.update(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"'places'.*the ID set is empty"):
        metric.compute()


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"'inat'.*same length.*\(4,\) and \(3,\)"):
        ood_metrics(torch.zeros(4), torch.tensor([0, 1, 0]), set_name="inat")
    with pytest.raises(ValueError, match=r"1-D.*\(4, 1\)"):
        ood_metrics(torch.zeros(4, 1), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"'inat'.*shape \[B\].*\(4,\) and \(2, 2\)"):
        OODMetrics(set_name="inat").update(torch.zeros(4), torch.tensor([[0, 1], [0, 1]]))


@pytest.mark.parametrize("bad", [[0, 1, 2, 1], [0, 1, -1, 1], [0, 1, 0.5, 1]])
def test_labels_other_than_0_1_raise(bad: list[float]) -> None:
    with pytest.raises(ValueError, match=r"'ssb'.*only 0 \(ID\) and 1 \(OOD\).*1 other values") as err:
        ood_metrics(torch.zeros(4), torch.tensor(bad), set_name="ssb")
    assert str(bad[2]) in str(err.value)
    metric = OODMetrics(set_name="ssb")
    metric.update(torch.zeros(4), torch.tensor(bad))
    with pytest.raises(ValueError, match="only 0"):
        metric.compute()
