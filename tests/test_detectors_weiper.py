"""WeiPer and WeiPer+KLD against a numpy re-derivation of their definitions (the perturbed heads from the stored
directions, per-sample histograms with ``np.histogram``, a clipped-index moving average, scipy's KL divergence).
No pytorch-ood reference exists: pytorch-ood 0.4 has no WeiPer.

Also: the smoothing's alignment against the authors' construction (a ``padding="same"`` replicate-padded uniform
``Conv1d``), seeded reproducibility, state-dict round trips, a streamed fit equal to a whole-tensor fit and to a
fit with the bins fixed up front, shared fits of search candidates, extreme inputs, a single class, errors, and
separation of Gaussian ID classes from a shifted OOD set. The 2-process DDP fit is in
``test_detectors_ddp_new.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy
from sklearn.metrics import roc_auc_score
from test_detectors_pytorch_ood import blobs, fit, inputs  # tests/test_detectors_pytorch_ood.py
from torch import Tensor, nn

from lightning_ood.detectors import MSP, WeiPer, WeiPerKLD
from lightning_ood.detectors.search import build_candidate
from lightning_ood.detectors.shared_fit import share_fit_state
from lightning_ood.detectors.weiper import perturbation_directions, perturbed_heads, smooth

SMALL = {"repeats": 3, "n_bins": 7, "smoothing": 3, "smoothing_perturbed": 2}


def _np_logits(det: WeiPer | WeiPerKLD, feats: Tensor, head: nn.Linear) -> np.ndarray:
    """``[B, r, C]`` perturbed logits from the definition ``w_c + delta ||w_c|| u_kc``, in numpy float64."""
    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    u = det.directions.double().numpy()  # [r, C, D]
    heads = w[None] + det.delta * np.linalg.norm(w, axis=1)[None, :, None] * u
    return np.einsum("bd,kcd->bkc", feats.double().numpy(), heads) + b


def _np_smooth(q: np.ndarray, width: int) -> np.ndarray:
    n = q.shape[1]
    offsets = np.arange(width) - (width - 1) // 2
    index = np.clip(np.arange(n)[:, None] + offsets[None], 0, n - 1)  # [n, width], edges repeated
    return q[:, index].mean(axis=2)


def _np_sym_kl(p: np.ndarray, q: np.ndarray, eps: float) -> np.ndarray:
    return np.array([entropy(p + eps, row + eps) + entropy(row + eps, p + eps) for row in q])


def _np_hist(values: np.ndarray, lo: float, hi: float, n_bins: int) -> np.ndarray:
    """``[B, n_bins]`` share of each row's values per bin (``np.histogram``: the last bin closed)."""
    edges = np.linspace(lo, hi, n_bins + 1)
    return np.stack([np.histogram(row, bins=edges)[0] for row in values]) / values.shape[1]


def test_directions_are_seeded_unit_vectors() -> None:
    u = perturbation_directions(4, 3, 16, seed=5)
    assert u.shape == (4, 3, 16) and u.dtype == torch.float32
    torch.testing.assert_close(u.norm(dim=2), torch.ones(4, 3))
    assert torch.equal(u, perturbation_directions(4, 3, 16, seed=5))
    assert not torch.equal(u, perturbation_directions(4, 3, 16, seed=6))
    w = torch.randn(3, 16, dtype=torch.float64)
    moved = perturbed_heads(w, u, 1.8).view(4, 3, 16) - w  # ||w~_kc - w_c|| = delta ||w_c||
    torch.testing.assert_close(moved.norm(dim=2), 1.8 * w.norm(dim=1).expand(4, 3))


def test_weiper_matches_numpy_and_is_msp_without_perturbation() -> None:
    _, _, test, head = blobs(30, scale=0.3)
    det = WeiPer(repeats=5, delta=1.8, seed=3)
    scores = det(inputs(test, head))
    expected = -softmax(_np_logits(det, test, head), axis=2).max(axis=2).mean(axis=1)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)
    # delta = 0 is the head's MSP
    torch.testing.assert_close(
        WeiPer(repeats=2, delta=0.0)(inputs(test, head)), MSP()(inputs(test, head)).double()
    )


