"""The per-rank fit cache of sharded banks (``detectors/shard_cache.py``), in one process: a share round-trips
with its dataset indices and its built faiss index; another key, other hyperparameters or a damaged file are a
miss. (The 3-process method-level round trip is in ``test_ddp_paths.py``.)"""

from __future__ import annotations

import pytest
import torch

from lightning_ood.detectors import KNN, NNGuide
from lightning_ood.detectors.shard_cache import load_shards, save_shards, shard_cache_path


def _as_share(det):
    """A one-process fit turned into "this rank's share" (what a sharded DDP fit holds)."""
    det.keep_rows(det.bank.clone(), sharded=True)
    return det


@pytest.mark.parametrize("index", ["exact", "faiss_ivf"])
def test_share_round_trips_with_its_index(tmp_path, index):
    if index != "exact":
        pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 8, generator=gen), torch.randn(7, 8, generator=gen)
    det = _as_share(KNN(k=3, index=index, nlist=4, nprobe=2).fit(features=train))
    anchor = tmp_path / "model.ckpt"
    path = save_shards([det], anchor, "key-a")
    assert path == shard_cache_path(anchor, 0, 1) and path.is_file()
    back = KNN(k=3, index=index, nlist=4, nprobe=2)
    assert load_shards([back], anchor, "key-a") == ["knn"]
    assert back.fitted and back.sharded and torch.equal(back.rows, det.rows)
    assert torch.equal(back.bank_index, det.bank_index)
    queries = torch.nn.functional.normalize(test, dim=1)
    torch.testing.assert_close(back.local_topk(queries, 3), det.local_topk(queries, 3), rtol=0, atol=0)
    assert not back.state_dict()["_fitted"]  # a share is never written to the ordinary fit cache as a fit


def test_other_key_settings_or_a_damaged_file_are_a_miss(tmp_path):
    train = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    anchor = tmp_path / "model.ckpt"
    logits = torch.randn(50, 3, generator=torch.Generator().manual_seed(2))
    guide = _as_share(NNGuide(k=5).fit(features=train, logits=logits))
    save_shards([_as_share(KNN(k=2).fit(features=train)), guide], anchor, "key-a")
    assert load_shards([KNN(k=2)], anchor, "key-b") == []  # other weights / data / settings
    assert load_shards([KNN(k=5)], anchor, "key-a") == []  # other hyperparameters
    again = NNGuide(k=5)
    assert load_shards([again], anchor, "key-a") == ["nn_guide"] and int(again.bank_size) == 50
    shard_cache_path(anchor, 0, 1).write_bytes(b"truncated")
    fresh = KNN(k=2)
    assert load_shards([fresh], anchor, "key-a") == [] and not fresh.fitted
    assert load_shards([KNN(k=2)], None, "key-a") == []  # no cache place
