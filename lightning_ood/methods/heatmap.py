"""Heatmap-based OOD detection (Hornauer & Belagiannis, WACV 2023, "Heatmap-based out-of-distribution
detection", arXiv 2211.08115): a decoder trained on a frozen classifier whose heatmap is the OOD score and shows
where an image is out of distribution.

The classifier (any lightning-ood method that classifies, e.g. a ``Classifier`` or ``OODformer`` checkpoint) is
frozen, kept in eval mode and never written into the decoder's checkpoints (only its path and SHA-256). The
decoder (:class:`~lightning_ood.nets.heatmap_decoder.HeatmapDecoder`) reads ``[min-max normalised pooled
penultimate feature, one-hot predicted class]`` and outputs ``h`` at the input's size and channels. Training
(pixels in ``[-1, 1]``) minimises ``mean_batch sum_pixels (1 + 5|t|) (x + h - t)^2`` with ``t = x`` for ID images
and, for auxiliary outliers, ``t`` = the ID training image of the same predicted class with the nearest feature
(:mod:`lightning_ood.methods.heatmap_targets`, computed once when training starts). Scores (higher = more OOD):

- ``heatmap``: mean over pixels of the channel-max ``|h|``;
- every library detector (MSP, Energy, Mahalanobis, ViM, ...) on the frozen classifier's logits, features and
  head, from the same forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_ood.contract import ID_KEY, OUTLIER_KEY, DetectorInputs, ModelOutputs
from lightning_ood.derived_state import check_fresh, stamp
from lightning_ood.detectors.base import Detector
from lightning_ood.distributed import all_reduce_sum
from lightning_ood.frozen import load_method
from lightning_ood.methods.base import OODMethod
from lightning_ood.methods.heatmap_targets import (
    Described,
    OutlierTargets,
    OutputCache,
    cache_outputs,
    describe,
    feature_range,
    gather_described,
    id_image_reader,
    outlier_targets,
    pixel_keys,
    share_rows,
    targets_fingerprint,
)
from lightning_ood.nets.heatmap_decoder import (
    HeatmapDecoder,
    heatmap_loss,
    heatmap_score,
    normalise_features,
    to_unit_range,
)
from lightning_ood.optim import configure_optimizers

#: Key of the heatmap (``[B, C, S, S]``, in ``(-1, 1)`` pixel units) in :attr:`ModelOutputs.extras`.
HEATMAP = "heatmap"


def _adam_paper(params: Any) -> torch.optim.Optimizer:
    """The paper's optimiser: Adam, lr 2e-4, betas (0.5, 0.999)."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))


