"""Shared test settings: CPU only, few threads, W&B offline and quiet, caches in a temporary folder."""

import os
from pathlib import Path

import pytest
import torch
from data_helpers import write_fashion_mnist  # tests/data_helpers.py

from lightning_ood.data import sources

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    """Run every test from the repository root so config paths resolve."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True, scope="session")
def _cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Data checks and file digests are remembered in a folder of the test session, not in ``~/.cache``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIGHTNING_OOD_CACHE", str(tmp_path_factory.mktemp("lightning_ood_cache")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _runs_without_a_logger_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """A CLI run without a logger writes into ``logs/run-*`` under the working directory (the repository root in
    the tests): point it at the test session's folder instead, so the suite leaves nothing in the checkout."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lightning_ood.cli.NO_LOGGER_ROOT", str(tmp_path_factory.mktemp("logs")))
        yield


@pytest.fixture
def no_system_fmnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hide the Fashion-MNIST of the machine; returns the fake system folder (empty)."""
    nowhere = tmp_path / "system-fashion-mnist"
    monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST_DIRS", (nowhere,))
    return nowhere


@pytest.fixture
def fmnist_root(tmp_path: Path, no_system_fmnist: Path) -> str:
    write_fashion_mnist(tmp_path / "root" / "fashion-mnist")
    return str(tmp_path / "root")


# -- tiny frozen encoders (tests/encoder_helpers.py), built once per session, no downloads ---------------------
@pytest.fixture(scope="session")
def timm_weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random timm ``test_vit`` (32 px) weights in a file, loaded like real weights."""
    from encoder_helpers import TIMM_KWARGS, timm_weights

    return timm_weights(tmp_path_factory.mktemp("timm"), **TIMM_KWARGS)


@pytest.fixture(scope="session")
def clip_checkpoint_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registered tiny OpenCLIP architecture and a file with its random weights."""
    pytest.importorskip("open_clip")
    from encoder_helpers import clip_checkpoint

    return clip_checkpoint(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def classifier_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lightning-ood Classifier checkpoint (timm test_resnet, 2 steps on digits_tiny)."""
    from encoder_helpers import classifier_checkpoint

    previous = os.getcwd()
    os.chdir(Path(__file__).resolve().parents[1])  # session fixtures run before the per-test chdir
    try:
        return classifier_checkpoint(tmp_path_factory.mktemp("classifier"))
    finally:
        os.chdir(previous)
