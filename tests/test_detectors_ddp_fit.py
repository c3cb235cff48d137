"""Sharded DDP fits equal a 1-process fit on all the data, in 3 CPU processes (gloo): KNN (bank sharded, top-k
merged across ranks, also with a bank subset, a replicated bank and a 1-process fit loaded from the cache),
ReAct (exact distributed percentile) and the linear probe (data-parallel training); on an interleaved split
(the fit loader's) and on one where a rank gets no fit batch, in float32 and float64. The ranks score different
numbers of test batches (3, 1 and none), which must not hang the sharded KNN's collective rounds, also with
two sharded banks scored together and an empty DDP slot. HeatmapOOD's
sharded target pass is put back in dataset order. With no data on any rank every rank raises."""

from __future__ import annotations

import pytest
import torch
from ddp_helpers import module_state_digest, run_ddp  # tests/ddp_helpers.py

from lightning_ood.contract import CONSUMABLES
from lightning_ood.detectors import KNN, DetectorInputs, LinearProbe, ReAct
from lightning_ood.detectors.base import begin_scoring
from lightning_ood.detectors.defaults import default_detectors
from lightning_ood.methods.heatmap_targets import Described, gather_described

N, D, WORLD = 101, 12, 3
QUERY_BATCHES = {0: [(0, 3), (3, 6), (6, 9)], 1: [(9, 15)], 2: []}  # rank -> test rows it scores, per batch


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Linear]:
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(N, D, generator=gen, dtype=torch.float64).relu().to(dtype)
    test = torch.randn(15, D, generator=gen, dtype=torch.float64).relu().to(dtype)
    head = torch.nn.Linear(D, 4, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(4, D, generator=gen))
        head.bias.zero_()
    return train, torch.arange(N) % 4, test, head


def _detectors(dtype: torch.dtype) -> dict[str, KNN | ReAct]:
    bank = "float64" if dtype == torch.float64 else "float32"
    return {
        "knn": KNN(k=4, chunk_size=9, bank_dtype=bank, bank_placement="sharded"),
        "knn_subset": KNN(k=2, bank_dtype=bank, bank_fraction=0.4, seed=3, bank_placement="sharded"),
        "knn_replicated": KNN(k=3, bank_dtype=bank, bank_placement="replicated"),
        "react": ReAct(percentile=90.0),
        "react_cap_above_n": ReAct(max_samples=1000),
        "react_subsampled": ReAct(max_samples=30),
    }


def _fit(det, train: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear) -> None:
    """Fit batch by batch (no update at all when ``train`` is empty)."""
    det.reset()
    for start in range(0, len(train), 10):
        feats = train[start : start + 10]
        batch = DetectorInputs(logits=torch.empty(0), features=feats, head=head)
        det.update(batch, labels[start : start + 10])
    det.finalize()


def _score(det, test: torch.Tensor, head: torch.nn.Linear, batches: list[tuple[int, int]]) -> torch.Tensor:
    return _score_together([det], test, head, batches)[0]


def _score_together(dets, test, head, batches, empty_slots: int = 0) -> list[torch.Tensor]:
    """Score ``dets`` batch by batch, each batch through every detector in turn (as a method's test step),
    after ``empty_slots`` batches scored without a forward pass (a DDP rank's empty slot)."""
    begin_scoring(dets, len(batches) + empty_slots)
    out: list[list[torch.Tensor]] = [[] for _ in dets]
    with torch.no_grad():
        for _ in range(empty_slots):
            for det in dets:
                det.empty_round()
        for a, b in batches:
            inputs = DetectorInputs(logits=head(test[a:b]), features=test[a:b], head=head)
            for i, det in enumerate(dets):
                out[i].append(det(inputs))
    return [torch.cat(o) if o else torch.empty(0, dtype=test.dtype) for o in out]


def _two_knns() -> list[KNN]:
    return [KNN(k=4, chunk_size=9, bank_placement="sharded"), KNN(k=2, bank_placement="sharded")]


