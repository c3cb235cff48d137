"""``lightning-ood <command> ...`` (and ``python -m lightning_ood <command> ...``): the package's programs.

    lightning-ood fit     --config quickstart.yaml          train, then test the best checkpoint (train.py)
    lightning-ood test    --config CFG --ckpt_path CKPT      test a checkpoint or a frozen model (evaluate.py)
    lightning-ood score   --config CFG --ckpt_path CKPT --images DIR    score a folder of images
    lightning-ood compare RUN_DIR ... --out comparison/      one table over many runs

``lightning-ood <command> --help`` lists a command's options. A ``.yaml`` argument that is not a file where
given is looked up among the configs shipped with the package (``quickstart.yaml``, ``data/cifar10.yaml``, ...).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

_USAGE = __doc__.split("\n\n")[1]


def _commands() -> dict[str, Callable[[None], object]]:
    from lightning_ood import compare, score
    from lightning_ood.cli import evaluate, train

    return {"fit": train, "test": evaluate, "score": score.score, "compare": compare.main}


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``argv[0]`` (``fit`` / ``test`` / ``score`` / ``compare``) with the remaining arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    names = ("fit", "test", "score", "compare")
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: lightning-ood {{{','.join(names)}}} ...\n\n{_USAGE}")
        raise SystemExit(0 if args else 2)
    if args[0] not in names:
        print(f"error: unknown command {args[0]!r}: use one of {', '.join(names)}", file=sys.stderr)
        raise SystemExit(2)
    saved = sys.argv
    # The programs read their arguments from sys.argv (as when run as scripts); --help names the command.
    sys.argv = [f"lightning-ood {args[0]}", *args[1:]]
    try:
        _commands()[args[0]](None)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