def test_weiper_kld_matches_numpy_brute_force() -> None:
    train, y, test, head = blobs(31, scale=0.3)
    det = fit(WeiPerKLD(**SMALL, lambda_1=0.7, lambda_2=0.4, seed=2), train, y, head)
    h_train, z_train = train.double().numpy(), _np_logits(det, train, head).reshape(len(train), -1)
    f_range, p_range = (h_train.min(), h_train.max()), (z_train.min(), z_train.max())
    np.testing.assert_array_equal(det.feature_range_.numpy(), f_range)
    np.testing.assert_allclose(det.projection_range_.numpy(), p_range, rtol=1e-14)  # einsum vs matmul
    p_h = _np_hist(h_train, *f_range, 7).mean(0)
    p_z = _np_hist(z_train, *p_range, 7).mean(0)
    np.testing.assert_allclose(det.feature_density.numpy(), p_h, rtol=1e-12)
    np.testing.assert_allclose(det.projection_density.numpy(), p_z, rtol=1e-12)

    logits = _np_logits(det, test, head)
    q_h = _np_smooth(_np_hist(test.double().numpy(), *f_range, 7), 3)
    q_z = _np_smooth(_np_hist(logits.reshape(len(test), -1), *p_range, 7), 2)
    msp = softmax(logits, axis=2).max(axis=2).mean(axis=1)
    expected = _np_sym_kl(p_h, q_h, 0.01) + 0.7 * _np_sym_kl(p_z, q_z, 0.025) - 0.4 * msp
    np.testing.assert_allclose(det(inputs(test, head)).numpy(), expected, rtol=1e-9)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 15])
