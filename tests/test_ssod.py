"""SSOD's maths against independent references: masks, loss, label direction, empty masks, scores, map size."""

import math

import numpy as np
import pytest
import timm
import torch

from lightning_ood.contract import ModelOutputs
from lightning_ood.detectors import MSP
from lightning_ood.methods import SSOD
from lightning_ood.nets import create_timm_model
from lightning_ood.nets.ssod import ID_INDEX, OOD_INDEX, SSODForward, location_masks, ssod_loss

torch.set_num_threads(1)

#: A narrow stride-4 ResNet: a 4x4 map on 16 px, built in milliseconds.
TINY = {
    "backbone": "resnet10t_os4",
    "in_chans": 1,
    "img_size": 16,
    "backbone_kwargs": {"channels": [8, 8, 16, 16]},
}


def _softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _forward(loc: torch.Tensor, loc_ood: torch.Tensor, logits: torch.Tensor | None = None) -> SSODForward:
    b, _, _, k = loc.shape
    logits = logits if logits is not None else torch.zeros(b, k)
    return SSODForward(logits, torch.zeros(b, 4), torch.zeros(b, 2), loc, loc_ood)


# -- the stride-4 ResNets --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "stock", "size", "side"),
    [("resnet10t_os4", "resnet10t", 28, 7), ("resnet18_os4", "resnet18", 32, 8)],
)
def test_small_resnets_keep_the_stock_weights_and_give_big_maps(name, stock, size, side):
    model = create_timm_model(name, num_classes=10, in_chans=1).eval()
    reference = timm.create_model(stock, num_classes=10, in_chans=1)
    assert model.state_dict().keys() == reference.state_dict().keys()  # stock weights load unchanged
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 1, size, size)).shape[-2:] == (side, side)
        assert reference.eval().forward_features(torch.zeros(1, 1, size, size)).shape[-2:] == (1, 1)
    with pytest.raises(ValueError, match="fixed total stride"):
        create_timm_model(name, num_classes=10, in_chans=1, output_stride=16)


