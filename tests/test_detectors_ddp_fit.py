"""Sharded DDP fits equal a 1-process fit on all the data, in 3 CPU processes (gloo): KNN (bank sharded, top-k
merged across ranks, also with a bank subset, a replicated bank and a 1-process fit loaded from the cache),
ReAct (exact distributed percentile) and the linear probe (data-parallel training); on an interleaved split
(the fit loader's) and on one where a rank gets no fit batch, in float32 and float64. The ranks score different
numbers of test batches (3, 1 and none), which must not hang the sharded KNN's collective rounds, also with
two sharded banks scored together and an empty DDP slot. HeatmapOOD's sharded target passes (ID training
images and auxiliary outliers, also fewer outliers or ID images than ranks) and its target search over each
rank's share of the ID features, merged by (distance, dataset row), give the targets of one process, ties
included (and those equal brute force), also for a class no ID image is predicted as. The aux-vs-test file digests
(each rank hashes its share; a cache rank 0 writes serves the next call and a 1-process run) equal one process,
and a missing file raises on every rank. With no data on any rank every rank raises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_helpers import module_state_digest, run_ddp  # tests/ddp_helpers.py

from lightning_ood.contract import CONSUMABLES, ModelOutputs
from lightning_ood.data.disjoint import array_digests
from lightning_ood.data.file_digests import bytes_digest, file_digests
from lightning_ood.detectors import KNN, DetectorInputs, LinearProbe, ReAct
from lightning_ood.detectors.base import begin_scoring
from lightning_ood.detectors.defaults import default_detectors
from lightning_ood.distributed import distributed_world
from lightning_ood.methods.heatmap_targets import (
    Described,
    describe,
    feature_range,
    gather_described,
    id_image_reader,
    outlier_targets,
    share_rows,
)

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


def _fit_worker(rank: int, cached_state: dict, folder: str) -> dict[str, dict[str, torch.Tensor]]:
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
    results["heatmap_targets"] = {case: _heatmap_targets(*args) for case, args in HEATMAP_CASES.items()}
    results["digests"] = _digests(folder)
    results["state_digests"] = _fitted_state_digests(shard, shard_labels, head)
    return results


def _heatmap_images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _classifier(images: torch.Tensor) -> ModelOutputs:
    """A frozen 'classifier' in exact integer arithmetic (the same numbers in any batch composition)."""
    weights = torch.tensor([[1.0, 0, 2], [0, 1, 0], [3, 0, 1], [0, 2, 1]])
    features = images.flatten(1).float() @ weights
    return ModelOutputs(
        logits=features @ torch.tensor([[1.0, -1, 0], [0, 1, -1], [-1, 0, 1]]), features=features
    )


# case -> (outliers, ID training images, drop the ID images predicted as class 2)
HEATMAP_CASES = {
    "ties": (40, N, False),
    "one_rank_without_outliers": (2, N, False),  # 2 outliers on 3 ranks
    "orphan_class": (40, N, True),
    "one_rank_without_id_images": (7, 2, False),
}


def _heatmap_sets(m: int, n: int, orphan: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ID training images (rows ``j`` and ``j + 50`` identical: on other ranks, equally near every outlier) and
    ``m`` outliers, the first ten copies of ID rows ``50 ..`` (distance 0 to two ID rows: the lower must win)."""
    id_train = _heatmap_images(N, 1)
    id_train[50:] = id_train[:51].clone()
    if orphan:
        id_train = id_train[_classifier(id_train).logits.argmax(1) != 2]
    id_train = id_train[:n]
    outliers = _heatmap_images(m, 2)
    copies = min(10, m, max(len(id_train) - 50, 0))
    outliers[:copies] = id_train[50 : 50 + copies]
    return id_train, outliers


