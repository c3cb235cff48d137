"""Feature-map detectors on a real timm classifier: the maps come from the test step's one forward pass (timm's
``forward_intermediates``), only when such a detector is configured, and methods without maps refuse them."""

from __future__ import annotations

import pytest
import torch
from toy_method import ToyEncoder  # tests/toy_method.py

from lightning_ood.contract import DetectorInputs
from lightning_ood.detectors import MSP, Gram, MultiLayerMahalanobis, RankFeat
from lightning_ood.methods import Classifier


def _batches(n_batches: int = 2, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 1, 40, 40, generator=gen), torch.arange(size) % 3) for _ in range(n_batches)]


def test_feature_map_detectors_score_from_the_one_forward_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    dets = [Gram(poles=2, holdout_every=4), RankFeat(), MultiLayerMahalanobis(layers=[1, 2]), MSP()]
    model = Classifier(backbone="resnet10t", num_classes=3, in_chans=1, detectors=dets).eval()
    assert "feature_maps" in model.provides and model.wants_feature_maps
    model.fit_detectors(_batches())
    assert all(d.fitted for d in dets)

    timm_model = model.net.model
    calls = {"forward_intermediates": 0, "forward_features": 0}
    for name in calls:
        original = getattr(timm_model, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(timm_model, name, counted)
    images, targets = _batches(1, 8)[0]
    with torch.no_grad():
        out = model.score_batch(images, targets)
    assert calls == {"forward_intermediates": 1, "forward_features": 0}  # one pass for every detector
    assert set(out.scores) == {"gram", "rank_feat", "multi_layer_mahalanobis", "msp"}
    # the scores are those of the detectors on timm's own intermediates of these images
    with torch.no_grad():
        final, maps = timm_model.forward_intermediates(images)
        feats = timm_model.forward_head(final, pre_logits=True)
        batch = DetectorInputs(
            logits=model.head(feats), features=feats, head=model.head, feature_maps=tuple(maps)
        )
        for det in dets:
            torch.testing.assert_close(out.scores[det.name], det(batch).double(), msg=det.name)
            assert torch.isfinite(out.scores[det.name]).all()


def test_maps_are_computed_only_when_a_detector_needs_them() -> None:
    model = Classifier(backbone="resnet10t", num_classes=3, in_chans=1, detectors=[MSP()]).eval()
    assert not model.wants_feature_maps
    with torch.no_grad():
        assert model.forward_outputs(_batches(1, 2)[0][0]).feature_maps is None


def test_a_method_without_feature_maps_refuses_them_by_name() -> None:
    with pytest.raises(ValueError, match=r"'multi_layer_mahalanobis'.*needs \['feature_maps'\]"):
        ToyEncoder(detectors=[MultiLayerMahalanobis()])