class HeatmapOOD(OODMethod):
    """A heatmap decoder on a frozen classifier (module doc). Trains with auxiliary outliers; the best checkpoint
    has the lowest ``val/loss``: the decoder loss on held-out ID images (the ID validation split) and held-out
    outliers (``data.init_args.aux_val_fraction`` of the auxiliary set), each kind's per-image mean weighted
    equally; ``val/id_loss`` and ``val/outlier_loss`` are logged too.

    Args:
        classifier_ckpt: a trained lightning-ood method's checkpoint (``Classifier``, ``OODformer``, ...).
        num_classes, in_chans: linked from the data; must equal the classifier's.
        img_size: side of the heatmap; ``None``: the image size recorded in the classifier's checkpoint. The
            data's ``image_size`` must equal it.
        latent_dim, width: decoder sizes (:class:`~lightning_ood.nets.heatmap_decoder.HeatmapDecoder`).
        target_chunk_size: ID training features (and outliers) per block of the exact nearest-neighbour search
            for targets.
        cache_classifier_outputs: keep the frozen classifier's outputs on every ID training image and outlier
            (float32 ``(N + M) x (D + K)``, gathered to every rank) so training steps skip its forward pass;
            ``False``: nothing is gathered but the outliers' features, and every step runs the classifier (the
            same values: eval mode, fixed weights); ``None`` (auto): cache when that is at most 2 GiB
            (:data:`~lightning_ood.methods.heatmap_targets.CACHE_LIMIT_BYTES`), else not, saying so in the log.
        optimizer: injected; default the paper's Adam (lr 2e-4, betas (0.5, 0.999)).
        detectors: library detectors on the classifier's outputs (``None``: every applicable one).
        detector_cache: cache fitted detector statistics beside the tested checkpoint.
    """

    method_name = "heatmap"
    checkpoint_monitor = ("val/loss", "min")
    uses_outliers = True

    def __init__(
        self,
        classifier_ckpt: str,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int | None = None,
        latent_dim: int = 100,
        width: int = 64,
        target_chunk_size: int = 8192,
        cache_classifier_outputs: bool | None = None,
        optimizer: OptimizerCallable = _adam_paper,
        detectors: Sequence[Detector] | None = None,
        detector_cache: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["detectors"])
        path = Path(classifier_ckpt).expanduser()
        data = _trained_data(path)
        classifier = load_method(path)
        if not getattr(classifier, "classifies", False):
            raise ValueError(
                f"model.classifier_ckpt={str(path)!r} holds a {type(classifier).__name__}, which does not classify; "
                "HeatmapOOD needs a classifier's predicted class (e.g. a Classifier or OODformer checkpoint)"
            )
        self.img_size = int(img_size or data.get("image_size") or 0)
        if self.img_size < 1:
            raise ValueError(
                f"{str(path)!r} does not record the image size it was trained at: set model.init_args.img_size"
            )
        self.trained_on = _classifier_spec(classifier, data, self.img_size)
        _check_match(
            self.trained_on, {"classes": num_classes, "channels": in_chans}, str(path), "model.init_args"
        )
        self.register_frozen("classifier", classifier, source=path)
        with torch.no_grad():
            dim = classifier.forward_outputs(torch.zeros(2, in_chans, self.img_size, self.img_size)).features
        self.feature_dim = int(dim.shape[1])
        self.decoder = HeatmapDecoder(dim.shape[1], num_classes, self.img_size, in_chans, latent_dim, width)
        # global min / max of the ID training features (set when training starts, saved in the checkpoint)
        self.register_buffer("feature_min", torch.zeros(()))
        self.register_buffer("feature_max", torch.ones(()))
        self.register_buffer("pixel_mean", torch.full((in_chans,), 0.5), persistent=False)
        self.register_buffer("pixel_std", torch.full((in_chans,), 0.5), persistent=False)
        self.targets: OutlierTargets | None = None
        self.cache: OutputCache | None = None  # the classifier's outputs on the training images
        self.optimizer = optimizer
        self._val: dict[int, list[Tensor]] = {}
        # False during the detector fit pass: the detectors read only the classifier's outputs
        self._decoding = True
        self.init_detectors(detectors, detector_cache)

    # -- the method contract -----------------------------------------------------------------------------------
    @property
    def head(self) -> nn.Linear | None:
        return self.classifier.head

    @property
    def native_score_names(self) -> tuple[str, ...]:
        return ("heatmap",)

    @property
    def run_config(self) -> dict[str, Any]:
        backbone = str(self.classifier.hparams.get("backbone", ""))
        return {"method": self.method_name, "backbone": backbone, "classifier": self.hparams.classifier_ckpt}

    def forward_outputs(self, x: Tensor) -> ModelOutputs:
        """The classifier's logits ``[B, K]`` and features ``[B, D]``, extras ``{"heatmap": [B, C, S, S]}``."""
        out = self.classifier.forward_outputs(x)  # frozen: no parameter gradients (ODIN may need input ones)
        return ModelOutputs(out.logits, out.features, {HEATMAP: self.decode(out)} if self._decoding else None)

    def decode(self, out: ModelOutputs) -> Tensor:
        """The decoder's heatmap for the classifier outputs ``out``."""
        z = normalise_features(out.features.float(), self.feature_min, self.feature_max)
        return self.decoder(z, out.logits.argmax(dim=1))

    def fit_detectors(self, batches: Any = None) -> None:
        """The base class's fit pass, without decoding: the detectors read only the classifier's outputs."""
        self._decoding = False
        try:
            super().fit_detectors(batches)
        finally:
            self._decoding = True

    def native_scores(self, outputs: ModelOutputs, inputs: Tensor) -> dict[str, Tensor]:
        """``heatmap``: mean over pixels of the channel-max ``|h|`` (``[B]``, higher = more OOD)."""
        return {"heatmap": heatmap_score(outputs.extras[HEATMAP].double())}

    @torch.no_grad()
    def heatmaps(self, x: Tensor) -> Tensor:
        """``[B, C, S, S]`` heatmaps of normalised images (for pictures); the module's mode is unchanged."""
        return self.forward_outputs(x).extras[HEATMAP]

    def pixels(self, x: Tensor) -> Tensor:
        """Normalised images -> pixels in ``[-1, 1]`` (the decoder's units)."""
        return to_unit_range(x.float(), self.pixel_mean, self.pixel_std)

    # -- set-up and targets ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check the data against the classifier (size, channels, classes, normalisation); read the normalisation."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "image_size"):
            return
        data = {"classes": dm.num_classes, "channels": dm.channels, "image size": dm.image_size}
        if self.trained_on.get("mean") is not None:
            data |= {"mean": _floats(dm.mean, dm.channels), "std": _floats(dm.std, dm.channels)}
        _check_match(self.trained_on, data, self.hparams.classifier_ckpt, "the data config")
        self.pixel_mean = torch.tensor(dm.mean, dtype=torch.float32, device=self.device)
        self.pixel_std = torch.tensor(dm.std, dtype=torch.float32, device=self.device)

    def on_fit_start(self) -> None:
        """Feature range and outlier targets, once, from the frozen classifier: the ID training pass, the outlier
        pass and the target search each sharded over the ranks; only the outliers' features are gathered, and
        the ID training outputs too when caching them (:mod:`~lightning_ood.methods.heatmap_targets`, which gives
        the memory per rank)."""
        super().on_fit_start()
        fresh, computed_from = check_fresh(
            self._derived,
            "targets",
            lambda: targets_fingerprint(self),
            "HeatmapOOD feature range and targets",
        )
        if fresh and self.targets is not None:
            return
        dm = self.trainer.datamodule
        progress = self.trainer.is_global_zero

        def forward(images: Tensor) -> ModelOutputs:
            with self.trainer.precision_plugin.forward_context():
                return self.classifier.forward_outputs(images.to(self.device))

        def keys(images: Tensor) -> list[bytes]:
            return pixel_keys(images, self.pixel_mean, self.pixel_std)

        id_loader, aux_loader = dm.fit_dataloader(), dm.aux_fit_dataloader()
        n, m = len(id_loader.dataset), len(aux_loader.dataset)
        cache = cache_outputs(
            self.hparams.get("cache_classifier_outputs"), n, m, self.feature_dim, self.trained_on["classes"]
        )
        # Sharded like the detector fits: each rank describes its share; the ID share stays on its rank.
        id_share = describe(id_loader, forward, keys if cache else None, "ID train", progress)
        low, high = feature_range(id_share, self.device)
        self.feature_min.fill_(low)
        self.feature_max.fill_(high)
        aux = gather_described(
            describe(aux_loader, forward, keys, "outliers", progress), logits=cache, device=self.device
        )
        id_rows = share_rows(n, len(id_share.features))
        read = id_image_reader(dm.fit_dataset.images)  # uint8 ID training images, not augmented
        if not cache:  # only the share's features and classes go on to the search (not its logits)
            id_share = Described(
                id_share.features, torch.zeros(len(id_share.features), 0), [], id_share.classes
            )
        chunk = self.hparams.target_chunk_size
        self.targets = outlier_targets(id_share, id_rows, aux, read, chunk, self.device)
        self.cache = OutputCache.of(gather_described(id_share, device=self.device), aux) if cache else None
        stamp(self._derived, "targets", computed_from)
        rank_zero_info(
            f"HeatmapOOD: features in [{self.feature_min.item():.4g}, {self.feature_max.item():.4g}] over "
            f"{n} ID training images; targets for {len(aux.features)} outliers"
        )

    def outlier_targets(self, outliers: Tensor) -> Tensor:
        """``[B, C, S, S]`` targets in ``[-1, 1]`` of normalised outlier images (precomputed, looked up)."""
        if self.targets is None:
            raise RuntimeError("HeatmapOOD outlier targets are computed when training starts (on_fit_start)")
        keys = pixel_keys(outliers, self.pixel_mean, self.pixel_std)
        return self.targets.lookup(keys).to(outliers.device).float().div(255).mul(2).sub(1)

    # -- training ----------------------------------------------------------------------------------------------
    def per_image_loss(self, images: Tensor, targets: Tensor) -> Tensor:
        """``[B]`` decoder loss of normalised ``images`` against ``targets`` in ``[-1, 1]``.

        The classifier's outputs come from :attr:`cache` (when ``cache_classifier_outputs``) when every image
        is a (not augmented) training image or outlier seen when training started, else from a forward pass of
        the frozen classifier: the same values either way (eval mode, fixed weights).
        """
        cached = self._cached_outputs(images)
        h = self.forward_outputs(images).extras[HEATMAP] if cached is None else self.decode(cached)
        return heatmap_loss(self.pixels(images), h.float(), targets)

    def _cached_outputs(self, images: Tensor) -> ModelOutputs | None:
        """The classifier's outputs on ``images`` from :attr:`cache` (on their device), if all are cached."""
        if self.cache is None:
            return None
        cached = self.cache.get(pixel_keys(images, self.pixel_mean, self.pixel_std))
        if cached is None:
            return None
        return ModelOutputs(cached.logits.to(images.device), cached.features.to(images.device))

    def _describe(self, batch: Any) -> tuple[DetectorInputs, Tensor]:
        """The detector fit pass reads the classifier's outputs on the ID training images from :attr:`cache`
        when training just computed them (``train.py`` tests in the same process, caching), else runs the
        classifier."""
        images, targets = batch
        cached = self._cached_outputs(images) if self._trainer is not None else None
        if cached is None:
            return super()._describe(batch)
        images = images.to(self.device)
        out = ModelOutputs(cached.logits.to(self.device), cached.features.to(self.device))
        return self._inputs_from(out, images)[0], targets.to(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        (images, _), (outliers, _) = batch[ID_KEY], batch[OUTLIER_KEY]
        x = torch.cat([images, outliers])
        targets = torch.cat([self.pixels(images), self.outlier_targets(outliers)])
        loss = self.per_image_loss(x, targets).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = {0: [], 1: []}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """``dataloader_idx`` 0: ID validation images (target: themselves); 1: held-out outliers."""
        images, _ = batch
        targets = self.pixels(images) if dataloader_idx == 0 else self.outlier_targets(images)
        self._val[dataloader_idx].append(self.per_image_loss(images, targets).detach().double())

    def on_validation_epoch_end(self) -> None:
        means = []
        for idx, name in ((0, "val/id_loss"), (1, "val/outlier_loss")):
            losses = torch.cat(
                self._val.get(idx) or [torch.zeros(0, dtype=torch.float64, device=self.device)]
            )
            total = all_reduce_sum(torch.stack([losses.sum(), losses.new_tensor(float(len(losses)))]))
            if total[1] > 0:  # the kind's per-image mean over every rank's images
                means.append(total[0] / total[1])
                self.log(name, means[-1].float())
        if means:
            self.log("val/loss", torch.stack(means).mean().float(), prog_bar=True)
        self._val = {}

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self, self.optimizer, None, "epoch")


