"""ODIN against a manual autograd computation; gradient/mode hygiene and inference-mode support."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_ood.detectors import ODIN, DetectorInputs, ModelOutputs


class TinyNet(nn.Module):
    """A conv + BatchNorm + linear classifier exposing the ``ScoringModel`` interface."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(4, 5)

    def forward_outputs(self, inputs: Tensor) -> ModelOutputs:
        feats = self.body(inputs).flatten(1)
        return ModelOutputs(logits=self.fc(feats), features=feats)

    @property
    def head(self) -> nn.Linear:
        return self.fc


def _reference(net: TinyNet, x: Tensor, t: float, eps: float, std: Tensor) -> Tensor:
    x = x.clone().requires_grad_(True)
    log_s = (net.forward_outputs(x).logits / t).log_softmax(dim=1).amax(dim=1)  # log S_y_hat(x; T)
    (grad,) = torch.autograd.grad(log_s.sum(), x)
    x_pert = x.detach() - eps * torch.sign(-grad) / std
    with torch.no_grad():
        return -(net.forward_outputs(x_pert).logits / t).softmax(dim=1).amax(dim=1)


def _batch(net: TinyNet, x: Tensor) -> DetectorInputs:
    return DetectorInputs(logits=net.forward_outputs(x).logits.detach(), inputs=x, model=net)


@pytest.mark.parametrize(
    ("temperature", "epsilon", "input_std"),
    [(1000.0, 0.0014, 1.0), (1.0, 0.05, 1.0), (10.0, 0.01, (0.5, 0.25, 2.0))],
)
def test_odin_matches_manual_autograd(temperature: float, epsilon: float, input_std: float | tuple) -> None:
    net = TinyNet().eval()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    std = torch.tensor(input_std).view(-1, 1, 1) if isinstance(input_std, tuple) else torch.tensor(input_std)
    expected = _reference(net, x, temperature, epsilon, std)
    det = ODIN(temperature=temperature, epsilon=epsilon, input_std=input_std)
    torch.testing.assert_close(det(_batch(net, x)), expected, rtol=1e-5, atol=1e-7)
    # The perturbation moves towards ID: the max softmax rises (the score falls) for every sample.
    assert (det(_batch(net, x)) <= ODIN(temperature, epsilon=0.0)(_batch(net, x)) + 1e-7).all()


def test_odin_under_inference_mode_leaves_model_untouched() -> None:
    net = TinyNet().eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = _reference(net, x, 1000.0, 0.0014, torch.tensor(1.0))
    marker = torch.full_like(net.fc.weight, 7.0)
    net.fc.weight.grad = marker.clone()  # an existing gradient must survive
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.inference_mode():
        batch = DetectorInputs(logits=net.forward_outputs(x).logits, inputs=x.clone(), model=net)
        scores = ODIN(input_std=1.0)(batch)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)
    assert not net.training
    assert torch.equal(net.fc.weight.grad, marker)
    assert all(p.grad is None for n, p in net.named_parameters() if n != "fc.weight")
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # BN stats too
    net.train()
    ODIN(input_std=1.0)(_batch(net, x))
    assert net.training


def test_odin_contract_and_errors() -> None:
    det = ODIN()
    assert (
        det.requires == frozenset({"logits", "inputs", "model"}) and not det.needs_fit and det.name == "odin"
    )
    assert "epsilon=0.0014" in repr(det) and "temperature=1000.0" in repr(det)
    with pytest.raises(ValueError, match="input_std"):
        ODIN(input_std=(0.5, 0.0))
    with pytest.raises(ValueError, match="needs `inputs`"):
        det(DetectorInputs(logits=torch.zeros(2, 3)))


class _Data:
    std = (0.25, 0.5, 1.0)


def test_odin_takes_the_data_std_unless_set() -> None:
    """Unset, ``input_std`` is the datamodule's normalisation std (the paper's step in pixel units)."""
    det = ODIN()
    with pytest.raises(ValueError, match="input_std is unset"):
        det.perturb(torch.zeros(1, 3, 8, 8), TinyNet().eval())
    det.configure(_Data())
    assert det.input_std == (0.25, 0.5, 1.0)
    fixed = ODIN(input_std=2.0)
    fixed.configure(_Data())
    assert fixed.input_std == 2.0
