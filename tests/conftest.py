"""Shared test settings: CPU only, few threads, W&B offline and quiet."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)

TINY = ["--data", "configs/data/digits_tiny.yaml", "--model", "configs/model/classifier_tiny.yaml"]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    """Run every test from the repository root so config paths resolve."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