def test_smoothing_is_the_authors_same_padded_uniform_kernel(width: int) -> None:
    q = torch.rand(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    conv = nn.Conv1d(1, 1, width, padding="same", padding_mode="replicate", bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0 / width)
        torch.testing.assert_close(smooth(q, width), conv(q[:, None])[:, 0])
    np.testing.assert_allclose(smooth(q, width).numpy(), _np_smooth(q.numpy(), width), rtol=1e-12)


def test_seeded_reproducible_and_state_dict_round_trip() -> None:
    train, y, test, head = blobs(32)
    batch = inputs(test, head)
    a, b = (fit(WeiPerKLD(**SMALL, seed=1), train, y, head) for _ in range(2))
    assert torch.equal(a(batch), b(batch))
    other = fit(WeiPerKLD(**SMALL, seed=2), train, y, head)
    assert not torch.equal(a(batch), other(batch)) and a.fingerprint() != other.fingerprint()
    loaded = WeiPerKLD(**SMALL, seed=1)
    loaded.load_state_dict(a.state_dict())  # fitted buffers adopt their saved shapes
    assert loaded.fitted and torch.equal(loaded(batch), a(batch))
    assert loaded.directions.shape == (3, 4, 12)
    plain = WeiPer(repeats=4, seed=9)
    first = plain(batch)
    again = WeiPer(repeats=4, seed=9)
    again.load_state_dict(plain.state_dict())  # no state: the seed draws the same directions again
    assert torch.equal(again(batch), first) and torch.equal(again.directions, plain.directions)
    # not a buffer: a rank that scores nothing would hold another shape than rank 0 at Lightning's broadcast
    assert "directions" not in dict(plain.named_buffers())


def test_streamed_whole_and_fixed_range_fits_agree() -> None:
    train, y, test, head = blobs(33)
    streamed = fit(WeiPerKLD(**SMALL), train, y, head)  # batches of 128
    whole = WeiPerKLD(**SMALL).fit(features=train, targets=y, head=head)
    fixed = WeiPerKLD(
        **SMALL,
        feature_range=tuple(streamed.feature_range_.tolist()),
        projection_range=tuple(streamed.projection_range_.tolist()),
    )
    fixed.fit(features=train, targets=y, head=head, batch_size=37)  # the streaming fit: nothing kept
    batch = inputs(test, head)
    for det in (whole, fixed):
        torch.testing.assert_close(det.feature_density, streamed.feature_density, rtol=1e-12, atol=0)
        torch.testing.assert_close(det.projection_density, streamed.projection_density, rtol=1e-12, atol=0)
        torch.testing.assert_close(det(batch), streamed(batch), rtol=1e-12, atol=1e-12)


def test_search_candidates_share_one_fit() -> None:
    train, y, test, head = blobs(34)
    base = WeiPerKLD(**SMALL)
    values = [{"lambda_1": 0.1}, {"lambda_2": 1.0, "smoothing": 1}, {"epsilon": 0.1}]
    candidates = [build_candidate(base, v) for v in values]
    leaders = share_fit_state(candidates)
    assert leaders == candidates[:1]
    fit(leaders[0], train, y, head)
    for cand, v in zip(candidates, values, strict=True):
        alone = fit(build_candidate(base, v), train, y, head)
        assert cand.fitted and torch.equal(cand(inputs(test, head)), alone(inputs(test, head)))
    assert candidates[1].directions is candidates[0].directions  # one copy for the group
    assert WeiPerKLD(**{**SMALL, "delta": 2.0}).fit_state_key() != base.fit_state_key()


def test_extreme_inputs_a_single_class_and_values_outside_the_range() -> None:
    train, y, test, head = blobs(35)
    det = fit(WeiPerKLD(**SMALL), train, y, head)
    extreme = torch.cat([test[:3] * 1e4, torch.zeros(1, 12), -test[3:5] * 1e4])
    for scorer in (det, WeiPer(repeats=3)):
        assert torch.isfinite(scorer(inputs(extreme, head))).all(), scorer.name
    # every value above both ranges: no bin is hit, so q' is uniform
    beyond = torch.full((2, 12), 1e6)
    uniform = np.full((2, 7), 0.0)
    kl_h = _np_sym_kl(det.feature_density.numpy(), uniform, 0.01)
    kl_z = _np_sym_kl(det.projection_density.numpy(), uniform, 0.025)
    msp = softmax(_np_logits(det, beyond, head), axis=2).max(axis=2).mean(axis=1)
    np.testing.assert_allclose(det(inputs(beyond, head)).numpy(), kl_h + 2.5 * kl_z - 0.1 * msp, rtol=1e-9)
    one = nn.Linear(12, 1)
    assert WeiPer(repeats=3)(inputs(test, one)).eq(-1).all()
    single = fit(WeiPerKLD(**SMALL), train, torch.zeros_like(y), one)
    assert torch.isfinite(single(inputs(extreme, one))).all()


def test_opt_in_and_configurable() -> None:
    from jsonargparse import ArgumentParser

    from lightning_ood.detectors.defaults import default_detectors

    assert not {"weiper", "weiper_kld"} & {d.name for d in default_detectors(frozenset({"features", "head"}))}
    parser = ArgumentParser()
    parser.add_argument("--det", type=WeiPerKLD)
    cfg = parser.parse_args(
        [
            "--det",
            '{"class_path": "lightning_ood.detectors.WeiPerKLD", "init_args": '
            '{"feature_range": [0, 5], "projection_range": [-9, 9], "lambda_1": 1}}',
        ]
    )
    det = parser.instantiate(cfg).det
    assert det.feature_range == (0.0, 5.0) and det.projection_range == (-9.0, 9.0) and det.lambda_1 == 1


def test_bad_settings_and_misuse_raise_clearly() -> None:
    for make, match in (
        (lambda: WeiPer(repeats=0), "repeats"),
        (lambda: WeiPer(delta=-1.0), "delta"),
        (lambda: WeiPerKLD(n_bins=0), "n_bins"),
        (lambda: WeiPerKLD(epsilon=0.0), "epsilon"),
        (lambda: WeiPerKLD(lambda_1=-1.0), "lambda_1"),
        (lambda: WeiPerKLD(feature_range=(1.0, 1.0)), "feature_range"),
    ):
        with pytest.raises(ValueError, match=match):
            make()
    train, y, test, head = blobs(36)
    det = fit(WeiPerKLD(**SMALL), train, y, head)
    with pytest.raises(ValueError, match=r"fitted with a head of \(4, 12\)"):
        det(inputs(test[:, :10], nn.Linear(10, 4)))
    with pytest.raises(RuntimeError, match="no ID training features"):
        empty = WeiPerKLD(**SMALL)
        empty.reset()
        empty.finalize()


def _gaussians(seed: int) -> tuple[Tensor, Tensor, Tensor, nn.Linear]:
    """ID: 5 Gaussian classes in 32-d (post-ReLU), the head their means; OOD: the same noise around half the
    classes' centroid (shifted towards the origin, away from every class)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(5, 32, generator=gen).abs() * 2
    y = torch.randint(0, 5, (1000,), generator=gen)
    train = (means[y] + torch.randn(1000, 32, generator=gen)).relu()
    ident = (means[torch.randint(0, 5, (200,), generator=gen)] + torch.randn(200, 32, generator=gen)).relu()
    ood = (0.5 * means.mean(0) + torch.randn(200, 32, generator=gen)).relu()
    head = nn.Linear(32, 5)
    with torch.no_grad():
        head.weight.copy_(means * 0.3)
        head.bias.copy_(-0.15 * means.square().sum(1))
    return train, y, torch.cat([ident, ood]), head


def test_both_separate_gaussian_id_from_shifted_ood() -> None:
    train, y, test, head = _gaussians(37)
    labels = np.r_[np.zeros(200), np.ones(200)]
    for det in (WeiPer(), fit(WeiPerKLD(), train, y, head)):
        auroc = roc_auc_score(labels, det(inputs(test, head)).numpy())
        assert auroc > 0.95, (det.name, auroc)  # 0.99 and 1.00 here
