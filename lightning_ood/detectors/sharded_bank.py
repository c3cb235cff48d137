"""A bank of fit rows that stays sharded over the DDP ranks (KNN, NNGuide): where each rank's share lives, and
how it is scored, moved, saved and loaded.

**Why a share is never a buffer.** Lightning broadcasts every parameter and buffer of the LightningModule from
rank 0 when a stage starts (``DistributedDataParallel``'s construction when fitting, ``_sync_module_states``
when validating, testing or predicting). A rank's share kept in a buffer would be replaced by rank 0's share
at the next ``trainer.test`` / ``trainer.predict`` (or break the broadcast when the shares differ in size), so
every rank would score against a third of the bank and the scores would silently change. The share is
therefore a plain attribute (:attr:`ShardedBank.shard`), moved with the module by :meth:`ShardedBank._apply`,
while the ``bank`` buffer holds only what is the same on every rank: the whole bank of a one-process or
replicated fit, or nothing. Every detector's buffers are rank-independent, and the DDP fit tests check it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector
from lightning_ood.detectors.gather import agree_layout, dataset_index, row_counts
from lightning_ood.detectors.knn_shards import ShardedRounds
from lightning_ood.distributed import distributed_world


class ShardedBank(Detector):
    """Base of detectors that score against a bank of fit rows (``[N, D]``) by the top ``k`` inner products.

    Subclasses register the ``bank`` buffer and call :meth:`keep_rows` in ``finalize``. In one process (and for
    a replicated bank) the rows are the ``bank`` buffer, saved with the fit cache. A sharded fit on ``W > 1``
    ranks keeps each rank's rows in :attr:`shard` (never a buffer, see the module doc) and scores each batch
    with one collective round (:class:`~lightning_ood.detectors.knn_shards.ShardedRounds`); its state dict says
    "not fitted", so the ordinary fit cache never holds one share as a fit; the shares are cached per rank
    instead (:mod:`~lightning_ood.detectors.shard_cache`).
    """

    bank: Tensor

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.shard: Tensor | None = None  # this rank's rows of a sharded fit (not a buffer)
        self._rounds: ShardedRounds | None = None
        self.register_state_dict_post_hook(_no_shard_in_state)

    @property
    def sharded(self) -> bool:
        """Whether this rank holds only its share of the bank (a sharded fit on more than one process)."""
        return self.shard is not None

    @property
    def rows(self) -> Tensor:
        """``[n, D]`` the bank rows on this rank: its share when sharded, else the whole bank."""
        return self.shard if self.shard is not None else self.bank

    def reset(self) -> None:
        super().reset()
        self.shard, self._rounds = None, None
        self.bank = self.bank.new_empty(0)  # free the old bank before a refit

    def agreed_rows(self, parts: list[Tensor]) -> tuple[Tensor, Tensor, int]:
        """This rank's fit rows ``[n, D]`` from ``parts`` (layout and dtype agreed across ranks), their dataset
        indices ``[n]`` and the number of rows over every rank. A collective every rank enters, also one
        without fit batches; raises on every rank when no rank has a row."""
        local = torch.cat(parts) if parts else None
        rows = agree_layout(local, device=self.bank.device, who=self.name)
        counts = row_counts(len(rows), rows.device)
        if sum(counts) == 0:
            raise RuntimeError(
                f"detector {self.name!r}: no ID training features on any rank (every fit batch was empty)"
            )
        return rows, dataset_index(counts, rows.device), sum(counts)

    def keep_rows(self, rows: Tensor, *, sharded: bool) -> None:
        """Install this rank's ``rows`` ``[n, D]`` (cast by the caller): as its share when ``sharded`` (more
        than one process), else as the ``bank`` buffer."""
        if sharded:
            self.shard, self.bank = rows, rows.new_empty(0)
            self._rounds = ShardedRounds(rows.shape[1], rows.device, self.name)
        else:
            self.shard, self._rounds, self.bank = None, None, rows

    def shards_under_ddp(self) -> bool:
        """Whether a fit on more than one process keeps the bank sharded (default: yes)."""
        return True

    def share_state(self) -> dict[str, Tensor]:
        """This rank's share of a sharded fit, for the per-rank fit cache
        (:mod:`~lightning_ood.detectors.shard_cache`); subclasses add what else their share needs."""
        if self.shard is None:
            raise RuntimeError(f"detector {self.name!r} holds no sharded fit to cache")
        return {"shard": self.shard}

    def load_share(self, state: dict[str, Tensor]) -> None:
        """Install this rank's cached share (see :meth:`share_state`) as a fitted sharded bank."""
        device = self.bank.device
        self.keep_rows(state["shard"].to(device).clone(), sharded=True)
        self._fitted.fill_(True)

    def share_rows_of(self, leader: ShardedBank) -> None:
        """Score against ``leader``'s rows (the same tensors, not a copy)."""
        self.shard, self.bank = leader.shard, leader.bank
        sharded = leader.shard is not None
        self._rounds = ShardedRounds(self.rows.shape[1], self.rows.device, self.name) if sharded else None

    def split_loaded_bank(self) -> None:
        """After a state dict (a one-process fit, e.g. from the fit cache) is loaded under DDP: every rank keeps
        its every-``W``-th row as its share. No effect in one process."""
        rank, world = distributed_world()
        if world > 1 and self.fitted:
            self.keep_rows(self.bank[rank::world].contiguous(), sharded=True)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ShardedBank:
        """Move / cast the share with the module, as the buffers are."""
        super()._apply(fn, recurse)
        if self.shard is not None:
            self.shard = fn(self.shard)
            if self._rounds is not None:
                self._rounds.device = self.shard.device
        return self

    def begin_scoring(self, num_batches: int | float | None) -> int:
        """A sharded bank: agree with the other ranks on the rounds of the coming pass (a collective);
        returns the empty rounds this rank owes."""
        return self._rounds.begin(num_batches) if self._rounds is not None else 0

    def local_topk(self, queries: Tensor, k: int) -> Tensor:
        """``[Q, k]`` the ``k`` largest inner products of ``queries`` with this rank's rows, ``-inf`` padded."""
        raise NotImplementedError

    def empty_round(self) -> None:
        """A sharded bank: one round with no queries of this rank (its share still answers the others')."""
        if self._rounds is not None:
            self._rounds.topk(None, self.local_topk, self.round_k())

    def round_k(self) -> int:
        """The ``k`` of each round (the same on every rank)."""
        raise NotImplementedError

    def merged_topk(self, queries: Tensor) -> Tensor:
        """``[B, k]`` the ``k`` largest inner products (descending) of ``queries`` ``[B, D]`` over the whole bank:
        one collective round when sharded, a local search otherwise."""
        if self._rounds is not None:
            return self._rounds.topk(queries, self.local_topk, self.round_k())
        return self.local_topk(queries, self.round_k()).sort(dim=1, descending=True).values


def _no_shard_in_state(module: ShardedBank, state: dict, prefix: str, local_metadata: dict) -> None:
    """A sharded bank is one rank's share, not the fit: its state dict (the fit cache) says "not fitted", so a
    later run fits again instead of scoring against a part of the bank."""
    if module.sharded:
        state[prefix + "_fitted"] = torch.tensor(False)
