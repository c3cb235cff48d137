"""Multi-node runs write to one shared file system: a check at set-up, before any work is done.

Every rank reads the detector fit cache beside the checkpoint (``<ckpt>.detectors.pt``), SLURM requeues restore
Lightning's ``hpc_ckpt_*.ckpt`` from ``trainer.default_root_dir``, and rank 0 writes the result files into the
run directory (the logger's). On several nodes a relative path (``logs/``) or a node-local one (``/tmp``,
``/scratch`` of one node) splits these between nodes. :class:`SharedStorageCheck` fails at once, naming the
setting, when one of them is relative or still the placeholder of ``configs/trainer/multi_node.yaml``, and on
more than one node checks that a file rank 0 writes into ``default_root_dir`` is seen by every rank.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_ood.distributed import all_gather_objects

#: The placeholder of ``configs/trainer/multi_node.yaml``: a run fails until it is replaced.
PLACEHOLDER = "/SET/TO/A/SHARED/PATH"


def output_paths(trainer: Trainer) -> dict[str, str]:
    """The settings that decide where a run reads and writes, by config key."""
    paths = {"trainer.default_root_dir": str(trainer.default_root_dir)}
    for i, logger in enumerate(trainer.loggers):
        save_dir = getattr(logger, "save_dir", None)
        if save_dir is not None:
            paths[f"trainer.logger[{i}].init_args.save_dir"] = str(save_dir)
    if trainer.ckpt_path:
        paths["ckpt_path"] = str(trainer.ckpt_path)
    return paths


class SharedStorageCheck(Callback):
    """Fail at set-up when an output path is relative, the placeholder, or (several nodes) not seen by every rank.

    Args:
        require_absolute: also on one node (default: only when ``trainer.num_nodes > 1``).
    """

    def __init__(self, require_absolute: bool = False) -> None:
        self.require_absolute = require_absolute

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        multi_node = trainer.num_nodes > 1
        for key, path in output_paths(trainer).items():
            if PLACEHOLDER in path:
                raise ValueError(
                    f"{key} is still the placeholder {PLACEHOLDER!r} of configs/trainer/multi_node.yaml: set it to a "
                    f"folder every node mounts, e.g. --{key}=/shared/$USER/lightning-ood"
                )
            if (multi_node or self.require_absolute) and not Path(path).is_absolute():
                raise ValueError(
                    f"{key} = {path!r} is relative: on several nodes each node would write its own copy. Set it to "
                    f"an absolute folder on a file system every node mounts, e.g. --{key}=/shared/$USER/lightning-ood"
                )
        if multi_node:
            self._check_shared(trainer)

    @staticmethod
    def _check_shared(trainer: Trainer) -> None:
        root = Path(trainer.default_root_dir)
        token = root / f".lightning_ood_shared_{trainer.strategy.broadcast(uuid.uuid4().hex)}"
        if trainer.is_global_zero:
            root.mkdir(parents=True, exist_ok=True)
            token.touch()
        trainer.strategy.barrier("lightning_ood_shared_storage")
        blind = [rank for rank, seen in enumerate(all_gather_objects(token.exists())) if not seen]
        trainer.strategy.barrier("lightning_ood_shared_storage_seen")
        if trainer.is_global_zero:
            token.unlink(missing_ok=True)
        if blind:
            raise RuntimeError(
                f"trainer.default_root_dir = {str(root)!r} is not shared: ranks {blind} do not see a file rank 0 wrote "
                "there (a node-local folder). Use a folder on a file system every node mounts"
            )