def _fit_and_score(train, labels, test, head, batches) -> dict[str, torch.Tensor]:
    dets = {**_detectors(train.dtype), "probe": LinearProbe(epochs=3, batch_size=16)}
    out = {}
    for key, det in dets.items():
        _fit(det, train, labels, head)
        out[key] = _score(det, test, head, batches)
        if isinstance(det, ReAct):
            out[key + "_threshold"] = det.threshold_.clone()
    return out


def _shard(rank: int, split: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    if split == "interleaved":  # as the UnpaddedDistributedSampler deals the fit loader: 34, 34, 33 rows
        return [t[rank::WORLD] for t in tensors]
    bounds = {0: (0, 60), 1: (60, N), 2: (N, N)}[rank]  # rank 2 gets no fit batch
    return [t[bounds[0] : bounds[1]] for t in tensors]


def _fit_worker(rank: int, cached_state: dict) -> dict[str, dict[str, torch.Tensor]]:
    results = {}
    batches = QUERY_BATCHES[rank]
    for dtype in (torch.float32, torch.float64):
        train, labels, test, head = _data(dtype)
        for split in ("interleaved", "empty_rank"):
            shard, shard_labels = _shard(rank, split, train, labels)
            results[f"{split}/{dtype}"] = _fit_and_score(shard, shard_labels, test, head, batches)
    knn = KNN(k=4, chunk_size=9, bank_placement="sharded")
    knn.load_state_dict(cached_state)  # a 1-process fit from the cache: each rank keeps its share
    _, _, test, head = _data(torch.float32)
    results["cached"] = {"knn": _score(knn, test, head, batches), "rows": torch.tensor(len(knn.rows))}
    results["cached"]["saved_fitted"] = knn.state_dict()["_fitted"]  # a shard is not written as a fit
    # Two sharded banks scored together: rank 1 owes two rounds of each (paid interleaved, as the batches take
    # them), rank 2 as well and then has one empty slot (no forward pass, still a round of each).
    shard, shard_labels = _shard(rank, "interleaved", *_data(torch.float32)[:2])
    knns = _two_knns()
    for det in knns:
        _fit(det, shard, shard_labels, head)
    results["together"] = _score_together(knns, test, head, batches, empty_slots=int(rank == 2))
    # HeatmapOOD's target pass: each rank describes its interleaved share; together again in dataset order.
    rows = torch.arange(N)[rank::WORLD]
    mine = Described(
        rows[:, None].float().expand(-1, 3), rows[:, None].float(), [str(i).encode() for i in rows.tolist()]
    )
    together = gather_described(mine)
    results["described"] = (together.features, together.logits, together.keys)
    results["digests"] = _fitted_state_digests(shard, shard_labels, head)
    return results


def _fitted_state_digests(train, labels, head) -> dict[str, dict[str, str]]:
    """Every default detector, the sharded and replicated KNN, ReAct and the probe fitted on this rank's share:
    the digests of their parameters and buffers, which must be the same on every rank (Lightning broadcasts
    them from rank 0 when a stage starts; rank-local state such as a bank's share is kept out of them)."""
    dets = [
        *default_detectors(frozenset(CONSUMABLES)),
        *_detectors(torch.float32).values(),
        LinearProbe(epochs=2),
    ]
    digests = {}
    for det in dets:
        det.reset()
        for start in range(0, len(train), 10):
            feats = train[start : start + 10]
            with torch.no_grad():
                batch = DetectorInputs(logits=head(feats), features=feats, head=head)
            det.update(batch, labels[start : start + 10])
        det.finalize()
        digests[det.name] = module_state_digest(det)
    return digests


@pytest.mark.slow
def test_sharded_fits_on_three_processes_equal_one_process() -> None:
    train, labels, test, head = _data(torch.float32)
    one = KNN(k=4, chunk_size=9)
    _fit(one, train, labels, head)
    results = run_ddp(_fit_worker, one.state_dict(), world_size=WORLD, timeout=300)
    exact = ("knn", "knn_subset", "knn_replicated", "react", "react_threshold", "react_cap_above_n")
    exact += ("react_cap_above_n_threshold",)
    for dtype in (torch.float32, torch.float64):
        single = _fit_and_score(*_data(dtype), [(0, 15)])
        assert single["knn"].dtype == single["react"].dtype == dtype  # float64 is not downcast
        tol = 1e-6 if dtype == torch.float32 else 1e-10
        for split in ("interleaved", "empty_rank"):
            for rank, ddp in enumerate(results):
                got, rows = ddp[f"{split}/{dtype}"], slice(*_span(rank))
                for key in (*exact, "probe"):
                    want = single[key] if key.endswith("threshold") else single[key][rows]
                    # The probe's gradients are summed over ranks: equal up to float summation order.
                    atol = 1e-4 if key == "probe" and dtype == torch.float32 else tol
                    torch.testing.assert_close(
                        got[key], want, rtol=0, atol=atol, msg=f"{split}/{dtype}/{rank}/{key}"
                    )
                # Subsampling is an estimate that depends on the world size; it ran and kept a value in range.
                assert 0 < float(got["react_subsampled_threshold"]) < float(_data(dtype)[0].max())
    assert all(ddp["digests"] == results[0]["digests"] for ddp in results[1:])  # rank-independent state
    assert {"knn", "mahalanobis", "vim", "react"} <= results[0]["digests"].keys()
    for rank, ddp in enumerate(results):
        cached = ddp["cached"]
        torch.testing.assert_close(cached["knn"], single_knn(test, head, rank), rtol=0, atol=1e-6)
        assert int(cached["rows"]) == len(range(rank, N, WORLD)) and not bool(cached["saved_fitted"])
        for det, got in zip(_two_knns(), ddp["together"], strict=True):
            _fit(det, train, labels, head)
            want = _score(det, test, head, [(0, 15)])[slice(*_span(rank))]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"together/{rank}/k={det.k}")
        features, logits, keys = ddp["described"]
        assert torch.equal(logits[:, 0], torch.arange(N).float()) and features.shape == (N, 3)
        assert keys == [str(i).encode() for i in range(N)]


