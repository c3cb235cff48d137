"""KNN against brute-force numpy cosine similarities, plus fitting, checkpoint and separation behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lightning_ood.detectors import KNN, DetectorInputs
from lightning_ood.detectors.knn import kth_largest_cosine


def _brute_force(train: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = np.sort(test @ train.T, axis=1)  # full [B, N] matrix, ascending
    return -sims[:, -k]


def _score(det: KNN, feats: torch.Tensor) -> torch.Tensor:
    return det(DetectorInputs(logits=torch.empty(len(feats), 0), features=feats))


@pytest.mark.parametrize(("k", "chunk_size"), [(1, 7), (1, 1000), (5, 7), (5, 3), (13, 64), (60, 11)])
def test_knn_matches_brute_force(k: int, chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(k + chunk_size)
    train = torch.randn(101, 16, generator=gen, dtype=torch.float64)
    test = torch.randn(23, 16, generator=gen, dtype=torch.float64) * 3
    det = KNN(k=k, chunk_size=chunk_size).fit(features=train.float(), batch_size=17)
    expected = _brute_force(train.numpy(), test.numpy(), k)
    np.testing.assert_allclose(_score(det, test.float()).numpy(), expected, atol=2e-6)


@pytest.mark.parametrize("k", [1, 3])  # k = 1 has its own (bank-major) product
def test_knn_float64_bank_is_exact_and_float64_is_not_downcast(k: int) -> None:
    gen = torch.Generator().manual_seed(4)
    train = torch.randn(101, 16, generator=gen, dtype=torch.float64) + 0.3
    test = torch.randn(23, 16, generator=gen, dtype=torch.float64)
    det = KNN(k=k, chunk_size=7, bank_dtype="float64").fit(features=train, batch_size=17)
    assert det.bank.dtype == torch.float64
    scores = _score(det, test)
    assert scores.dtype == torch.float64 and scores.shape == (23,)
    np.testing.assert_allclose(
        scores.numpy(), _brute_force(train.numpy(), test.numpy(), k), rtol=0, atol=1e-13
    )
    # Half-precision features are promoted to float32 for scoring.
    assert _score(KNN(k=3).fit(features=train.float()), test.half()).dtype == torch.float32


def test_knn_ties_and_duplicates() -> None:
    # Duplicated bank rows and a query equal to a bank row: the k-th largest value counts duplicates.
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    train = torch.cat([base, base, base[:1] * 5])  # [1, 0] appears 3 times (scale-invariant), others twice
    test = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    for k in (1, 2, 3, 4, 7):
        det = KNN(k=k, chunk_size=2).fit(features=train)
        expected = _brute_force(train.double().numpy(), test.double().numpy(), k)
        np.testing.assert_allclose(_score(det, test).numpy(), expected, atol=1e-6)
    det = KNN(k=3, chunk_size=4).fit(features=train)
    assert _score(det, test[:1]).item() == pytest.approx(-1.0)  # three copies of [1, 0]


def test_kth_largest_cosine_chunking_is_invariant() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(257, 8, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(9, 8, generator=gen), dim=1)
    ref = kth_largest_cosine(queries, bank, 10, 257)
    for chunk in (1, 4, 10, 100, 256, 10_000):
        torch.testing.assert_close(kth_largest_cosine(queries, bank, 10, chunk), ref, rtol=0, atol=1e-6)


def test_knn_separates_gaussian_blobs() -> None:
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 32, generator=gen) * 4
    train = centres.repeat_interleave(200, 0) + torch.randn(600, 32, generator=gen)
    id_test = centres.repeat_interleave(50, 0) + torch.randn(150, 32, generator=gen)
    ood = torch.randn(2, 32, generator=gen) * 4
    ood_test = ood.repeat_interleave(75, 0) + torch.randn(150, 32, generator=gen)
    det = KNN(k=5).fit(features=train)
    scores = torch.cat([_score(det, id_test), _score(det, ood_test)]).numpy()
    labels = np.r_[np.zeros(150), np.ones(150)]
    assert roc_auc_score(labels, scores) >= 0.95


def test_knn_streamed_fit_equals_whole_fit_and_state_dict_round_trip() -> None:
    gen = torch.Generator().manual_seed(2)
    train, test = torch.randn(90, 12, generator=gen), torch.randn(20, 12, generator=gen)
    whole = KNN(k=3).fit(features=train)
    streamed = KNN(k=3).fit(features=train, batch_size=13)
    torch.testing.assert_close(_score(streamed, test), _score(whole, test), rtol=0, atol=0)
    fresh = KNN(k=3)
    fresh.load_state_dict(whole.state_dict())
    assert fresh.fitted and fresh.bank.shape == (90, 12) and fresh.fingerprint() == whole.fingerprint()
    torch.testing.assert_close(_score(fresh, test), _score(whole, test), rtol=0, atol=0)


def test_knn_half_bank_is_close_and_smaller() -> None:
    gen = torch.Generator().manual_seed(3)
    train, test = torch.randn(200, 64, generator=gen), torch.randn(10, 64, generator=gen)
    full = KNN(k=2).fit(features=train)
    half = KNN(k=2, bank_dtype="float16").fit(features=train)
    assert half.bank.dtype == torch.float16 and half.bank.nbytes * 2 == full.bank.nbytes
    torch.testing.assert_close(_score(half, test), _score(full, test), rtol=0, atol=2e-3)


def test_knn_errors_and_contract() -> None:
    det = KNN()
    assert det.requires == frozenset({"features"}) and det.needs_fit and det.name == "knn"
    with pytest.raises(RuntimeError, match="needs fitting"):
        _score(det, torch.randn(2, 4))
    with pytest.raises(ValueError, match="exceeds the bank size"):
        KNN(k=5).fit(features=torch.randn(4, 3))
    with pytest.raises(ValueError, match="bank_dtype"):
        KNN(bank_dtype="int8")
    with pytest.raises(ValueError, match="k must be"):
        KNN(k=0)
    det.fit(features=torch.randn(4, 3))
    det.reset()
    assert not det.fitted and det.bank.numel() == 0
    assert KNN(k=50).fingerprint() != KNN(k=1).fingerprint()
