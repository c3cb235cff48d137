"""ReAct and ASH against direct numpy implementations of the papers' formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from lightning_ood.detectors import ASH, DetectorInputs, ReAct
from lightning_ood.detectors.activation_shaping import percentile_linear


def _setup(
    seed: int, n: int = 120, d: int = 20, c: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    gen = torch.Generator().manual_seed(seed)
    train = torch.randn(n, d, generator=gen).relu() * 2  # post-ReLU-like activations, many zeros
    test = torch.randn(30, d, generator=gen).relu() * 3
    head = torch.nn.Linear(d, c)
    with torch.no_grad():
        head.weight.copy_(torch.randn(c, d, generator=gen))
        head.bias.copy_(torch.randn(c, generator=gen))
    return train, test, head


def _batch(feats: torch.Tensor, head: torch.nn.Linear) -> DetectorInputs:
    return DetectorInputs(logits=head(feats).detach(), features=feats, head=head)


def _np_energy(feats: np.ndarray, head: torch.nn.Linear, t: float = 1.0) -> np.ndarray:
    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    return -t * logsumexp((feats @ w.T + b) / t, axis=1)


@pytest.mark.parametrize("q", [0.0, 37.5, 90.0, 99.9, 100.0])
def test_percentile_linear_matches_numpy(q: float) -> None:
    values = torch.randn(7, 13, generator=torch.Generator().manual_seed(4))
    assert percentile_linear(values, q) == pytest.approx(np.percentile(values.double().numpy(), q), abs=1e-7)


@pytest.mark.parametrize(("percentile", "temperature"), [(90.0, 1.0), (65.0, 2.5)])
def test_react_matches_numpy(percentile: float, temperature: float) -> None:
    train, test, head = _setup(5)
    det = ReAct(percentile=percentile, temperature=temperature).fit(features=train, head=head, batch_size=50)
    c = np.percentile(train.double().numpy(), percentile)  # over all N * D values, as in the paper
    assert float(det.threshold_) == pytest.approx(c, abs=1e-6)
    expected = _np_energy(np.clip(test.double().numpy(), None, c), head, temperature)
    np.testing.assert_allclose(det(_batch(test, head)).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_react_and_ash_keep_float64() -> None:
    train, test, head = _setup(12)
    train, test, head = train.double(), test.double(), head.double()
    det = ReAct(percentile=85.0).fit(features=train, head=head, batch_size=50)
    c = np.percentile(train.numpy(), 85.0)
    assert float(det.threshold_) == pytest.approx(c, rel=1e-14, abs=0)
    scores = det(_batch(test, head))
    assert scores.dtype == torch.float64
    np.testing.assert_allclose(scores.numpy(), _np_energy(np.minimum(test.numpy(), c), head), rtol=1e-12)
    shaped = ASH(percentile=80.0, variant="s")(_batch(test, head))
    assert shaped.dtype == torch.float64
    expected = _np_energy(_np_ash(test.numpy(), 80.0, "s"), head)
    np.testing.assert_allclose(shaped.numpy(), expected, rtol=1e-12)


def test_react_fixed_threshold_needs_no_fit() -> None:
    _, test, head = _setup(6)
    det = ReAct(threshold=1.0)
    assert not det.needs_fit and det.fitted and ReAct.needs_fit and det.name == "react"
    expected = _np_energy(np.minimum(test.double().numpy(), 1.0), head)
    np.testing.assert_allclose(det(_batch(test, head)).numpy(), expected, rtol=1e-5, atol=1e-5)
    det.reset()
    assert det.fitted and float(det.threshold_) == 1.0


def test_react_streamed_equals_whole_and_round_trip() -> None:
    train, test, head = _setup(7)
    whole = ReAct().fit(features=train, head=head)
    streamed = ReAct().fit(features=train, head=head, batch_size=7)
    assert float(whole.threshold_) == float(streamed.threshold_)
    fresh = ReAct()
    with pytest.raises(RuntimeError, match="needs fitting"):
        fresh(_batch(test, head))
    fresh.load_state_dict(whole.state_dict())
    torch.testing.assert_close(fresh(_batch(test, head)), whole(_batch(test, head)), rtol=0, atol=0)


def test_react_max_samples_subsamples_rows() -> None:
    train, _, head = _setup(8, n=2000, d=16)
    exact = float(ReAct().fit(features=train, head=head).threshold_)
    sub = ReAct(max_samples=300, seed=1).fit(features=train, head=head, batch_size=64)
    again = ReAct(max_samples=300, seed=1).fit(features=train, head=head, batch_size=64)
    assert float(sub.threshold_) == float(again.threshold_)  # seeded
    assert float(sub.threshold_) == pytest.approx(exact, rel=0.05)
    everything = ReAct(max_samples=5000).fit(features=train, head=head, batch_size=64)
    assert float(everything.threshold_) == exact  # a cap above N keeps every row


def _np_ash(x: np.ndarray, percentile: float, variant: str) -> np.ndarray:
    out = np.zeros_like(x)
    d = x.shape[1]
    k = d - int(np.round(d * percentile / 100.0))
    for i, row in enumerate(x):
        idx = np.argsort(-row, kind="stable")[:k]
        if variant == "p":
            out[i, idx] = row[idx]
        elif variant == "b":
            out[i, idx] = row.sum() / k
        else:
            out[i, idx] = row[idx] * np.exp(row.sum() / row[idx].sum())
    return out


@pytest.mark.parametrize(("variant", "percentile"), [("s", 90.0), ("s", 65.0), ("b", 90.0), ("p", 80.0)])
def test_ash_matches_numpy(variant: str, percentile: float) -> None:
    _, _, head = _setup(9, d=40)
    test = torch.rand(30, 40, generator=torch.Generator().manual_seed(10)) * 2  # distinct values: no ties
    det = ASH(percentile=percentile, variant=variant)  # type: ignore[arg-type]
    assert det.fitted and det.requires == frozenset({"features", "head"})
    expected = _np_energy(_np_ash(test.double().numpy(), percentile, variant), head)
    np.testing.assert_allclose(det(_batch(test, head)).numpy(), expected, rtol=1e-5, atol=1e-4)


def test_ash_all_zero_row_and_bad_args() -> None:
    _, _, head = _setup(11)
    scores = ASH()(_batch(torch.zeros(2, 20), head))
    assert torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="variant"):
        ASH(variant="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="percentile"):
        ASH(percentile=100)
    with pytest.raises(ValueError, match="needs `head`"):
        ASH()(DetectorInputs(logits=torch.zeros(2, 3), features=torch.ones(2, 20)))