def _trained_data(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"model.classifier_ckpt={str(path)!r} does not exist; train a classifier first (e.g. python train.py "
            "--config configs/quickstart.yaml) and pass its best checkpoint"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return dict(ckpt.get("datamodule_hyper_parameters", {}))


def _floats(value: Any, channels: int) -> tuple[float, ...]:
    values = [value] * channels if isinstance(value, int | float) else list(value)
    return tuple(round(float(v), 6) for v in values)


def _classifier_spec(classifier: nn.Module, data: dict[str, Any], img_size: int) -> dict[str, Any]:
    """What the classifier was trained for: classes, channels, image size and normalisation (when recorded)."""
    hp = classifier.hparams
    channels = int(data.get("channels") or hp.get("in_chans") or 3)
    head = getattr(classifier, "head", None)
    classes = head.out_features if isinstance(head, nn.Linear) else int(hp.get("num_classes"))
    spec: dict[str, Any] = {"classes": classes, "channels": channels, "image size": img_size}
    if data.get("mean") is not None and data.get("std") is not None:
        spec |= {"mean": _floats(data["mean"], channels), "std": _floats(data["std"], channels)}
    return spec


def _check_match(trained: dict[str, Any], given: dict[str, Any], ckpt: str, where: str) -> None:
    """Fail, naming both sides, when ``given`` differs from what the classifier was ``trained`` for."""
    wrong = [k for k, v in given.items() if k in trained and trained[k] != v]
    if wrong:
        theirs = ", ".join(f"{k} {trained[k]}" for k in wrong)
        ours = ", ".join(f"{k} {given[k]}" for k in wrong)
        raise ValueError(
            f"the classifier checkpoint {ckpt!r} was trained with {theirs}, but {where} has {ours}; use the data "
            "config the classifier was trained with, or a classifier trained on this data"
        )
