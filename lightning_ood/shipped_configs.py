"""The YAML configs shipped with the package, so ``--config quickstart.yaml`` works from an installed wheel.

A wheel carries the repository's ``configs/`` folder as ``lightning_ood/configs`` (package data, see
``pyproject.toml``); a source checkout has it beside the package. A config argument that is not a file where
it is given (e.g. ``--config configs/quickstart.yaml`` run outside the checkout) is looked up there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_SUFFIXES = (".yaml", ".yml")


def shipped_configs_dir() -> Path | None:
    """``lightning_ood/configs`` in an installed package, else ``configs/`` of the source checkout, else ``None``."""
    for candidate in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if (candidate / "quickstart.yaml").is_file():
            return candidate
    return None


def shipped_config(value: str) -> Path | None:
    """The shipped config a path names (``configs/quickstart.yaml``, ``quickstart.yaml``, ``data/cifar10.yaml``),
    or ``None``."""
    root = shipped_configs_dir()
    if root is None or not value.endswith(_SUFFIXES):
        return None
    name = value.removeprefix("./").removeprefix("configs/")
    path = root / name
    return path if path.is_file() else None


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with every ``.yaml`` value that is not a file where given replaced by the shipped config of that
    name (``--config configs/quickstart.yaml``, ``--data=data/cifar10.yaml``, ...); other values unchanged."""
    out = []
    for token in args:
        key, eq, value = token.partition("=") if token.startswith("--") else ("", "", token)
        if token.startswith("--") and not eq:
            out.append(token)
            continue
        shipped = None if Path(value).exists() else shipped_config(value)
        out.append(f"{key}{eq}{shipped}" if shipped and eq else str(shipped) if shipped else token)
    return out
