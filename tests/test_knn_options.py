"""KNN's speed options: a seeded bank subset equals exact KNN on those rows; faiss flat and IVF probing every
cell equal the exact search; HNSW never scores below exact; the default's fingerprint is unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_ood.detectors import KNN, DetectorInputs
from lightning_ood.detectors.knn_index import subset_rows

pytest.importorskip("faiss")


def _data(n: int = 600, d: int = 16, q: int = 80):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=gen), torch.randn(q, d, generator=gen)


def _score(det: KNN, train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    det.fit(features=train, batch_size=128)
    return det(DetectorInputs(logits=None, features=test))


def _brute_force(train: torch.Tensor, test: torch.Tensor, k: int) -> torch.Tensor:
    sims = F.normalize(test.double(), dim=1) @ F.normalize(train.double(), dim=1).T
    return -sims.sort(dim=1, descending=True).values[:, k - 1]


@pytest.mark.parametrize("k", [1, 7])
def test_bank_subset_is_exact_knn_on_the_seeded_rows(k):
    train, test = _data()
    det = KNN(k=k, bank_fraction=0.25, seed=5)
    got = _score(det, train, test)
    rows = subset_rows(len(train), 0.25, 5)
    assert len(det.bank) == len(rows) == 150 and len(set(rows.tolist())) == 150
    torch.testing.assert_close(got.double(), _brute_force(train[rows], test, k), atol=1e-6, rtol=0)
    assert torch.equal(_score(KNN(k=k, bank_fraction=0.25, seed=5), train, test), got)  # seeded
    assert not torch.equal(_score(KNN(k=k, bank_fraction=0.25, seed=6), train, test), got)


@pytest.mark.parametrize("k", [1, 7])
def test_faiss_flat_and_ivf_probing_every_cell_equal_exact(k):
    train, test = _data()
    exact = _score(KNN(k=k), train, test)
    flat = _score(KNN(k=k, index="faiss_flat"), train, test)
    ivf = _score(KNN(k=k, index="faiss_ivf", nlist=8, nprobe=8), train, test)
    torch.testing.assert_close(flat, exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(ivf, exact, atol=1e-5, rtol=0)


def test_approximate_indexes_never_score_below_exact():
    train, test = _data(n=2000, d=32)
    exact = _score(KNN(k=5), train, test)
    for det in (
        KNN(k=5, index="faiss_ivf", nlist=32, nprobe=1),
        KNN(k=5, index="faiss_hnsw", hnsw_m=4, ef_search=8),
    ):
        approx = _score(det, train, test)
        assert (approx >= exact - 1e-5).all(), det.index
    probed = _score(KNN(k=5, index="faiss_ivf", nlist=32, nprobe=1), train, test)
    assert (probed > exact + 1e-4).any()  # one cell of 32 misses neighbours: the test can see a difference


def test_faiss_index_is_rebuilt_from_a_loaded_bank():
    train, test = _data()
    fitted = KNN(k=3, index="faiss_flat")
    expected = _score(fitted, train, test)
    loaded = KNN(k=3, index="faiss_flat")
    loaded.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(loaded(DetectorInputs(logits=None, features=test)), expected)


def test_default_fingerprint_and_bad_options():
    assert KNN().extra_repr() == "k=1, chunk_size=8192, bank_dtype='float32'"
    assert KNN(bank_fraction=0.1).fingerprint() != KNN().fingerprint()
    assert KNN(index="faiss_ivf").fingerprint() != KNN(index="faiss_ivf", nprobe=2).fingerprint()
    with pytest.raises(ValueError, match="bank_fraction must be in"):
        KNN(bank_fraction=0)
    with pytest.raises(ValueError, match="index must be one of"):
        KNN(index="annoy")
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        KNN(index="faiss_ivf", nprobe=0)
