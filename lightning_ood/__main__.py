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


def _commands() -> dict[str, Callable[[list[str]], object]]:
    from lightning_ood import compare, score
    from lightning_ood.cli import evaluate, train

    return {"fit": train, "test": evaluate, "score": score.score, "compare": compare.main}


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``argv[0]`` (``fit`` / ``test`` / ``score`` / ``compare``) with the remaining arguments.

    The LightningCLI programs drop their own command word (``fit`` / ``test`` / ``score``), so under DDP the
    processes Lightning starts from this command line run the same command.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    names = ("fit", "test", "score", "compare")
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: lightning-ood {{{','.join(names)}}} ...\n\n{_USAGE}")
        raise SystemExit(0 if args else 2)
    if args[0] not in names:
        print(f"error: unknown command {args[0]!r}: use one of {', '.join(names)}", file=sys.stderr)
        raise SystemExit(2)
    _commands()[args[0]](args if args[0] != "compare" else args[1:])


if __name__ == "__main__":
    main()
