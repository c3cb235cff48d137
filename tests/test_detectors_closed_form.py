"""The issue-22 detectors against closed forms and brute force (numpy / scipy), at extreme inputs (logits of
+-1e4, ties, a single class), streamed against whole-tensor fits, and the default set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.special import logsumexp, softmax
from test_detectors_pytorch_ood import blobs, fit, inputs  # tests/test_detectors_pytorch_ood.py
from torch import nn

from lightning_ood.detectors import (
    DICE,
    FDBD,
    GMM,
    NCI,
    SCALE,
    SHE,
    VRA,
    DetectorInputs,
    GradNorm,
    KLMatching,
    NNGuide,
    OpenMax,
    Residual,
    TemperatureScaledMSP,
    WeightedEnergy,
)
from lightning_ood.detectors.defaults import default_detectors
from lightning_ood.detectors.openmax import weibull_fit
from lightning_ood.detectors.search import build_candidate, expand_grid


def _np_energy(feats: np.ndarray, head: nn.Linear) -> np.ndarray:
    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    return -logsumexp(feats @ w.T + b, axis=1)


def test_vra_matches_numpy() -> None:
    train, y, test, head = blobs(10)
    det = fit(VRA(lower=55.0, upper=92.0, gamma=0.3), train, y, head)
    lo, hi = np.percentile(train.double().numpy(), [55.0, 92.0])  # over all N * D activations
    h = test.double().numpy()
    shaped = np.where(h < lo, 0.0, np.where(h > hi, hi, h + 0.3))
    np.testing.assert_allclose(
        det(inputs(test, head)).numpy(), _np_energy(shaped, head), rtol=1e-5, atol=1e-4
    )


def test_scale_matches_numpy_and_keeps_zero_rows_finite() -> None:
    _, _, test, head = blobs(11)
    test[0] = 0.0
    h = test.double().numpy()
    k = h.shape[1] - round(h.shape[1] * 0.85)
    s1, s2 = h.sum(1), np.sort(h, axis=1)[:, -k:].sum(1)
    ratio = np.divide(s1, s2, out=np.zeros_like(s1), where=s2 != 0)
    expected = _np_energy(h * np.exp(ratio)[:, None], head)
    np.testing.assert_allclose(SCALE()(inputs(test, head)).numpy(), expected, rtol=1e-5, atol=1e-4)


def test_residual_matches_numpy() -> None:
    train, y, test, head = blobs(12, n=400)
    z, w, b = (
        train.double().numpy(),
        head.weight.detach().double().numpy(),
        head.bias.detach().double().numpy(),
    )
    u = -np.linalg.pinv(w) @ b
    evals, evecs = np.linalg.eigh((z - u).T @ (z - u) / len(z))
    basis = evecs[:, np.argsort(evals)[::-1][5:]]
    expected = np.linalg.norm((test.double().numpy() - u) @ basis, axis=1)
    np.testing.assert_allclose(
        fit(Residual(dim=5), train, y, head)(inputs(test, head)).numpy(), expected, rtol=1e-6
    )


def test_weibull_fit_is_the_maximum_likelihood_estimate() -> None:
    from scipy.stats import weibull_min

    tails = torch.tensor(
        [[3.0, 3.5, 4.2, 5.0, 6.1], [10000.0, 10000.4, 10001.1, 10002.0, 10002.2]], dtype=torch.float64
    )
    shape, scale = weibull_fit(tails)
    for row, k, lam in zip(tails.numpy(), shape.tolist(), scale.tolist(), strict=True):
        c, _, s = weibull_min.fit(row, floc=0)
        assert k == pytest.approx(c, rel=1e-4) and lam == pytest.approx(
            s, rel=1e-4
        )  # scipy: a numerical optimum
        nll = lambda kk, ll, x=row: -weibull_min.logpdf(x, kk, scale=ll).sum()  # noqa: E731
        assert nll(k, lam) <= nll(c, s) + 1e-9  # ours is the exact maximum


def _logit_batch(logits: torch.Tensor) -> DetectorInputs:
    c = logits.shape[1]
    feats = torch.ones(logits.shape[0], 3)
    return DetectorInputs(logits=logits, features=feats, head=nn.Linear(3, c))


EXTREME = torch.tensor(
    [[1e4, -1e4, 0.0, 0.0], [-1e4, 1e4, -1e4, 1e4], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0]]
)


def test_logit_fits_at_extreme_logits_ties_and_one_class() -> None:
    fit_logits = torch.tensor(
        [[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 1.0, 5.0]]
    )
    targets = torch.tensor([0, 1, 3, 3])  # one mislabelled: the NLL has an interior minimum
    z = EXTREME.double().numpy()
    p = softmax(z, axis=1)
    # KL matching: templates are the mean softmax per predicted class
    kl = KLMatching()
    kl.reset()
    kl.update(_logit_batch(fit_logits), targets)
    kl.finalize()
    d = softmax(fit_logits.double().numpy(), axis=1)
    log_d = np.log(np.maximum(d, np.finfo(np.float64).tiny))
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1, keepdims=True)
    np.testing.assert_allclose(
        kl(_logit_batch(EXTREME)).numpy(), (plogp - p @ log_d.T).min(1), rtol=1e-9, atol=1e-12
    )
    # temperature-scaled MSP with a fixed T, and a fitted T that is a grid point
    ts = TemperatureScaledMSP(temperature=2.0)
    np.testing.assert_allclose(
        ts(_logit_batch(EXTREME)).numpy(), -softmax(z / 2.0, axis=1).max(1), rtol=1e-12
    )
    assert float(ts(_logit_batch(EXTREME))[2]) == pytest.approx(-0.25)  # ties: -1/C
    fitted = TemperatureScaledMSP(grid_size=50)
    fitted.reset()
    fitted.update(_logit_batch(fit_logits), targets)
    fitted.finalize()
    grid = np.logspace(np.log10(0.05), np.log10(20.0), 50)
    zf, t = fit_logits.double().numpy(), targets.numpy()
    nll = [(logsumexp(zf / g, axis=1) - zf[np.arange(4), t] / g).sum() for g in grid]
    assert float(fitted.temperature_) == pytest.approx(grid[int(np.argmin(nll))], rel=1e-12)
    # weighted energy: -logsumexp(z + log w), zero weights drop their class
    w = np.array([0.5, 0.0, 2.0, 1.0])
    expected = -logsumexp(z + np.log(np.where(w > 0, w, 1.0)), axis=1, b=(w > 0)[None].repeat(4, 0))
    np.testing.assert_allclose(
        WeightedEnergy(weights=w.tolist())(_logit_batch(EXTREME)).numpy(), expected, rtol=1e-12
    )
    # GradNorm: ||softmax(z) - 1/C||_1 * ||h||_1 (h = ones(3)); 0 for tied logits
    expected = -np.abs(p - 0.25).sum(1) * 3.0
    np.testing.assert_allclose(GradNorm()(_logit_batch(EXTREME)).numpy(), expected, rtol=1e-6, atol=1e-6)
    for det in (kl, ts, fitted, WeightedEnergy(weights=w.tolist()), GradNorm()):
        assert torch.isfinite(det(_logit_batch(EXTREME))).all(), det.name
    # a single class: every logit detector is constant and finite
    one = torch.tensor([[1e4], [-1e4], [3.0]])
    assert GradNorm()(_logit_batch(one)).abs().max() == 0
    assert TemperatureScaledMSP(temperature=1.0)(_logit_batch(one)).eq(-1).all()
    torch.testing.assert_close(
        WeightedEnergy(weights=[2.0])(_logit_batch(one)).double(), -one[:, 0].double() - np.log(2)
    )


def test_head_detectors_at_extreme_inputs() -> None:
    train, y, test, head = blobs(13)
    extreme = torch.cat([test[:2] * 1e4, torch.zeros(1, test.shape[1]), test[2:4]])
    for det in (NCI(), SHE(), DICE(), OpenMax(tailsize=5, alpha=2)):
        scores = fit(det, train, y, head)(inputs(extreme, head))
        assert torch.isfinite(scores).all(), det.name
    fdbd = fit(FDBD(), train, y, head)
    assert (
        fdbd(inputs(fdbd.train_mean[None], head.double())).item() == -np.inf
    )  # at the training mean: most ID
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit(FDBD(), train, torch.zeros_like(y), nn.Linear(12, 1))(inputs(test, nn.Linear(12, 1)))


def test_streamed_fit_equals_whole_fit() -> None:
    train, y, test, head = blobs(14)
    makers = [DICE, NCI, FDBD, SHE, KLMatching, TemperatureScaledMSP, WeightedEnergy, OpenMax, GMM, VRA]
    makers += [lambda: NNGuide(k=5), lambda: Residual(dim=4)]
    for make in makers:
        whole, streamed = make(), make()
        whole.fit(logits=head(train).detach(), features=train, targets=y, head=head)
        streamed.fit(logits=head(train).detach(), features=train, targets=y, head=head, batch_size=37)
        with torch.no_grad():
            a, b = whole(inputs(test, head)), streamed(inputs(test, head))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=whole.name)


def test_bad_settings_and_missing_patterns_raise_clearly() -> None:
    for make, match in (
        (lambda: SCALE(percentile=100), "percentile"),
        (lambda: DICE(sparsity=1.0), "sparsity"),
        (lambda: VRA(lower=90, upper=80), "lower <= upper"),
        (lambda: NCI(alpha=-1), "alpha"),
        (lambda: TemperatureScaledMSP(t_min=2, t_max=1), "t_min < t_max"),
        (lambda: WeightedEnergy(weights=[0.0, -1.0]), "positive"),
        (lambda: OpenMax(tailsize=1), "tailsize"),
        (lambda: NNGuide(k=0), "k must"),
    ):
        with pytest.raises(ValueError, match=match):
            make()
    train, y, _, head = blobs(15)
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have no ID training sample"):
        fit(SHE(), train, torch.where(y == 3, 0, y), head)  # no sample labelled 3
    # a class without a correctly classified sample falls back to the mean of its samples
    always_3 = nn.Linear(12, 4)
    with torch.no_grad():
        always_3.weight.zero_()
        always_3.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    patterns = fit(SHE(), train, y, always_3).patterns
    torch.testing.assert_close(patterns[0], train[y == 0].double().mean(0))
    torch.testing.assert_close(patterns[3], train[y == 3].double().mean(0))


def test_default_set_holds_the_cheap_one_pass_detectors() -> None:
    names = [d.name for d in default_detectors(frozenset({"logits", "features", "head"}))]
    assert {"scale", "dice", "nci", "fdbd", "she", "grad_norm", "kl_matching", "residual"} <= set(names)
    assert not {"nn_guide", "openmax", "gmm", "gram", "rank_feat", "mahalanobis_preprocessed"} & set(names)
    logits_only = {d.name for d in default_detectors(frozenset({"logits"}))}
    assert "kl_matching" in logits_only and "scale" not in logits_only


def test_opt_in_grid_names_opt_in_detectors_and_their_hyperparameters() -> None:
    import lightning_ood.detectors as detectors

    grid = yaml.safe_load(Path("configs/detector_search/opt_in.yaml").read_text())["grid"]
    defaults = {d.name for d in default_detectors(frozenset({"logits", "features", "head"}))}
    by_name = {}
    for cls in vars(detectors).values():
        if isinstance(cls, type) and issubclass(cls, detectors.Detector) and cls is not detectors.Detector:
            det = cls()
            by_name[det.name] = det
    for name, values in grid.items():
        assert name in by_name and name not in defaults, name
        for params in expand_grid(values):
            assert build_candidate(by_name[name], params).name == name
