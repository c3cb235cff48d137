"""Several detectors from one fit state: the detector search's candidates that differ only in a scoring
hyperparameter (KNN's ``k``, ReAct's ``percentile``) share one accumulated state instead of one each.

The default grid has 6 KNN candidates and 5 ReAct candidates: without sharing, 6 banks of ``N x D`` features and
5 copies of the ReAct activations (at ImageNet-1K scale 6 x 10.5 GB and 5 x 10.5 GB, divided by the ranks).
With it, one of each; every candidate still gets exactly the state it would get alone (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_ood.detectors.base import Detector


def share_fit_state(detectors: Sequence[Detector]) -> list[Detector]:
    """The detectors a fit pass must update: one per :meth:`~Detector.fit_state_key` group (the first), which
    is told to fit the rest of its group when it finalizes, and every detector without a key.

    Call it right before :func:`~lightning_ood.detectors.fitting.fit_detectors` on its result; the others are
    fitted when it returns.
    """
    groups: dict[str, list[Detector]] = {}
    leaders: list[Detector] = []
    for det in detectors:
        key = det.fit_state_key()
        if key is None:
            leaders.append(det)
        elif key in groups:
            groups[key].append(det)
        else:
            groups[key] = [det]
            leaders.append(det)
    for first, *rest in groups.values():
        if rest:
            first.share_fit_with(rest)
    return leaders