def test_half_width_resnet_gives_a_7x7_map_of_256_channels_and_refuses_pretrained_weights():
    model = create_timm_model("resnet10t_os4_half", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        assert model.forward_features(torch.zeros(2, 1, 28, 28)).shape == (2, 256, 7, 7)
    assert model.num_features == 256
    assert sum(p.numel() for p in model.parameters()) < 1.5e6
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_timm_model("resnet10t_os4_half", num_classes=10, in_chans=1, pretrained=True)


# -- masks and loss --------------------------------------------------------------------------------------------
def test_masks_match_a_brute_force_reference():
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(3, 4, 5, 6, generator=gen) * 4
    labels = torch.tensor([0, 5, 2])
    gamma = 0.9
    id_mask, ood_mask = location_masks(loc, labels, gamma)
    for b in range(3):
        for h in range(4):
            for w in range(5):
                p = _softmax(loc[b, h, w].tolist())[int(labels[b])]
                assert min(abs(p - gamma), abs(p - (1 - gamma))) > 1e-5  # no knife-edge cases
                assert bool(id_mask[b, h, w]) == (p >= gamma) and bool(ood_mask[b, h, w]) == (p <= 1 - gamma)
    assert id_mask.any() and ood_mask.any() and (~id_mask & ~ood_mask).any()
    assert not (id_mask & ood_mask).any()


def _hand_case() -> tuple[SSODForward, torch.Tensor, list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """2 images, 3 classes, a 2x2 map; ID / OOD / ignored locations chosen by construction (gamma 0.95)."""
    loc = torch.zeros(2, 2, 2, 3)
    loc[0, 0, 0] = torch.tensor([5.0, 0, 0])  # y = 0, p = 0.987: ID
    loc[0, 0, 1] = torch.tensor([0.0, 5, 0])  # p = 0.0066: OOD
    loc[0, 1, 1] = torch.tensor([2.0, 0, 0])  # p = 0.79: ignored; loc[0, 1, 0] uniform: ignored
    loc[1] = torch.tensor([4.0, 0, 0])  # y = 2, p = 0.018: OOD ...
    loc[1, 0, 0] = torch.tensor([0.0, 0, 6])  # ... but this one ID
    loc_ood = torch.tensor([[0.3, -1.2], [2.0, 0.5], [0.1, 0.1], [-0.7, 1.9]]).repeat(2, 1).view(2, 2, 2, 2)
    logits = torch.tensor([[1.0, 0.5, -0.5], [0.2, 0.1, 1.5]])
    id_locs = [(0, 0, 0), (1, 0, 0)]
    ood_locs = [(0, 0, 1), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    return _forward(loc, loc_ood, logits), torch.tensor([0, 2]), id_locs, ood_locs


@pytest.mark.parametrize("alpha", [1.0, 0.1])
def test_loss_matches_a_hand_computation(alpha):
    out, targets, id_locs, ood_locs = _hand_case()
    ce = -sum(math.log(_softmax(out.logits[b].tolist())[int(targets[b])]) for b in range(2)) / 2

    def nll(locs: list, index: int) -> float:
        return -sum(math.log(_softmax(out.location_ood_logits[loc].tolist())[index]) for loc in locs) / len(
            locs
        )

    ood = 0.5 * (nll(id_locs, 1) + nll(ood_locs, 0))  # ID locations are the positive class 1
    terms = ssod_loss(out, targets, gamma=0.95, alpha=alpha)
    assert (int(terms.n_id), int(terms.n_ood)) == (2, 4)
    assert terms.ce.item() == pytest.approx(ce, rel=1e-6)
    assert terms.ood.item() == pytest.approx(ood, rel=1e-6)
    assert terms.loss.item() == pytest.approx(ce + alpha * ood, rel=1e-6)


def test_id_locations_are_the_positive_id_class():
    assert (ID_INDEX, OOD_INDEX) == (1, 0)
    out, targets, id_locs, ood_locs = _hand_case()
    loc_ood = out.location_ood_logits.clone().requires_grad_(True)
    ssod_loss(out._replace(location_ood_logits=loc_ood), targets).loss.backward()
    with torch.no_grad():
        before = loc_ood.softmax(-1)[..., ID_INDEX]
        after = (loc_ood - 1.0 * loc_ood.grad).softmax(-1)[..., ID_INDEX]
    assert all(after[loc] > before[loc] for loc in id_locs)  # gradient descent raises P_ID at ID locations
    assert all(after[loc] < before[loc] for loc in ood_locs)  # ... and lowers it at OOD locations
    ignored = (0, 1, 0)
    assert after[ignored] == before[ignored]


@pytest.mark.parametrize("unpaired", ["skip_batch", "skip_term"])
@pytest.mark.parametrize("case", ["all_ignored", "only_id", "only_ood"])
def test_empty_location_sets_never_give_nan(case, unpaired):
    model = SSOD(**TINY, num_classes=4, ood_head="mlp", ood_hidden=8, detectors=[MSP()])
    images, targets = torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 3])
    out = model.net(images, locations=True)
    k = out.location_logits.shape[-1]
    picks = torch.nn.functional.one_hot(targets, k).float().view(3, 1, 1, k)
    fake = {"all_ignored": out.location_logits * 0, "only_id": picks * 20.0, "only_ood": (1 - picks) * 20.0}
    # the location logits keep their graph (through the backbone) but their values decide the masks
    loc = out.location_logits - out.location_logits.detach() + fake[case]
    terms = ssod_loss(out._replace(location_logits=loc), targets, unpaired=unpaired)
    n = 3 * 16
    assert (int(terms.n_id), int(terms.n_ood)) == {
        "all_ignored": (0, 0),
        "only_id": (n, 0),
        "only_ood": (0, n),
    }[case]
    log_p = out.location_ood_logits.float().log_softmax(-1)
    expected = {
        "all_ignored": 0.0,
        "only_id": 0.5 * -log_p[..., ID_INDEX].mean().item(),
        "only_ood": 0.5 * -log_p[..., OOD_INDEX].mean().item(),
    }[case]
    if unpaired == "skip_batch":  # one kind only: no OOD term at all
        expected = 0.0
    assert terms.ood.item() == pytest.approx(expected, rel=1e-5, abs=1e-12)
    terms.loss.backward()
    assert torch.isfinite(terms.loss)
    for name, param in model.net.named_parameters():
        assert param.grad is not None, name  # every parameter is in the graph (DDP needs it)
        assert torch.isfinite(param.grad).all(), name


# -- scores ----------------------------------------------------------------------------------------------------
def test_scores_are_one_minus_msp_times_p_id_by_hand():
    model = SSOD(**TINY, num_classes=3, detectors=[MSP()])
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [30.0, 0.0, 0.0]])
    ood = torch.tensor([[0.5, 1.5], [2.0, -1.0], [-20.0, 20.0]])
    scores = model.native_scores(ModelOutputs(logits, torch.zeros(3, 8), {"ood_logits": ood}), torch.zeros(3))
    msp = [math.exp(2) / (math.exp(1) + math.exp(2) + 1), 1 / 3]
    p_id = [math.exp(1.5) / (math.exp(0.5) + math.exp(1.5)), math.exp(-1) / (math.exp(2) + math.exp(-1))]
    for i in range(2):
        assert scores["ssod"][i].item() == pytest.approx(1 - msp[i] * p_id[i], rel=1e-12)
        assert scores["ood_head"][i].item() == pytest.approx(1 - p_id[i], rel=1e-12)
    # a very confident ID image keeps a tiny positive score instead of rounding to 0 (no ties at the top)
    exact = 1 - (1 / (1 + 2 * math.exp(-30))) * (1 / (1 + math.exp(-40)))
    assert scores["ssod"][2].item() == pytest.approx(exact, rel=1e-9) and scores["ssod"][2] > 0
    assert all(s.dtype == torch.float64 for s in scores.values())


