"""Shared test settings: CPU only, few threads, W&B offline and quiet."""

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
