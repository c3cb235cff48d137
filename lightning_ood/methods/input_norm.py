"""How a method that undoes the data's normalisation learns it: its own settings, else the data module's."""

from __future__ import annotations

from torch import Tensor


class InputNormalisation:
    """Mixin for methods whose batches arrive normalised by the data module but whose sub-models need other
    inputs (a pretrained encoder's preprocessing, a diffusion model's ``[-1, 1]`` range).

    The method's hyperparameters ``input_mean`` / ``input_std`` win; when unset, ``setup`` reads the data
    module's ``mean`` / ``std`` (before any batch: attacks on the test sets run before testing).
    """

    _data_norm: tuple[list[float], list[float]] | None = None

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "mean"):
            self._data_norm = (list(datamodule.mean), list(datamodule.std))

    def input_normalisation(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, std)``, each ``[C]`` for ``x`` of shape ``[B, C, H, W]`` (a single value is broadcast)."""
        mean, std = self.hparams.input_mean, self.hparams.input_std
        if mean is None or std is None:
            if self._data_norm is None:
                raise RuntimeError(
                    f"{type(self).__name__} does not know how its input batches are normalised: set "
                    "model.init_args.input_mean / input_std, or run it under a Trainer with a lightning_ood "
                    "OODDataModule"
                )
            mean, std = mean or self._data_norm[0], std or self._data_norm[1]
        channels = x.shape[1]
        return _per_channel(x, mean, channels), _per_channel(x, std, channels)


def _per_channel(x: Tensor, values: list[float], channels: int) -> Tensor:
    out = x.new_tensor(values)
    return out.expand(channels) if len(values) == 1 else out
