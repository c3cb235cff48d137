"""The detector API: what a detector consumes, how it is fitted (streaming) and how it scores.

Every detector returns a float tensor of shape ``[B]`` in which **higher means more likely OOD**; scores are raw
and unbounded (see the README's score convention).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

# Re-exported: detectors import the contract types and collectives from here.
from lightning_ood.contract import CONSUMABLES, DetectorInputs, ModelOutputs, ScoringModel
from lightning_ood.distributed import all_gather_cat, all_reduce_max, all_reduce_sum

__all__ = [
    "CONSUMABLES",
    "Detector",
    "DetectorInputs",
    "ModelOutputs",
    "ScoringModel",
    "all_gather_cat",
    "all_reduce_max",
    "all_reduce_sum",
]


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


class Detector(nn.Module):
    """Base class of every post-hoc OOD detector.

    Subclasses set :attr:`requires` (a subset of :data:`CONSUMABLES`) and implement :meth:`score`. A detector
    that needs statistics of the ID training set sets :attr:`needs_fit` and implements :meth:`update`
    (accumulate sufficient statistics of one batch, in float64) and :meth:`finalize` (sum them across ranks
    with :func:`all_reduce_sum` / :func:`all_gather_cat`, then compute what :meth:`score` uses). Fitted state is
    kept in buffers, so it is saved with a checkpoint; buffers whose shape is only known after fitting are
    resized when a state dict is loaded.

    Hyperparameters are constructor arguments (they are the YAML / command-line schema). ``name`` sets the key
    under which the detector's scores are logged; it defaults to the snake-case class name.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"logits"})
    needs_fit: ClassVar[bool] = False
    #: The log key when no ``name`` is given (default: the class name in snake case, e.g. ``max_logit``).
    default_name: ClassVar[str | None] = None

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self._name = name or self.default_name or _snake(type(self).__name__)
        self.register_buffer("_fitted", torch.tensor(not self.needs_fit), persistent=True)

    @property
    def name(self) -> str:
        return self._name

    @property
    def fitted(self) -> bool:
        return bool(self._fitted)

    def fingerprint(self) -> str:
        """A short hash of the class and its hyperparameters (``extra_repr``), used to match fitted state."""
        text = f"{type(self).__module__}.{type(self).__qualname__}({self.extra_repr()})"
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def check_applicable(self, available: frozenset[str]) -> None:
        """Raise a clear error when the model cannot give this detector what it consumes."""
        missing = self.requires - available
        if missing:
            raise ValueError(
                f"detector {self.name!r} ({type(self).__name__}) needs {sorted(missing)}, which this method does "
                f"not provide (it provides {sorted(available)}). Remove it from `model.detectors` or use a method "
                "that exposes them."
            )

    def configure(self, datamodule: object | None) -> None:
        """Take settings from the data before scoring (e.g. ODIN's input std); called when testing starts."""

    # -- fitting ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget accumulated statistics; called before a fit pass."""
        self._fitted.fill_(not self.needs_fit)

    def update(self, batch: DetectorInputs, targets: Tensor) -> None:
        """Accumulate the sufficient statistics of one ID training batch (``targets``: ``[B]`` class indices)."""

    def finalize(self) -> None:
        """Reduce statistics across ranks and compute the fitted state."""
        self._fitted.fill_(True)

    # -- one fit state for several detectors (the detector search's candidates) ---------------------------------
    def fit_state_key(self) -> str | None:
        """Detectors with the same key (not ``None``) accumulate the same fit state (e.g. one KNN bank for every
        ``k``): one of them can fit the others from it (:meth:`share_fit_with`). Default: ``None``, no sharing."""
        return None

    def share_fit_with(self, followers: list[Detector]) -> None:
        """Before a fit pass: this detector's :meth:`finalize` also fits ``followers`` (the same
        :meth:`fit_state_key`; they get no :meth:`update`), from its own accumulated state. Only detectors
        with a key implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no fit state to share")

    def fit(
        self,
        *,
        logits: Tensor | None = None,
        features: Tensor | None = None,
        targets: Tensor | None = None,
        head: nn.Linear | None = None,
        batch_size: int | None = None,
    ) -> Detector:
        """Fit from whole tensors (convenience; streams them in chunks of ``batch_size`` through ``update``)."""
        ref = logits if logits is not None else features
        if ref is None:
            raise ValueError("fit() needs logits or features")
        n = ref.shape[0]
        if targets is None:
            targets = torch.full((n,), -1, dtype=torch.long, device=ref.device)
        step = batch_size or n
        self.reset()
        for start in range(0, n, step):
            sl = slice(start, start + step)
            self.update(
                DetectorInputs(
                    logits=logits[sl] if logits is not None else None,
                    features=features[sl] if features is not None else None,
                    head=head,
                ),
                targets[sl],
            )
        self.finalize()
        return self

    # -- scoring ---------------------------------------------------------------------------------------------
    def begin_scoring(self, num_batches: int | float | None) -> int:
        """Called on every rank (through :func:`begin_scoring`) before a pass that scores ``num_batches``
        batches on this rank (``None`` or ``inf``: unknown), after fitting. A detector whose fitted state is
        sharded over the ranks scores with one collective round per batch and agrees here on their number (see
        :class:`~lightning_ood.detectors.KNN`); it returns the empty rounds this rank owes. Default: 0."""
        return 0

    def empty_round(self) -> None:
        """Take part in one scoring round without a batch of this rank's own (an owed round, or a batch scored
        without a forward pass); only detectors that score with collectives do anything."""

    def score(self, batch: DetectorInputs) -> Tensor:
        """Return ``[B]`` OOD scores, higher = more OOD."""
        raise NotImplementedError

    def forward(self, batch: DetectorInputs) -> Tensor:
        if self.needs_fit and not self.fitted:
            raise RuntimeError(
                f"detector {self.name!r} needs fitting on the ID training set before it can score; the method "
                "fits it automatically at the start of testing (or call .fit(...))."
            )
        return self.score(batch)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Fitted buffers (e.g. a D x D precision matrix) have shapes only known after fitting: adopt the saved one.
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if key in state_dict and buf is not None and buf.shape != state_dict[key].shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def begin_scoring(detectors: Sequence[Detector], num_batches: int | float | None) -> None:
    """Before a scoring pass, on every rank: each detector agrees on its collective rounds, then the rounds
    this rank owes (it scores fewer batches than the busiest rank) run now, one round of every detector at a
    time in ``detectors``' order: the order the same detectors take their rounds in each scored batch, so
    every rank's collectives pair up. ``detectors``: in the order they score each batch."""
    owed = [det.begin_scoring(num_batches) for det in detectors]
    for r in range(max(owed, default=0)):
        for det, n in zip(detectors, owed, strict=True):
            if r < n:
                det.empty_round()
