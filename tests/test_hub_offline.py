"""Pretrained weights with no network fail at once with the fix (no minute of retries, no raw hub error)."""

import huggingface_hub.constants
import pytest

from lightning_ood.nets import hub
from lightning_ood.nets.timm_net import create_timm_model


def test_no_network_and_no_cache_says_what_to_use_instead(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)  # what the probe concludes without a network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(
        OSError, match=r"^no network: .*timm model 'resnet18'.*pretrained: false and weights_path"
    ):
        create_timm_model("resnet18", num_classes=10, in_chans=3, pretrained=True)
    assert before == huggingface_hub.constants.HF_HUB_OFFLINE  # the hub's offline mode was only borrowed


def test_reachability_probe(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens on the discard port
    assert hub.hub_reachable(timeout=0.5) is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert hub.hub_reachable() is False
