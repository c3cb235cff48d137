"""A 2-process (gloo, CPU) fit of KNN and ReAct equals a 1-process fit on all the data: on an uneven split,
when one rank gets no fit batch at all, and in float64; with no data on any rank both ranks raise."""

from __future__ import annotations

import pytest
import torch
from ddp_helpers import run_ddp  # tests/ddp_helpers.py

from lightning_ood.detectors import KNN, DetectorInputs, ReAct

N, D = 100, 12
SPLITS = {"uneven": 37, "empty_rank": N}  # rows of rank 0; rank 1 gets the rest (none for "empty_rank")


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(N, D, generator=gen, dtype=torch.float64).relu().to(dtype)
    test = torch.randn(15, D, generator=gen, dtype=torch.float64).relu().to(dtype)
    head = torch.nn.Linear(D, 4, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(4, D, generator=gen))
        head.bias.zero_()
    return train, test, head


def _detectors(dtype: torch.dtype) -> dict[str, KNN | ReAct]:
    bank = "float64" if dtype == torch.float64 else "float32"
    return {
        "knn": KNN(k=4, chunk_size=9, bank_dtype=bank),
        "knn_subset": KNN(k=2, bank_dtype=bank, bank_fraction=0.4, seed=3),
        "react": ReAct(percentile=90.0),
        "react_cap_above_n": ReAct(max_samples=1000),
        "react_subsampled": ReAct(max_samples=30),
    }


def _fit_and_score(train: torch.Tensor, test: torch.Tensor, head: torch.nn.Linear) -> dict[str, torch.Tensor]:
    """Fit each detector batch by batch (no update at all when ``train`` is empty), score ``test``."""
    out = {}
    for key, det in _detectors(train.dtype).items():
        det.reset()
        for start in range(0, len(train), 10):
            feats = train[start : start + 10]
            det.update(
                DetectorInputs(logits=torch.empty(0), features=feats, head=head),
                torch.full((len(feats),), -1),
            )
        det.finalize()
        with torch.no_grad():
            out[key] = det(DetectorInputs(logits=head(test), features=test, head=head))
        if isinstance(det, ReAct):
            out[key + "_threshold"] = det.threshold_.clone()
    return out


def _fit_worker(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    results = {}
    for dtype in (torch.float32, torch.float64):
        train, test, head = _data(dtype)
        for split, n_rank0 in SPLITS.items():
            shard = train[:n_rank0] if rank == 0 else train[n_rank0:]
            results[f"{split}/{dtype}"] = _fit_and_score(shard, test, head)
    return results


@pytest.mark.slow
def test_two_process_fit_equals_one_process_fit() -> None:
    results = run_ddp(_fit_worker, timeout=90)
    for dtype in (torch.float32, torch.float64):
        single = _fit_and_score(*_data(dtype))
        assert single["knn"].dtype == single["react"].dtype == dtype  # float64 is not downcast
        for split in SPLITS:
            for rank, ddp in enumerate(results):
                got = ddp[f"{split}/{dtype}"]
                for key in (
                    "knn",
                    "knn_subset",
                    "react",
                    "react_threshold",
                    "react_cap_above_n",
                    "react_cap_above_n_threshold",
                ):
                    msg = f"{split}/{dtype}/rank{rank}/{key}"
                    torch.testing.assert_close(got[key], single[key], rtol=1e-9, atol=1e-9, msg=msg)
                # Subsampling is an estimate that depends on the world size; it ran and kept a value in range.
                assert 0 < float(got["react_subsampled_threshold"]) < float(_data(dtype)[0].max())


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
    for errors in run_ddp(_error_worker, timeout=60):
        for key in _detectors(torch.float32):
            assert "no ID training features on any rank" in errors[f"no_data/{key}"], errors
            assert "feature dimension differs across ranks" in errors[f"dim_mismatch/{key}"], errors


def test_fit_without_data_raises_in_one_process() -> None:
    for det in _detectors(torch.float32).values():
        det.reset()
        with pytest.raises(RuntimeError, match="no ID training features on any rank"):
            det.finalize()
