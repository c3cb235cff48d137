"""``OODMetrics`` in a real 2-process gloo group equals the 1-process ``ood_metrics``, also when a rank is empty."""

from __future__ import annotations

import pytest
import torch
from ddp_helpers import run_ddp  # tests/ddp_helpers.py
from sklearn import metrics as skm

from lightning_ood.metrics import METRIC_KEYS, OODMetrics, ood_metrics


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """``[60]`` float64 scores with ties and ``[60]`` 0/1 labels (25 OOD)."""
    gen = torch.Generator().manual_seed(0)
    is_ood = torch.cat([torch.zeros(35), torch.ones(25)])[torch.randperm(60, generator=gen)]
    scores = (torch.randn(60, generator=gen, dtype=torch.float64) + 0.8 * is_ood).round(decimals=1)
    return scores, is_ood


def _worker(rank: int, split: str) -> dict[str, float]:
    scores, is_ood = _data()
    if split == "empty_rank":  # rank 0 sees everything (two batches), rank 1 never calls update
        shards = [slice(0, 40), slice(40, None)] if rank == 0 else []
    else:  # uneven: rank 0 gets 13 samples, rank 1 the other 47
        shards = [slice(0, 13)] if rank == 0 else [slice(13, 30), slice(30, None)]
    metric = OODMetrics(set_name=split)
    for shard in shards:
        metric.update(scores[shard], is_ood[shard])
    return {key: float(value) for key, value in metric.compute().items()}


@pytest.mark.slow
@pytest.mark.parametrize("split", ["empty_rank", "uneven"])
def test_two_process_metric_equals_one_process(split: str) -> None:
    results = run_ddp(_worker, split, timeout=60)
    scores, is_ood = _data()
    single = ood_metrics(scores, is_ood)
    assert single["auroc"] == pytest.approx(skm.roc_auc_score(is_ood.numpy(), scores.numpy()), abs=1e-12)
    for rank, got in enumerate(results):  # every rank computes the same, global result
        assert tuple(got) == METRIC_KEYS
        for key in METRIC_KEYS:
            assert got[key] == pytest.approx(single[key], abs=1e-12), (rank, key)
