"""The moment detectors' scoring products: RMD's background distance from the tied whitening (a low-rank
Woodbury correction instead of a second [D, D] product), and [B, D] x [D, K] products in the features'
precision (float32 features: float32 products; float64 features: float64, the exact path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import pinvh
from torch import Tensor, nn

from lightning_ood.detectors import RMD, DetectorInputs, Mahalanobis, ViM
from lightning_ood.detectors.mahalanobis import background_factors


def _classes(seed: int, n: int = 600, d: int = 24, c: int = 5) -> tuple[Tensor, Tensor, Tensor, nn.Linear]:
    """Float64 train ``[n, d]`` (anisotropic, unbalanced classes), labels, test ``[80, d]`` and a head."""
    rng = np.random.default_rng(seed)
    y = rng.choice(c, size=n, p=np.arange(1, c + 1) / np.arange(1, c + 1).sum())
    means = rng.normal(scale=4.0, size=(c, d)) + 10.0
    z = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + means[y]
    test = np.concatenate([z[:40] + rng.normal(scale=0.5, size=(40, d)), 10.0 + 6 * rng.normal(size=(40, d))])
    head = nn.Linear(d, c).double()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(rng.normal(size=(c, d))))
        head.bias.copy_(torch.from_numpy(rng.normal(size=c)))
    return torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(test), head


def _fit(det, z: Tensor, y: Tensor, head: nn.Linear):
    with torch.no_grad():
        return det.fit(features=z, logits=head(z.double()), targets=y, head=head, batch_size=128)


def _score(det, test: Tensor, head: nn.Linear) -> np.ndarray:
    with torch.no_grad():
        return det(DetectorInputs(logits=head(test.double()), features=test, head=head)).numpy()


def _rmd_reference(z: np.ndarray, y: np.ndarray, test: np.ndarray, ridge: float) -> np.ndarray:
    """``min_c MD_c - MD_0`` with ``pinvh`` of the ridged ML covariances (numpy / scipy, no detector code)."""
    classes = np.unique(y)
    mu = np.stack([z[y == c].mean(0) for c in classes])
    d = z.shape[1]

    def precision(cov: np.ndarray) -> np.ndarray:
        return pinvh(cov + ridge * np.trace(cov) / d * np.eye(d))

    within = precision((z - mu[y]).T @ (z - mu[y]) / len(z))
    total = precision(np.cov(z.T, bias=True))
    diff = test[:, None, :] - mu[None]
    md_class = np.einsum("bcd,de,bce->bc", diff, within, diff).min(1)
    centred = test - z.mean(0)
    return md_class - np.einsum("bd,de,be->b", centred, total, centred)


@pytest.mark.parametrize("ridge", [0.0, 1e-6, 1e-2])
def test_rmd_background_from_the_tied_whitening_matches_pinvh(ridge: float) -> None:
    z, y, test, head = _classes(0)
    det = _fit(RMD(ridge=ridge), z, y, head)
    factors = background_factors(det.whitener, det.background_whitener, det.white_means, ridge)
    assert factors is not None and factors[1].shape == (24, 5) and factors[2].shape == (5, 5)
    explicit = ((test - det.center) @ det.background_whitener).square().sum(1).numpy()
    with torch.no_grad():
        got = det.background_distances(DetectorInputs(features=test)).numpy()
    np.testing.assert_allclose(got, explicit, rtol=1e-9)
    ref = _rmd_reference(z.numpy(), y.numpy(), test.numpy(), ridge)
    np.testing.assert_allclose(_score(det, test, head), ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


def test_rmd_falls_back_to_the_background_whitener_when_an_eigenvalue_is_dropped() -> None:
    z, y, test, head = _classes(1)
    z[:, [3, 7]] = 0.0  # dead feature dimensions: with ridge=0 both whiteners drop them
    det = _fit(RMD(ridge=0.0), z, y, head)
    assert background_factors(det.whitener, det.background_whitener, det.white_means, 0.0) is None
    ref = _rmd_reference(z.numpy(), y.numpy(), test.numpy(), 0.0)
    np.testing.assert_allclose(_score(det, test, head), ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


@pytest.mark.parametrize(
    "make", [Mahalanobis, lambda: Mahalanobis("per_class"), RMD, lambda: ViM(dim=12)], ids=str
)
def test_float32_features_get_float32_products_close_to_float64(make) -> None:
    z, y, test, head = _classes(2)
    z32, test32 = z.float(), test.float()
    det = _fit(make(), z32, y, head)  # the fit is float64 whatever the features' dtype
    single, double = _score(det, test32, head), _score(det, test32.double(), head)
    assert single.dtype == double.dtype == np.float64
    change = np.abs(single - double).max()
    # float32 products: a rounding-size change (never zero), far below the spread of the scores
    assert 0 < change < 1e-5 * np.ptp(double)


def test_vim_float32_products_stay_accurate_for_a_far_head_origin() -> None:
    """``(z - u) R`` is computed as ``z R - u R`` (``u R`` in float64): with ``|u| = 1e6`` a float32 product of
    ``z - u`` itself would be off by ~1 in the residual norm."""
    rng = np.random.default_rng(0)
    d, c = 6, 3
    z = torch.from_numpy(rng.normal(size=(200, d)) @ rng.normal(size=(d, d)) + 2.0).float()
    test = z[::10] + 0.3 * torch.randn(20, d, generator=torch.Generator().manual_seed(0))
    left, _ = np.linalg.qr(rng.normal(size=(c, c)))
    right, _ = np.linalg.qr(rng.normal(size=(d, d)))
    head = nn.Linear(d, c).double()
    with torch.no_grad():  # a weak direction (singular value 1e-6) along the bias: |u| = 1e6
        head.weight.copy_(torch.from_numpy(left @ np.diag([2.0, 1.0, 1e-6]) @ right[:, :c].T))
        head.bias.copy_(torch.from_numpy(left[:, 2] + 0.5 * left[:, 0]))
    det = _fit(ViM(dim=2), z, torch.zeros(len(z), dtype=torch.long), head)
    assert det.origin.norm() > 0.99e6
    single, double = _score(det, test, head), _score(det, test.double(), head)
    tol = 1e-5 * np.abs(double).max()
    np.testing.assert_allclose(single, double, rtol=0, atol=tol)
    naive = ((test.double() - det.origin).float() @ det.residual_basis.float()).double().norm(dim=1)
    exact = ((test.double() - det.origin) @ det.residual_basis).norm(dim=1)
    assert float((det.fitted_alpha * (naive - exact)).abs().max()) > 100 * tol  # what the form avoids
