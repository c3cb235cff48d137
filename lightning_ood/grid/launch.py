"""``python -m lightning_ood.grid.launch {train|evaluate} ARGS...``: what ``train.py`` / ``evaluate.py`` do, from
anywhere the package is installed (the grid runs every run this way)."""

from __future__ import annotations

import sys

from lightning_ood.cli import evaluate, train


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("train", "evaluate"):
        raise SystemExit("usage: python -m lightning_ood.grid.launch {train|evaluate} ARGS...")
    (train if argv[0] == "train" else evaluate)(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
