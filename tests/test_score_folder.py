"""Scoring a folder of images with a trained checkpoint (``python -m lightning_ood.score``): one CSV row per
image with its path, predicted class and every score, equal to the scores of the method's own forward pass,
and ``is_ood`` at 95 % ID-validation recall (against a brute-force threshold); unreadable files, existing
outputs."""

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


def _brute_threshold(id_scores: list[float], recall: float) -> float:
    """The smallest observed score that keeps >= recall of the ID scores at or below it (every candidate tried)."""
    return min(t for t in id_scores if sum(s <= t for s in id_scores) >= recall * len(id_scores) - 1e-12)


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
    args = [*TINY, *FAST, f"--ckpt_path={ckpt}", f"--images={tmp_path / 'images'}"]
    out = score(args)  # the config's W&B logger: scoring logs nothing unless --log_run=true
    assert out == tmp_path / "images" / "ood_scores.csv"
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]) for r in rows] == paths
    names = list(cli.model.score_names)
    assert list(rows[0]) == ["path", "pred", "pred_name", *names, "is_ood"]
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
    # is_ood: msp above the threshold that keeps 95 % of the ID validation images (brute force over candidates)
    with torch.no_grad():
        val = [-model.forward_outputs(x).logits.softmax(dim=1).amax(dim=1) for x, _ in dm.val_dataloader()]
    id_val = torch.cat(val).double().tolist()
    t = _brute_threshold(id_val, 0.95)
    assert sum(s <= t for s in id_val) >= 0.95 * len(id_val)
    assert [int(r["is_ood"]) for r in rows] == [int(float(r["msp"]) > t) for r in rows]
    # a second scoring never silently replaces the first one's file
    with pytest.raises(FileExistsError, match="--overwrite=true"):
        score(args)
    # an unreadable file fails, naming the option that leaves it out; with it the file is skipped
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="--skip_unreadable=true"):
        score([*args, "--overwrite=true"])
    out = score([*args, "--overwrite=true", "--skip_unreadable=true", "--threshold=-0.5"])
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]) for r in rows] == paths
    assert [int(r["is_ood"]) for r in rows] == [int(float(r["msp"]) > -0.5) for r in rows]
    assert not (tmp_path / "wandb").exists() and not Path("wandb").exists()


def test_predict_step_of_a_method_without_logits(tmp_path):
    model = ToyEncoder(detectors=[])
    images = torch.randn(5, 1, 16, 16)
    out = model.predict_step((images, torch.arange(5)), 0)
    assert out.preds is None and set(out.scores) == {"feature_norm"}
    torch.testing.assert_close(out.scores["feature_norm"], model.net(images).norm(dim=1).double())


def test_score_needs_images(tmp_path):
    with pytest.raises(ValueError, match="--images is required"):
        score([*TINY, *FAST, "--trainer.logger=false"])
