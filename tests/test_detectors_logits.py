"""MSP, MaxLogit, Energy, Entropy and GEN against scipy / numpy closed forms and a 200-digit mpmath reference.

Covered: ordinary and extreme logits (±1e4, rows of ties, a single class, 5000 classes, confident rows whose
softmax rounds to one-hot), float16 / bfloat16 / float32 / float64 inputs (float64 is never downcast),
shape ``[B]``, finiteness and the score direction (higher = more OOD).
"""

from __future__ import annotations

from collections.abc import Callable

import mpmath
import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from scipy.stats import entropy

from lightning_ood.detectors import GEN, MSP, Detector, DetectorInputs, Energy, Entropy, MaxLogit


def _gen_reference(z: np.ndarray, gamma: float, top_k: int) -> np.ndarray:
    """Liu et al., CVPR 2023, eq. 6: ``sum_{j <= M} p_j^gamma (1 - p_j)^gamma`` over the M largest p_j."""
    p = -np.sort(-softmax(z, axis=1), axis=1)[:, : min(top_k, z.shape[1])]
    return (p**gamma * (1.0 - p) ** gamma).sum(1)


#: name -> (detector, float64 numpy reference ``[B, C] -> [B]``)
DETECTORS: dict[str, tuple[Callable[[], Detector], Callable[[np.ndarray], np.ndarray]]] = {
    "msp": (MSP, lambda z: -softmax(z, axis=1).max(1)),
    "max_logit": (MaxLogit, lambda z: -z.max(1)),
    "energy": (Energy, lambda z: -logsumexp(z, axis=1)),
    "energy_t2.5": (lambda: Energy(temperature=2.5), lambda z: -2.5 * logsumexp(z / 2.5, axis=1)),
    "energy_t1000": (lambda: Energy(temperature=1000.0), lambda z: -1000.0 * logsumexp(z / 1000.0, axis=1)),
    "entropy": (Entropy, lambda z: entropy(softmax(z, axis=1), axis=1)),
    "gen": (GEN, lambda z: _gen_reference(z, 0.1, 100)),
    "gen_g0.5_top2": (lambda: GEN(gamma=0.5, top_k=2), lambda z: _gen_reference(z, 0.5, 2)),
}


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "random": 3.0 * rng.normal(size=(8, 10)),
        "plus_minus_1e4": np.array(
            [[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4], [-1e4, 0.0, 1e4]]
        ),
        "ties": np.array([[5.0] * 6, [-3.0] * 6, [2.0, 2.0, 2.0, -1.0, -1.0, -1.0]]),
        "single_class": np.array([[3.0], [-1e4], [1e4], [0.0]]),
        "large_c": 2.0 * rng.normal(size=(4, 5000)),
    }


def _score(det: Detector, z: torch.Tensor) -> torch.Tensor:
    return det(DetectorInputs(logits=z))


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("name", list(DETECTORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_closed_form(name: str, case: str, dtype: torch.dtype) -> None:
    factory, reference = DETECTORS[name]
    z = torch.from_numpy(_cases()[case]).to(dtype)
    scores = _score(factory(), z)
    assert scores.shape == (z.shape[0],) and scores.dtype == dtype  # float64 is not downcast
    expected = reference(z.double().numpy())  # the float32-rounded logits, in float64
    assert np.isfinite(expected).all() and torch.isfinite(scores).all()
    rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else (2e-6, 1e-6)
    np.testing.assert_allclose(scores.double().numpy(), expected, rtol=rtol, atol=atol)


# -- confident rows: p_max rounds to 1, so scipy's entropy and 1 - p lose the small terms --------------------
CONFIDENT = [[30.0, 0.0, 0.0], [40.0, 1.0, 0.0, -2.0], [17.0, 0.0], [120.0, 0.0]]


def _mp_reference(row: list[float], name: str) -> float:
    """Entropy / GEN of one row of logits in 200-digit arithmetic (``1 - p_max`` down to 1e-53 is resolved);
    ``1 - p_j`` as the sum of the other probabilities."""
    with mpmath.workdps(200):
        z = [mpmath.mpf(v) for v in row]
        total = mpmath.fsum(mpmath.exp(v) for v in z)
        p = [mpmath.exp(v) / total for v in z]
        if name == "entropy":
            return float(mpmath.fsum(-pj * mpmath.log(pj) for pj in p))
        rest = [mpmath.fsum(p[:j] + p[j + 1 :]) for j in range(len(p))]
        return float(mpmath.fsum((pj * qj) ** mpmath.mpf("0.1") for pj, qj in zip(p, rest, strict=True)))


@pytest.mark.parametrize("name", ["entropy", "gen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_confident_rows_match_high_precision(name: str, dtype: torch.dtype) -> None:
    det = DETECTORS[name][0]()
    for row in CONFIDENT:
        # In float32 the entropy of [120, 0], 121 e^-120 ~ 9e-51, is below the smallest float32: it rounds to 0.
        expected = (
            _mp_reference(row, name)
            if dtype == torch.float64
            else float(np.float32(_mp_reference(row, name)))
        )
        got = float(_score(det, torch.tensor([row], dtype=dtype)))
        assert got == pytest.approx(expected, rel=1e-12 if dtype == torch.float64 else 1e-5, abs=0), row


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(DETECTORS))
def test_half_precision_is_promoted_to_float32(name: str, dtype: torch.dtype) -> None:
    factory, reference = DETECTORS[name]
    z = torch.from_numpy(_cases()["random"]).to(dtype)
    scores = _score(factory(), z)
    assert scores.dtype == torch.float32 and scores.shape == (z.shape[0],)
    np.testing.assert_allclose(scores.double().numpy(), reference(z.double().numpy()), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_confident_row_scores_lower_than_flat_row(name: str) -> None:
    z = torch.tensor([[8.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    confident, flat = _score(DETECTORS[name][0](), z).tolist()
    assert confident < flat


def test_bad_hyperparameters_raise() -> None:
    with pytest.raises(ValueError, match="temperature"):
        Energy(temperature=0.0)
    with pytest.raises(ValueError, match="gamma"):
        GEN(gamma=1.0)
    with pytest.raises(ValueError, match="top_k"):
        GEN(top_k=0)
