"""Fits at scale, on one process: the distributed percentile is exact (against ``torch.kthvalue`` and
``np.percentile``), search candidates share one fit state and score as if fitted alone, the per-class
Mahalanobis memory guard fails early with the numbers, a sharded bank refuses to score without agreed rounds,
and a faiss index is kept with the fitted state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ood.detectors import KNN, DetectorInputs, Mahalanobis, ReAct
from lightning_ood.detectors.fitting import fit_detectors
from lightning_ood.detectors.knn_shards import ShardedRounds
from lightning_ood.detectors.memory_guard import per_class_bytes
from lightning_ood.detectors.quantile import distributed_percentile
from lightning_ood.detectors.shared_fit import share_fit_state


def _kth_percentile(x: torch.Tensor, q: float) -> float:
    """``np.percentile`` from two exact ``torch.kthvalue`` order statistics (the independent reference)."""
    flat = x.double().flatten()
    pos = q / 100 * (flat.numel() - 1)
    lo = int(np.floor(pos))
    v_lo = float(flat.kthvalue(lo + 1).values)
    v_hi = float(flat.kthvalue(min(lo + 2, flat.numel())).values)
    return v_lo + (pos - lo) * (v_hi - v_lo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"bins": 3, "gather_limit": 2, "chunk": 5}])
def test_distributed_percentile_is_exact(dtype, options) -> None:
    gen = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(40, 7, generator=gen).relu(),  # ReLU: many exact zeros
        (torch.randn(300, generator=gen) * 2).round(),  # heavy ties
        torch.randn(1, generator=gen),
        torch.full((9,), 0.25),  # a single distinct value
    ]
    for values in cases:
        values = values.to(dtype)
        parts = [values.flatten()[:5], values.flatten()[5:], values.new_empty(0)]  # a share may be empty
        for q in (0.0, 1.5, 50.0, 90.0, 99.9, 100.0):
            got = distributed_percentile(parts, q, device=values.device, **options)
            assert got == _kth_percentile(values, q), (q, options)  # error 0: the same order statistics
            assert got == pytest.approx(np.percentile(values.double().numpy(), q), abs=1e-12)
    with pytest.raises(ValueError, match="empty set of values"):
        distributed_percentile([torch.empty(0)], 50.0, device=torch.device("cpu"))


def _batches(features: torch.Tensor, head: torch.nn.Linear):
    for start in range(0, len(features), 16):
        feats = features[start : start + 16]
        yield DetectorInputs(logits=head(feats), features=feats, head=head), torch.zeros(len(feats))


def test_search_candidates_share_one_fit_state_and_score_as_alone() -> None:
    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(90, 6, generator=gen).relu(), torch.randn(20, 6, generator=gen).relu()
    head = torch.nn.Linear(6, 3)
    batch = DetectorInputs(logits=head(test), features=test, head=head)
    make = [lambda: KNN(k=1), lambda: KNN(k=5, chunk_size=7), lambda: ReAct(80.0), lambda: ReAct(95.0)]
    shared = [f() for f in make]
    leaders = share_fit_state(shared)
    assert leaders == [shared[0], shared[2]]
    fit_detectors(leaders, list(_batches(train, head)), lambda b: b, progress=False)
    assert shared[0].bank.data_ptr() == shared[1].bank.data_ptr()  # one bank for both k
    for det, alone in zip(shared, [f() for f in make], strict=True):
        fit_detectors([alone], list(_batches(train, head)), lambda b: b, progress=False)
        assert det.fitted
        with torch.no_grad():
            torch.testing.assert_close(det(batch), alone(batch), rtol=0, atol=0)
    assert KNN(bank_fraction=0.5).fit_state_key() != KNN().fit_state_key() == KNN(k=9).fit_state_key()
    assert ReAct(threshold=1.0).fit_state_key() is None


def test_per_class_mahalanobis_fails_early_with_the_numbers() -> None:
    assert per_class_bytes(1000, 2048)[0] == 1000 * 2048 * 2048 * 8  # 34 GB kept
    feats, targets = torch.randn(30, 64), torch.arange(30) % 3
    det = Mahalanobis(covariance="per_class", memory_limit_gb=1e-4)  # 100 kB < 6 x 3 x 64^2 x 8 B = 590 kB
    with pytest.raises(MemoryError, match="C=3 classes of D=64") as err:
        det.fit(features=feats, targets=targets)
    assert "covariance='tied'" in str(err.value) and "0.00059 GB" in str(err.value)
    with pytest.warns(UserWarning, match="covariance='tied'"):
        Mahalanobis(covariance="per_class", memory_limit_gb=7e-4).fit(features=feats, targets=targets)
    Mahalanobis(memory_limit_gb=1e-9).fit(features=feats, targets=targets)  # tied: no guard needed


def test_sharded_rounds_refuse_to_score_without_agreed_rounds() -> None:
    rounds = ShardedRounds(4, torch.device("cpu"), "knn")
    with pytest.raises(RuntimeError, match="begin_scoring"):
        rounds.kth(torch.randn(2, 4), lambda q, k: q[:, :k], 1)
    with pytest.raises(ValueError, match="no length"):
        rounds.begin(float("inf"))


def test_faiss_index_is_kept_with_the_fitted_state() -> None:
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(2)
    train, test = torch.randn(400, 8, generator=gen), torch.randn(10, 8, generator=gen)
    det = KNN(k=3, index="faiss_ivf", nlist=8, nprobe=2).fit(features=train)
    state = det.state_dict()
    assert state["faiss_index"].numel() > 0
    fresh = KNN(k=3, index="faiss_ivf", nlist=8, nprobe=2)
    fresh.load_state_dict(state)
    batch = DetectorInputs(logits=None, features=test)
    torch.testing.assert_close(fresh(batch), det(batch), rtol=0, atol=0)


def test_shared_storage_check_names_the_setting(tmp_path) -> None:
    from types import SimpleNamespace

    from lightning_ood.callbacks.shared_storage import PLACEHOLDER, SharedStorageCheck

    strategy = SimpleNamespace(broadcast=lambda x: x, barrier=lambda name=None: None)

    def trainer(root: str, nodes: int, save_dir: str | None = None):
        loggers = [SimpleNamespace(save_dir=save_dir)] if save_dir else []
        return SimpleNamespace(default_root_dir=root, num_nodes=nodes, loggers=loggers, ckpt_path=None,
                               strategy=strategy, is_global_zero=True)  # fmt: skip

    check = SharedStorageCheck()
    with pytest.raises(ValueError, match=r"trainer.default_root_dir is still the placeholder"):
        check.setup(trainer(PLACEHOLDER, 1), None, "test")
    with pytest.raises(ValueError, match=r"trainer.logger\[0\].init_args.save_dir = 'logs' is relative"):
        check.setup(trainer(str(tmp_path), 2, "logs"), None, "test")
    check.setup(trainer("logs", 1), None, "test")  # one node: relative paths are fine
    check.setup(trainer(str(tmp_path / "out"), 2, str(tmp_path)), None, "test")  # shared: seen by every rank
    assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").iterdir())  # the token is removed


def test_a_knn_state_saved_without_a_faiss_index_still_loads() -> None:
    gen = torch.Generator().manual_seed(3)
    det = KNN(k=2).fit(features=torch.randn(20, 5, generator=gen))
    state = {k: v for k, v in det.state_dict().items() if k != "faiss_index"}  # a fit cache from before
    fresh = KNN(k=2)
    fresh.load_state_dict(state)
    batch = DetectorInputs(logits=None, features=torch.randn(3, 5, generator=gen))
    assert torch.equal(fresh(batch), det(batch))