def _span(rank: int) -> tuple[int, int]:
    batches = QUERY_BATCHES[rank]
    return (batches[0][0], batches[-1][1]) if batches else (0, 0)


def single_knn(test: torch.Tensor, head: torch.nn.Linear, rank: int) -> torch.Tensor:
    train, labels, _, _ = _data(torch.float32)
    det = KNN(k=4, chunk_size=9)
    _fit(det, train, labels, head)
    return _score(det, test, head, [(0, 15)])[slice(*_span(rank))]


def _error_worker(rank: int) -> dict[str, str]:
    """Fit with no data on any rank, then with a different feature dimension per rank; return the errors."""
    errors = {}
    for key, det in _detectors(torch.float32).items():
        for case, feats in (("no_data", None), ("dim_mismatch", torch.rand(5, 6 + rank))):
            det.reset()
            if feats is not None:
                det.update(DetectorInputs(logits=torch.empty(0), features=feats), torch.full((5,), -1))
            try:
                det.finalize()
                errors[f"{case}/{key}"] = "no error"
            except (RuntimeError, ValueError) as err:
                errors[f"{case}/{key}"] = str(err)
    return errors


@pytest.mark.slow
def test_fit_without_data_on_any_rank_raises_on_every_rank() -> None:
    for errors in run_ddp(_error_worker, timeout=300):  # a deadlock guard; a loaded machine starts slowly
        for key in _detectors(torch.float32):
            assert "no ID training features on any rank" in errors[f"no_data/{key}"], errors
            assert "feature dimension differs across ranks" in errors[f"dim_mismatch/{key}"], errors


def test_fit_without_data_raises_in_one_process() -> None:
    for det in _detectors(torch.float32).values():
        det.reset()
        with pytest.raises(RuntimeError, match="no ID training features on any rank"):
            det.finalize()
