"""Detectors share per-batch products (float64 features, centred and whitened features, log-softmax) and the
scores equal the unshared path's; a product is shared only between detectors whose fitted tensors are equal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ood.contract import DetectorInputs, unshared
from lightning_ood.detectors import RMD, ClassMeanEuclidean, Mahalanobis
from lightning_ood.detectors.defaults import default_detectors


def _data(seed: int, n: int = 400, d: int = 24, c: int = 5):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, c, (n,), generator=gen)
    means = torch.randn(c, d, generator=gen) * 3
    feats = (means[targets] + torch.randn(n, d, generator=gen)).relu()
    head = nn.Linear(d, c)
    with torch.no_grad():
        head.weight.copy_(torch.randn(c, d, generator=gen))
        head.bias.copy_(torch.randn(c, generator=gen))
    return feats, targets, head


def _fit(det, feats, targets, head):
    with torch.no_grad():
        return det.fit(logits=head(feats), features=feats, targets=targets, head=head, batch_size=64)


def _batch(head, seed: int = 9) -> DetectorInputs:
    feats = _data(seed, n=50)[0].to(head.weight.dtype)
    with torch.no_grad():
        return DetectorInputs(logits=head(feats), features=feats, head=head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float32 / float64 products
def test_every_default_detector_scores_as_on_the_unshared_path(dtype: torch.dtype):
    feats, targets, head = _data(0)
    feats, head = feats.to(dtype), head.to(dtype)
    dets = [
        _fit(d, feats, targets, head) for d in default_detectors(frozenset({"logits", "features", "head"}))
    ]
    batch = _batch(head)
    with torch.no_grad():
        shared = {d.name: d(batch) for d in dets}
        with unshared():
            alone = {d.name: d(_batch(head)) for d in dets}
    assert (
        shared.keys() == alone.keys()
        and {"mahalanobis", "rmd", "class_mean_euclidean", "vim"} <= shared.keys()
    )
    for name in shared:
        torch.testing.assert_close(shared[name], alone[name], atol=1e-9, rtol=0, msg=name)
    kinds = [key[0] for key in batch._memo]
    # one float64 copy, one centring and one whitening for Mahalanobis, RMD, class means and ViM together
    assert kinds.count("features64") == kinds.count("centered") == kinds.count("whitened") == 1
    assert kinds.count("log_softmax_and_complement") == 1  # Entropy and GEN
    assert not _batch(head)._memo  # a new batch starts empty


def test_detectors_with_different_fitted_tensors_do_not_share():
    feats, targets, head = _data(0)
    other = _data(1)
    maha, rmd, loose = Mahalanobis(), RMD(), Mahalanobis(ridge=1e-2, name="loose")
    for det in (maha, rmd, loose, ClassMeanEuclidean()):
        _fit(det, feats, targets, head)
    # reload Mahalanobis with statistics of other data: its cached content keys must not survive the load
    maha(_batch(head))
    maha.load_state_dict(_fit(Mahalanobis(), *other).state_dict())
    batch = _batch(head)
    with torch.no_grad():
        got = {d.name: d(batch) for d in (maha, rmd, loose)}
        with unshared():
            ref = {d.name: d(_batch(head)) for d in (maha, rmd, loose)}
    for name in got:
        torch.testing.assert_close(got[name], ref[name], atol=1e-9, rtol=0, msg=name)
    assert [key[0] for key in batch._memo].count("whitened") == 3  # three different whiteners
