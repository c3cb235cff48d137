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


#: rank -> the slices of ``_data()`` it updates with, per split
SPLITS = {
    "empty_rank": ([slice(0, 40), slice(40, None)], []),  # rank 1 never calls update
    "uneven": ([slice(0, 13)], [slice(13, 30), slice(30, None)]),
}


def _worker(rank: int) -> dict[str, dict[str, float]]:
    scores, is_ood = _data()
    results = {}
    for split, shards in SPLITS.items():
        metric = OODMetrics(set_name=split)
        for shard in shards[rank]:
            metric.update(scores[shard], is_ood[shard])
        results[split] = {key: float(value) for key, value in metric.compute().items()}
    return results


@pytest.mark.slow
def test_two_process_metric_equals_one_process() -> None:
    results = run_ddp(_worker, timeout=60)
    scores, is_ood = _data()
    single = ood_metrics(scores, is_ood)
    assert single["auroc"] == pytest.approx(skm.roc_auc_score(is_ood.numpy(), scores.numpy()), abs=1e-12)
    for rank, result in enumerate(results):  # every rank computes the same, global result
        for split in SPLITS:
            assert tuple(result[split]) == METRIC_KEYS
            for key in METRIC_KEYS:
                assert result[split][key] == pytest.approx(single[key], abs=1e-12), (rank, split, key)
