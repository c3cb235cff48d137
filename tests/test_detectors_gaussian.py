"""Class-mean, Mahalanobis, RMD and ViM detectors against independent references (sklearn, numpy)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.linalg import pinvh
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from lightning_ood.detectors import (
    RMD,
    ClassMeanCosine,
    ClassMeanEuclidean,
    Detector,
    DetectorInputs,
    Mahalanobis,
    ViM,
)
from lightning_ood.detectors.vim import default_vim_dim

C, D = 3, 5
FACTORIES: dict[str, Callable[[], Detector]] = {
    "euclidean": ClassMeanEuclidean,
    "cosine": ClassMeanCosine,
    "maha_tied": lambda: Mahalanobis("tied"),
    "maha_per_class": lambda: Mahalanobis("per_class"),
    "rmd": RMD,
    "vim": lambda: ViM(dim=2),
}


def _data(offset: float = 20.0) -> tuple[Tensor, Tensor, Tensor, nn.Linear]:
    """Unbalanced anisotropic classes (train ``[N, D]``, labels ``[N]``), test points ``[40, D]``, a head."""
    rng = np.random.default_rng(0)
    sizes = [60, 45, 30]
    means = rng.normal(scale=3.0, size=(C, D)) + offset
    mix = rng.normal(size=(D, D))
    z = np.concatenate(
        [rng.normal(size=(n, D)) @ (mix + 0.3 * c * np.eye(D)) + means[c] for c, n in enumerate(sizes)]
    )
    y = np.repeat(np.arange(C), sizes)
    near = z[::7] + rng.normal(scale=0.5, size=z[::7].shape)  # 20 points near the training data
    test = np.concatenate([near, offset + rng.normal(scale=8.0, size=(20, D))])
    head = nn.Linear(D, C).double()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(rng.normal(size=(C, D))))
        head.bias.copy_(torch.from_numpy(rng.normal(size=C)))
    return torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(test), head


def _inputs(z: Tensor, head: nn.Linear) -> DetectorInputs:
    with torch.no_grad():
        return DetectorInputs(logits=head(z), features=z, head=head)


def _fit(det: Detector, z: Tensor, y: Tensor, head: nn.Linear, batch_size: int | None = None) -> Detector:
    with torch.no_grad():
        return det.fit(features=z, logits=head(z), targets=y, head=head, batch_size=batch_size)


def _score(det: Detector, z: Tensor, head: nn.Linear) -> np.ndarray:
    return det(_inputs(z, head)).numpy()


def _class_means(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([z[y == c].mean(0) for c in range(C)])


# -- against independent references ------------------------------------------------------------------------
def test_class_mean_euclidean_and_cosine_match_brute_force() -> None:
    z, y, test, head = _data()
    mu = _class_means(z.numpy(), y.numpy())
    diff = test.numpy()[:, None, :] - mu[None]
    ref_euc = (diff**2).sum(-1).min(1)
    cos = (test.numpy() @ mu.T) / np.linalg.norm(test.numpy(), axis=1)[:, None] / np.linalg.norm(mu, axis=1)
    ref_cos = -cos.max(1)
    np.testing.assert_allclose(
        _score(_fit(ClassMeanEuclidean(), z, y, head), test, head), ref_euc, rtol=1e-10
    )
    np.testing.assert_allclose(_score(_fit(ClassMeanCosine(), z, y, head), test, head), ref_cos, rtol=1e-10)


def test_mahalanobis_tied_matches_sklearn() -> None:
    z, y, test, head = _data()
    zn, yn, tn = z.numpy(), y.numpy(), test.numpy()
    mu = _class_means(zn, yn)
    ec = EmpiricalCovariance(assume_centered=True).fit(zn - mu[yn])
    ref = np.stack([ec.mahalanobis(tn - mu[c]) for c in range(C)], axis=1).min(1)
    np.testing.assert_allclose(
        _score(_fit(Mahalanobis("tied", ridge=0.0), z, y, head), test, head), ref, rtol=1e-9
    )
    # Default ridge: eps * trace / D on the diagonal, then an ordinary inverse.
    eps = 1e-6
    prec = np.linalg.inv(ec.covariance_ + eps * np.trace(ec.covariance_) / D * np.eye(D))
    ref_ridge = np.einsum("bcd,de,bce->bc", tn[:, None] - mu, prec, tn[:, None] - mu).min(1)
    np.testing.assert_allclose(
        _score(_fit(Mahalanobis("tied", ridge=eps), z, y, head), test, head), ref_ridge, rtol=1e-9
    )


def test_mahalanobis_per_class_matches_sklearn() -> None:
    z, y, test, head = _data()
    zn, yn, tn = z.numpy(), y.numpy(), test.numpy()
    ecs = [EmpiricalCovariance().fit(zn[yn == c]) for c in range(C)]
    ref = np.stack([ec.mahalanobis(tn) for ec in ecs], axis=1).min(1)
    det = _fit(Mahalanobis("per_class", ridge=0.0), z, y, head)
    np.testing.assert_allclose(_score(det, test, head), ref, rtol=1e-9)
    # The ridged inverse is scipy's pinvh of the ridged covariance.
    eps = 1e-3
    dists = []
    for ec in ecs:
        prec = pinvh(ec.covariance_ + eps * np.trace(ec.covariance_) / D * np.eye(D))
        diff = tn - ec.location_
        dists.append(np.einsum("bd,de,be->b", diff, prec, diff))
    det = _fit(Mahalanobis("per_class", ridge=eps), z, y, head)
    np.testing.assert_allclose(_score(det, test, head), np.stack(dists, 1).min(1), rtol=1e-9)


def test_rmd_matches_sklearn() -> None:
    z, y, test, head = _data()
    zn, yn, tn = z.numpy(), y.numpy(), test.numpy()
    mu = _class_means(zn, yn)
    tied = EmpiricalCovariance(assume_centered=True).fit(zn - mu[yn])
    background = EmpiricalCovariance().fit(zn)
    ref = np.stack([tied.mahalanobis(tn - mu[c]) for c in range(C)], axis=1).min(1) - background.mahalanobis(
        tn
    )
    np.testing.assert_allclose(
        _score(_fit(RMD(ridge=0.0), z, y, head), test, head), ref, rtol=1e-9, atol=1e-9
    )


def _vim_reference(z: np.ndarray, test: np.ndarray, w: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    """The official algorithm (haoqiwang/vim benchmark.py), written out in numpy; returns OOD-high scores."""
    u = -np.linalg.pinv(w) @ b
    cov = (z - u).T @ (z - u) / len(z)
    evals, evecs = np.linalg.eigh(cov)
    ns = evecs[:, np.argsort(-evals)[dim:]]
    logits_train, logits_test = z @ w.T + b, test @ w.T + b
    alpha = logits_train.max(1).mean() / np.linalg.norm((z - u) @ ns, axis=1).mean()
    vlogit = alpha * np.linalg.norm((test - u) @ ns, axis=1)
    energy = np.log(np.exp(logits_test).sum(1))
    return -(energy - vlogit)


def test_vim_matches_numpy_reference() -> None:
    z, y, test, head = _data()
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    ref = _vim_reference(z.numpy(), test.numpy(), w, b, dim=2)
    np.testing.assert_allclose(_score(_fit(ViM(dim=2), z, y, head), test, head), ref, rtol=1e-9)
    # A fixed alpha skips storing features and is used as given.
    det = _fit(ViM(dim=2, alpha=1.5), z, y, head)
    assert det.fitted_alpha.item() == 1.5


@pytest.mark.parametrize(("d", "expected"), [(5, 2), (512, 256), (768, 512), (1024, 512), (2048, 1000)])
def test_vim_default_dim_follows_official_rule(d: int, expected: int) -> None:
    assert default_vim_dim(d) == expected


# -- behaviour ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", FACTORIES)
def test_separated_blobs_vs_far_ood_auroc(key: str) -> None:
    rng = np.random.default_rng(1)
    d, n = 8, 80
    centers = 10.0 * np.eye(d)[:C]
    z = np.concatenate([rng.normal(size=(n, d)) + centers[c] for c in range(C)])
    y = np.repeat(np.arange(C), n)
    id_test = np.concatenate([rng.normal(size=(30, d)) + centers[c] for c in range(C)])
    ood = (
        rng.normal(size=(90, d)) + 10.0 * np.eye(d)[rng.integers(C, d, size=90)]
    )  # other axes: far and orthogonal
    head = nn.Linear(d, C).double()
    with torch.no_grad():  # a nearest-class-mean classifier
        head.weight.copy_(torch.from_numpy(centers))
        head.bias.copy_(torch.from_numpy(-0.5 * (centers**2).sum(1)))
    det = FACTORIES[key]() if key != "vim" else ViM()
    _fit(det, torch.from_numpy(z), torch.from_numpy(y), head)
    scores = _score(det, torch.from_numpy(np.concatenate([id_test, ood])), head)
    assert roc_auc_score(np.r_[np.zeros(len(id_test)), np.ones(len(ood))], scores) >= 0.95


@pytest.mark.parametrize("key", FACTORIES)
def test_streamed_fit_equals_whole_fit(key: str) -> None:
    z, y, test, head = _data()
    perm = torch.from_numpy(np.random.default_rng(2).permutation(len(z)))
    whole = _score(_fit(FACTORIES[key](), z, y, head), test, head)
    streamed = _score(_fit(FACTORIES[key](), z[perm], y[perm], head, batch_size=7), test, head)
    np.testing.assert_allclose(streamed, whole, rtol=1e-10, atol=1e-10)


# Not ViM: its origin -pinv(W) b moves only within the row space of W (not translation-equivariant).
@pytest.mark.parametrize("key", ["euclidean", "maha_tied", "maha_per_class", "rmd"])
def test_large_feature_mean_is_translation_invariant(key: str) -> None:
    """Streaming around a shift keeps float64 accurate when |mean| >> spread (no sum z z^T - N mu mu^T)."""
    z, y, test, head = _data(offset=0.0)
    shift = torch.full((D,), 1e6, dtype=torch.float64)
    shifted_head = nn.Linear(D, C).double()
    with torch.no_grad():  # same logits for the shifted features
        shifted_head.weight.copy_(head.weight)
        shifted_head.bias.copy_(head.bias - head.weight @ shift)
    plain = _score(_fit(FACTORIES[key](), z, y, head, batch_size=16), test, head)
    moved = _score(
        _fit(FACTORIES[key](), z + shift, y, shifted_head, batch_size=16), test + shift, shifted_head
    )
    np.testing.assert_allclose(moved, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ridge", [0.0, 1e-6])
def test_dead_dimensions_and_tiny_class_give_finite_scores(ridge: float) -> None:
    rng = np.random.default_rng(3)
    d = 6
    z = rng.normal(size=(50, d)) + 5.0 * np.eye(d)[np.repeat([0, 1, 2], [24, 24, 2])]
    z[:, [3, 5]] = 0.0  # dead feature dimensions
    y = np.repeat([0, 1, 2], [24, 24, 2])  # class 2 has 2 samples < 6 dimensions
    test = rng.normal(scale=3.0, size=(10, d))  # non-zero in the dead dimensions too
    head = nn.Linear(d, 3).double()
    detectors = [ClassMeanEuclidean(), ClassMeanCosine(), Mahalanobis("tied", ridge), RMD(ridge)]
    detectors += [Mahalanobis("per_class", ridge), ViM(dim=2)]
    for det in detectors:
        _fit(det, torch.from_numpy(z), torch.from_numpy(y), head)
        assert np.isfinite(_score(det, torch.from_numpy(test), head)).all(), det


def test_per_class_singleton_class_borrows_pooled_ridge_scale() -> None:
    z, y, test, _ = _data()
    z, y = torch.cat([z, z[:1] + 1.0]), torch.cat([y, torch.tensor([C])])  # class C: a single sample
    wide = nn.Linear(D, C + 1).double()
    scores = _score(_fit(Mahalanobis("per_class"), z, y, wide), test, wide)
    assert np.isfinite(scores).all() and (scores > 0).all()  # not the degenerate 0 distance of W = 0
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have zero covariance"):
        _fit(Mahalanobis("per_class", ridge=0.0), z, y, wide)


def test_class_without_samples_raises() -> None:
    z, y, _, head = _data()
    skipped = y.clone()
    skipped[skipped == 1] = 2  # labels 0 and 2 only
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no training samples"):
        Mahalanobis().fit(features=z, targets=skipped)
    # The logits' width fixes C: a missing last class is caught too.
    last = y.clone()
    last[last == 2] = 0
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        _fit(ClassMeanEuclidean(), z, last, head)


@pytest.mark.parametrize("key", FACTORIES)
def test_state_dict_round_trip_gives_identical_scores(key: str) -> None:
    z, y, test, head = _data()
    fitted = _fit(FACTORIES[key](), z, y, head)
    fresh = FACTORIES[key]()
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.fitted
    np.testing.assert_array_equal(_score(fresh, test, head), _score(fitted, test, head))


@pytest.mark.parametrize("key", FACTORIES)
def test_scoring_before_fit_raises(key: str) -> None:
    _, _, test, head = _data()
    with pytest.raises(RuntimeError, match="needs fitting"):
        FACTORIES[key]()(_inputs(test, head))


def test_bad_hyperparameters_raise() -> None:
    with pytest.raises(ValueError, match="covariance"):
        Mahalanobis("diagonal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ridge"):
        RMD(ridge=-1.0)
    z, y, _, head = _data()
    with pytest.raises(ValueError, match="0 < dim < D"):
        _fit(ViM(dim=D), z, y, head)


# -- distributed: 2 gloo processes on an uneven split equal 1 process --------------------------------------
N_RANK0 = 50  # of 135 training samples; rank 0 sees classes 0 and 1 only (class sizes 60, 45, 30)


def _fit_shard(z: Tensor, y: Tensor, head: nn.Linear, test: Tensor) -> dict[str, np.ndarray]:
    out = {}
    for key, factory in FACTORIES.items():
        det = factory()
        det.reset()
        for start in range(0, len(z), 16):  # no batch at all on a rank with no samples
            sl = slice(start, start + 16)
            logits = head(z[sl]) if key == "vim" else torch.empty(0)  # others: C from the targets, synced
            det.update(DetectorInputs(logits=logits, features=z[sl], head=head), y[sl])
        det.finalize()
        out[key] = _score(det, test, head)
    return out


def _ddp_worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        z, y, test, head = _data()
        with torch.no_grad():
            uneven = slice(0, N_RANK0) if rank == 0 else slice(N_RANK0, None)
            empty = slice(0, len(z)) if rank == 0 else slice(0, 0)
            results = {
                "uneven": _fit_shard(z[uneven], y[uneven], head, test),
                "empty_rank": _fit_shard(z[empty], y[empty], head, test),
            }
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def test_two_process_fit_equals_one_process_fit(tmp_path: Path) -> None:
    out_file = tmp_path / "scores.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    ddp = torch.load(out_file, weights_only=False)
    z, y, test, head = _data()
    for key, factory in FACTORIES.items():
        single = _score(_fit(factory(), z, y, head), test, head)
        for scenario in ("uneven", "empty_rank"):
            np.testing.assert_allclose(
                ddp[scenario][key], single, rtol=1e-9, atol=1e-9, err_msg=f"{scenario}/{key}"
            )