def test_the_same_classifier_reads_the_pooled_feature_and_every_location():
    model = SSOD(**TINY, num_classes=5, detectors=[MSP()]).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = model.net(x, locations=True)
        fmap = model.net.feature_map(x)
        outputs = model.forward_outputs(x)
    head = model.head
    torch.testing.assert_close(out.location_logits, fmap.permute(0, 2, 3, 1) @ head.weight.T + head.bias)
    torch.testing.assert_close(out.location_logits.mean(dim=(1, 2)), out.logits)  # linear, average pooling
    torch.testing.assert_close(outputs.logits, out.logits)
    torch.testing.assert_close(outputs.extras["ood_logits"], model.net.ood_head(out.features))
    assert {"msp", "mahalanobis", "vim", "knn", "energy"} <= set(SSOD(**TINY).detectors)  # library detectors
    assert SSOD(**TINY).score_names[-2:] == ["ssod", "ood_head"]


# -- configuration errors --------------------------------------------------------------------------------------
def test_a_map_smaller_than_2x2_is_rejected_with_a_way_out():
    with pytest.raises(
        ValueError, match=r"'resnet10t' leaves a 1x1 map on 28 px.*resnet10t_os4.*output_stride"
    ):
        SSOD(backbone="resnet10t", in_chans=1, img_size=28)
    assert SSOD(
        backbone="resnet10t", in_chans=1, img_size=28, backbone_kwargs={"output_stride": 8}
    ).map_size == (4, 4)
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        SSOD(
            backbone="vit_tiny_patch16_224",
            in_chans=1,
            img_size=32,
            backbone_kwargs={"img_size": 32, "depth": 1},
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": 0.5}, "gamma"),
        ({"gamma": 1.0}, "gamma"),
        ({"alpha": -1.0}, "alpha"),
        ({"ood_head": "big"}, "ood_head"),
        ({"unpaired": "keep"}, "unpaired"),
    ],
)
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SSOD(**{**TINY, **kwargs})


def test_location_maps_use_the_prediction_for_unlabelled_images():
    model = SSOD(**TINY, num_classes=3, detectors=[MSP()]).eval()
    x = torch.randn(2, 1, 16, 16)
    preds = model.forward_outputs(x).logits.argmax(1)
    id_mask, ood_mask, p_id = model.location_maps(x, torch.tensor([-1, -1]))
    ref_id, ref_ood, _ = model.location_maps(x, preds)
    assert torch.equal(id_mask, ref_id) and torch.equal(ood_mask, ref_ood)
    assert p_id.shape == (2, 4, 4) and ((p_id >= 0) & (p_id <= 1)).all()
    np.testing.assert_array_equal(id_mask.shape, (2, 4, 4))
