"""ViM stays exact when the head's origin ``u = -pinv(W) b`` is far (|u| = 1e6) from features of spread ~1.

The reference is the paper's computation in float64 numpy, with the principal subspace taken from an SVD of
the centred-at-u features ``z - u`` (the right singular vectors are the eigenvectors of
``(z - u)^T (z - u) / N``). ``eigh`` of that matrix formed in float64 would itself be wrong by ~1e-4 here
(it squares the condition number ``|u| / spread``); the SVD agrees with a 40-digit mpmath computation to
~1e-9 on scores of size ~10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ddp_helpers import run_ddp  # tests/ddp_helpers.py
from scipy.special import logsumexp
from torch import Tensor, nn

from lightning_ood.detectors import DetectorInputs, ViM

N, D, C = 200, 6, 3
RTOL = (
    1e-7  # the pre-fix code (second moment as scatter + N (g - u)(g - u)^T, then eigh) is off by 1e-6..1e-3
)


def _data() -> tuple[Tensor, Tensor, nn.Linear]:
    """Train ``[N, D]``, test ``[30, D]`` float64 features and a head ``W = U diag(2, 1, 1e-6) V^T``, ``b``
    along the weak direction: logits stay O(1) while ``|u| = |pinv(W) b| = 1e6``."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(N, D)) @ rng.normal(size=(D, D)) + 2.0
    test = np.concatenate([z[::10] + 0.3 * rng.normal(size=(N // 10, D)), 4.0 * rng.normal(size=(10, D))])
    left, _ = np.linalg.qr(rng.normal(size=(C, C)))
    right, _ = np.linalg.qr(rng.normal(size=(D, D)))
    head = nn.Linear(D, C).double()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(left @ np.diag([2.0, 1.0, 1e-6]) @ right[:, :C].T))
        head.bias.copy_(torch.from_numpy(left[:, 2] + 0.5 * left[:, 0]))
    return torch.from_numpy(z), torch.from_numpy(test), head


def _reference(z: np.ndarray, test: np.ndarray, w: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    """ViM (Wang et al., CVPR 2022; official benchmark.py) in float64 numpy; OOD-high scores ``[B]``."""
    u = -np.linalg.pinv(w) @ b
    _, _, vt = np.linalg.svd(z - u, full_matrices=False)
    residual = vt[dim:].T  # [D, D - dim], complement of the principal subspace
    alpha = (z @ w.T + b).max(1).mean() / np.linalg.norm((z - u) @ residual, axis=1).mean()
    return alpha * np.linalg.norm((test - u) @ residual, axis=1) - logsumexp(test @ w.T + b, axis=1)


def _expected(dim: int) -> np.ndarray:
    z, test, head = _data()
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    return _reference(z.numpy(), test.numpy(), w, b, dim)


def _fit_and_score(z: Tensor, test: Tensor, head: nn.Linear, dim: int, batch_size: int | None) -> np.ndarray:
    """Fit ViM batch by batch (no update at all when ``z`` is empty), return the ``[B]`` test scores."""
    det = ViM(dim=dim)
    det.reset()
    step = batch_size or max(len(z), 1)
    with torch.no_grad():
        for start in range(0, len(z), step):
            feats = z[start : start + step]
            det.update(DetectorInputs(logits=head(feats), features=feats, head=head), torch.zeros(len(feats)))
        det.finalize()
        scores = det(DetectorInputs(logits=head(test), features=test, head=head))
    assert scores.dtype == torch.float64 and scores.shape == (len(test),)
    return scores.numpy()


def test_head_origin_is_far() -> None:
    _, _, head = _data()
    u = -torch.linalg.pinv(head.weight.detach()) @ head.bias.detach()
    assert 0.99e6 < float(u.norm()) < 1.01e6


@pytest.mark.parametrize("batch_size", [None, 16])
@pytest.mark.parametrize("dim", [2, 3, 4])
def test_vim_far_origin_matches_reference(dim: int, batch_size: int | None) -> None:
    z, test, head = _data()
    expected = _expected(dim)
    got = _fit_and_score(z, test, head, dim, batch_size)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def _ddp_worker(rank: int) -> dict[str, np.ndarray]:
    z, test, head = _data()
    splits = {"uneven": 70, "empty_rank": N}  # rows of rank 0; rank 1 gets the rest
    return {
        f"{split}/{dim}": _fit_and_score(z[:n0] if rank == 0 else z[n0:], test, head, dim, 16)
        for split, n0 in splits.items()
        for dim in (2, 3)
    }


@pytest.mark.slow
def test_vim_far_origin_two_process_fit_matches_reference() -> None:
    expected = {dim: _expected(dim) for dim in (2, 3)}
    for rank, result in enumerate(run_ddp(_ddp_worker, timeout=90)):
        for key, got in result.items():
            ref = expected[int(key.split("/")[1])]
            np.testing.assert_allclose(
                got, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max(), err_msg=f"rank{rank}/{key}"
            )
