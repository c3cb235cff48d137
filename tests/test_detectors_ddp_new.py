"""A 2-process (gloo, CPU) fit of every issue-22 detector with a fit equals the 1-process fit: on an uneven
split and when one rank gets no fit batch (its statistics are zeros / empty, the shapes agreed with the other)."""

from __future__ import annotations

import pytest
import torch
from ddp_helpers import module_state_digest, run_ddp  # tests/ddp_helpers.py
from test_detectors_pytorch_ood import _maps, blobs, inputs  # tests/test_detectors_pytorch_ood.py

from lightning_ood.detectors import (
    DICE,
    FDBD,
    NCI,
    SHE,
    VRA,
    Detector,
    Gram,
    KLMatching,
    MultiLayerMahalanobis,
    NNGuide,
    OpenMax,
    TemperatureScaledMSP,
    WeightedEnergy,
    WeiPerKLD,
)
from lightning_ood.detectors.base import begin_scoring

SPLITS = {"uneven": 230, "empty_rank": 600}  # rows of rank 0 (of 600); rank 1 gets the rest


def _detectors() -> list[Detector]:
    return [
        DICE(),
        NCI(alpha=0.01),
        FDBD(),
        SHE(),
        VRA(),
        KLMatching(),
        TemperatureScaledMSP(grid_size=40),
        WeightedEnergy(),
        OpenMax(tailsize=10, alpha=2),
        NNGuide(k=9),
        Gram(poles=2, holdout_every=5),
        MultiLayerMahalanobis(),
        WeiPerKLD(repeats=5, n_bins=20),  # ranges from the data: kept features, max-reduced extremes
        WeiPerKLD(
            repeats=5, n_bins=20, feature_range=(0.0, 8.0), projection_range=(-80.0, 80.0), name="wk_fixed"
        ),
    ]


def _fit_and_score(rows: slice, digests: dict[str, dict[str, str]] | None = None) -> dict[str, torch.Tensor]:
    train, y, test, head = blobs(20)
    maps, test_maps = _maps(train, 3), _maps(test, 3)
    out = {}
    for det in _detectors():
        det.reset()
        for start in range(rows.start, rows.stop, 50):
            sl = slice(start, min(start + 50, rows.stop))
            det.update(inputs(train[sl], head, tuple(m[sl] for m in maps)), y[sl])
        det.finalize()
        if digests is not None:
            digests[det.name] = module_state_digest(det)
        begin_scoring([det], 1)  # NNGuide's sharded bank scores in collective rounds
        with torch.no_grad():
            out[det.name] = det(inputs(test, head, test_maps))
    return out


def _worker(rank: int) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor, dict]:
    digests: dict[str, dict[str, dict[str, str]]] = {split: {} for split in SPLITS}
    fits = {
        split: _fit_and_score(slice(0, n) if rank == 0 else slice(n, 600), digests[split])
        for split, n in SPLITS.items()
    }
    return fits, _gram(slice(0, 300) if rank == 0 else slice(300, 600)), digests


@pytest.mark.slow
def test_two_process_fit_equals_one_process_fit() -> None:
    single, gram = _fit_and_score(slice(0, 600)), _gram(slice(0, 600))
    ranks = run_ddp(_worker, timeout=240)
    # Every fitted buffer and parameter is the same on every rank: Lightning broadcasts them from rank 0 when a
    # stage starts, which must change nothing (rank-local state, e.g. NNGuide's bank share, is no buffer).
    assert ranks[0][2] == ranks[1][2]
    for rank, (results, gram_ddp, _) in enumerate(ranks):
        torch.testing.assert_close(gram_ddp, gram, rtol=1e-9, atol=1e-9)  # without a held-out share: exact
        for split, got in results.items():
            for name, scores in single.items():
                # Gram's held-out samples are every 5th of each rank's stream: the split changes which
                if name != "gram":
                    torch.testing.assert_close(
                        got[name], scores, rtol=1e-6, atol=1e-6, msg=f"{split}/{rank}/{name}"
                    )


def _gram(rows: slice) -> torch.Tensor:
    train, y, test, head = blobs(21)
    maps = _maps(train, 4)
    det = Gram(poles=3, holdout_every=0)
    det.reset()
    for start in range(rows.start, rows.stop, 64):
        sl = slice(start, min(start + 64, rows.stop))
        det.update(inputs(train[sl], head, tuple(m[sl] for m in maps)), y[sl])
    det.finalize()
    return det(inputs(test, head, _maps(test, 4)))