def _heatmap_targets(m: int, n: int, orphan: bool) -> tuple[torch.Tensor, ...]:
    """HeatmapOOD's ``on_fit_start`` passes on synthetic images, without the output cache: each rank describes
    its share (rows ``r, r + W, ...``) of the ID training images, which it keeps, and of the ``m`` outliers,
    which are gathered; the target search runs on each rank's ID share and merges. Returns the outliers'
    features, target rows, looked-up target images and the feature range."""
    rank, world = distributed_world()
    id_train, outliers = _heatmap_sets(m, n, orphan)

    def batches(images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        share = images[rank::world]
        return [(share[i : i + 7], torch.zeros(0)) for i in range(0, len(share), 7)]

    id_share = describe(batches(id_train), _classifier, None, "test", False)
    aux = gather_described(
        describe(batches(outliers), _classifier, array_digests, "test", False), logits=False
    )
    rows = share_rows(len(id_train), len(id_share.features))
    targets = outlier_targets(id_share, rows, aux, id_image_reader(id_train), chunk_size=9)
    span = torch.tensor(feature_range(id_share))
    return aux.features, targets.rows, targets.lookup(array_digests(outliers)), span


def _brute_force_targets(m: int, n: int, orphan: bool) -> tuple[np.ndarray, int, int]:
    """The targets by brute force (float64 distances, the first of equal ones), how many outliers have more
    than one nearest ID row and how many have a class no ID image is predicted as."""
    id_train, outliers = _heatmap_sets(m, n, orphan)
    ids, outs = _classifier(id_train), _classifier(outliers)
    id_f, id_c = ids.features.double().numpy(), ids.logits.argmax(1).numpy()
    rows, ties, orphans = [], 0, 0
    for f, c in zip(outs.features.double().numpy(), outs.logits.argmax(1).numpy(), strict=True):
        orphans += int(not (id_c == c).any())
        candidates = np.arange(len(id_c)) if not (id_c == c).any() else np.flatnonzero(id_c == c)
        distances = ((id_f[candidates] - f) ** 2).sum(1)
        rows.append(candidates[distances.argmin()])
        ties += int((distances == distances.min()).sum() > 1)
    return np.array(rows), ties, orphans


def _digests(folder: str) -> dict[str, object]:
    """File digests over the ranks, twice (the second from the cache rank 0 wrote), and with a missing file."""
    files = sorted(Path(folder, "files").iterdir())
    hashed: list[int] = []

    def counting(i: int) -> bytes:
        hashed.append(i)
        return bytes_digest(files[i])

    cache = Path(folder, "cache")
    first = file_digests(files, digest=counting, cache_dir=cache)
    second = file_digests(files, digest=counting, cache_dir=cache)
    try:
        file_digests([*files, Path(folder, "missing.bin")], cache_dir=cache, what="aux files")
        error = "no error"
    except OSError as err:
        error = str(err)
    return {"first": first, "second": second, "hashed": list(hashed), "error": error}


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
def test_sharded_fits_on_three_processes_equal_one_process(tmp_path: Path) -> None:
    train, labels, test, head = _data(torch.float32)
    one = KNN(k=4, chunk_size=9)
    _fit(one, train, labels, head)
    (tmp_path / "files").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):  # file 7 holds the bytes of file 2
        content = rng.bytes(3000) if i < 7 else (tmp_path / "files" / "2.bin").read_bytes()
        (tmp_path / "files" / f"{i}.bin").write_bytes(content)
    results = run_ddp(_fit_worker, one.state_dict(), str(tmp_path), world_size=WORLD, timeout=300)
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
    assert all(ddp["state_digests"] == results[0]["state_digests"] for ddp in results[1:])  # rank-independent
    assert {"knn", "mahalanobis", "vim", "react"} <= results[0]["state_digests"].keys()
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
        for case, got in ddp["heatmap_targets"].items():  # the sharded passes and search equal one process
            one = _heatmap_targets(*HEATMAP_CASES[case])
            for name, a, b in zip(("features", "rows", "images", "range"), got, one, strict=True):
                assert torch.equal(a, b), (rank, case, name)
    for (
        case,
        args,
    ) in HEATMAP_CASES.items():  # one process against brute force, with the ties and orphans set up
        rows, ties, orphans = _brute_force_targets(*args)
        np.testing.assert_array_equal(_heatmap_targets(*args)[1].numpy(), rows, err_msg=case)
        assert ties >= {"ties": 10, "one_rank_without_outliers": 2, "orphan_class": 10}.get(case, 0), case
        assert (orphans > 0) == (case in ("orphan_class", "one_rank_without_id_images")), case
        digests = ddp["digests"]
        files = sorted((tmp_path / "files").iterdir())
        reference = np.stack([np.frombuffer(bytes_digest(f), np.uint8) for f in files])
        np.testing.assert_array_equal(digests["first"], reference)
        np.testing.assert_array_equal(digests["second"], reference)
        assert (digests["first"][7] == digests["first"][2]).all()  # the duplicate file
        assert digests["hashed"] == list(
            range(rank, 8, WORLD)
        )  # its share, once: the second call hashed nothing
        # file 8 (missing) is rank 2's: every rank raises, naming it
        assert "cannot hash the aux files (9 files): rank 2: FileNotFoundError" in digests["error"], digests[
            "error"
        ]
    hashed: list[int] = []  # the cache rank 0 wrote serves a 1-process run
    again = file_digests(files, digest=lambda i: hashed.append(i) or b"", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again, reference)
    assert hashed == []


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
