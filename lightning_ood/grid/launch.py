"""``python -m lightning_ood.grid.launch {train|evaluate} ARGS...``: what ``train.py`` / ``evaluate.py`` do, from
anywhere the package is installed (the grid runs every run this way).

Config files named by ``--config`` / ``--data`` / ``--model`` / ``--trainer`` are checked before the CLI (and
Lightning, torch, timm) is imported, so a mistyped path fails in a fraction of a second, not after the imports.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

FILE_KEYS = ("--config", "--data", "--model", "--trainer")


def missing_configs(args: Sequence[str]) -> list[str]:
    """The YAML files named by ``FILE_KEYS`` arguments (``--key FILE`` or ``--key=FILE``) that do not exist."""
    missing = []
    for i, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if not sep:
            value = args[i + 1] if i + 1 < len(args) else ""
        if key in FILE_KEYS and value.endswith((".yaml", ".yml")) and not Path(value).is_file():
            missing.append(f"{key} {value}")
    return missing


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("train", "evaluate"):
        raise SystemExit("usage: python -m lightning_ood.grid.launch {train|evaluate} ARGS...")
    missing = missing_configs(argv[1:])
    if missing:
        print(
            f"error: config files not found (relative to {Path.cwd()}): {', '.join(missing)}", file=sys.stderr
        )
        raise SystemExit(2)
    from lightning_ood.cli import evaluate, train

    (train if argv[0] == "train" else evaluate)(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
