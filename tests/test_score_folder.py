"""Scoring a folder of images with a trained checkpoint (``python -m lightning_ood.score``): one CSV row per
image with its path, predicted class and every score, equal to the scores of the method's own forward pass."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import FAST, TINY, csv_logger
from PIL import Image
from toy_method import ToyEncoder

from lightning_ood.cli import train
from lightning_ood.score import score


def _write_pngs(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    paths = []
    for i in range(n):
        path = folder / ("sub" if i % 2 else "") / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(path)
        paths.append(path)
    return sorted(paths)


def test_score_a_folder_writes_one_row_per_image(tmp_path):
    cli = train([*TINY, *FAST, *csv_logger(tmp_path / "run"), "--trainer.max_epochs=1"])
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    paths = _write_pngs(tmp_path / "images", 7)
    out = score(
        [*TINY, *FAST, "--trainer.logger=false", f"--ckpt_path={ckpt}", f"--images={tmp_path / 'images'}"]
    )
    assert out == tmp_path / "images" / "ood_scores.csv"
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]) for r in rows] == paths
    names = list(cli.model.score_names)
    assert list(rows[0]) == ["path", "pred", "pred_name", *names]
    # the same numbers as the method's own forward pass on those images (prepared as the data module does)
    dm = cli.datamodule
    assert dm.set_predict_images(tmp_path / "images") == paths
    batch = next(iter(dm.predict_dataloader()))
    model = cli.model.eval()
    with torch.no_grad():
        logits = model.forward_outputs(batch[0]).logits
    msp = -logits.softmax(dim=1).amax(dim=1)
    assert [float(r["msp"]) for r in rows] == pytest.approx(msp.tolist(), abs=1e-6)
    assert [int(r["pred"]) for r in rows] == logits.argmax(dim=1).tolist()
    assert rows[0]["pred_name"] in dm.class_names


def test_predict_step_of_a_method_without_logits(tmp_path):
    model = ToyEncoder(detectors=[])
    images = torch.randn(5, 1, 16, 16)
    out = model.predict_step((images, torch.arange(5)), 0)
    assert out.preds is None and set(out.scores) == {"feature_norm"}
    torch.testing.assert_close(out.scores["feature_norm"], model.net(images).norm(dim=1).double())


def test_score_needs_images(tmp_path):
    with pytest.raises(ValueError, match="--images is required"):
        score([*TINY, *FAST, "--trainer.logger=false"])
