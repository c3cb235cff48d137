"""The table kinds of ``python -m lightning_ood.compare <kind> ...`` beside its full method x detector table.

    seeds     the runs of one configuration: selected scores, a best-of baseline, per group and per OOD set
    headline  per method group its own scores and baselines, with 95 % bootstrap intervals (the results page)
    attack    clean vs attacked OOD sets of one attack run
    sweep     one row per setting of an override sweep, chosen on a validation metric only
    moved     which rows moved between two runs of the same configuration, and by how much

Every kind reads run directories, globs of them or ``ood_results.json`` files (as ``compare`` does) and prints
Markdown; ``--out FILE`` also writes it. Values in %; AUROC higher is better, FPR95 lower is better.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from lightning_ood.callbacks.results import atomic_write

KINDS = ("seeds", "headline", "attack", "sweep", "moved")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_ood.compare",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    seeds = sub.add_parser("seeds", help="one configuration's seeds: selected scores, groups, OOD sets")
    seeds.add_argument("runs", nargs="*", help="run directories, globs or ood_results.json files")
    seeds.add_argument(
        "--runs",
        dest="labelled",
        action="append",
        default=[],
        metavar="LABEL=GLOB",
        help="a labelled set of runs (repeat: one table of several methods, rows LABEL: score)",
    )
    seeds.add_argument("--title", default="Results")
    seeds.add_argument("--scores", nargs="+", help="rows, in this order (patterns like 'diffguard_*'; @best)")
    seeds.add_argument(
        "--best-of", nargs="+", help="add the best of these scores (mean `all` AUROC, on test)"
    )
    seeds.add_argument(
        "--mark-best", action="store_true", help="say in its row that the best was chosen on test"
    )
    seeds.add_argument("--group-metrics", nargs="+", default=["auroc", "fpr95_idpos", "fpr95_oodpos"])
    seeds.add_argument("--per-set", nargs="*", default=["auroc"], help="metrics of the per-OOD-set tables")
    head = sub.add_parser("headline", help="per method group, its own scores and baselines, with intervals")
    head.add_argument("runs", nargs="+")
    head.add_argument("--title", default="Results")
    head.add_argument("--headline", nargs="+", default=[], metavar="METHOD=S1,S2", help="a method's scores")
    attack = sub.add_parser("attack", help="clean vs attacked OOD sets of one attack run")
    attack.add_argument("run")
    sweep = sub.add_parser("sweep", help="an override sweep, chosen on a validation metric")
    sweep.add_argument("runs", nargs="+")
    sweep.add_argument("--vary", nargs="+", required=True, help="config keys, e.g. model.init_args.gamma")
    sweep.add_argument("--choose-by", default="val/acc", help="the CSV-log metric to choose by (highest)")
    sweep.add_argument("--scores", nargs="+", default=["ssod", "msp"])
    sweep.add_argument("--groups", nargs="+", default=["near", "far"])
    sweep.add_argument("--metric", nargs="+", default=["auroc", "fpr95_idpos"])
    sweep.add_argument("--title", default="Sweep")
    moved = sub.add_parser("moved", help="which rows moved between two runs")
    moved.add_argument("before")
    moved.add_argument("after")
    moved.add_argument("--tol", type=float, default=0.0, help="changes at most this large count as unchanged")
    for p in (seeds, head, attack, sweep, moved):
        p.add_argument("--out", type=Path, help="also write the Markdown to this file")
    return parser  # fmt: skip


def _labelled(args: argparse.Namespace) -> dict[str | None, list]:
    from lightning_ood.compare import find_runs

    if args.runs and args.labelled:
        raise SystemExit("seeds: pass runs either as positional arguments or as --runs LABEL=GLOB, not both")
    if args.runs:
        return {None: find_runs(args.runs)}
    out: dict[str | None, list] = {}
    for item in args.labelled:
        label, sep, pattern = item.partition("=")
        if not sep or not label:
            raise SystemExit(f"--runs {item!r}: expected LABEL=GLOB")
        out[label] = find_runs([pattern])
    if not out:
        raise SystemExit("seeds: no runs given")
    return out


def render(argv: Sequence[str]) -> str:
    """The Markdown of the table kind ``argv[0]`` with its arguments ``argv[1:]``."""
    from lightning_ood.compare import find_runs
    from lightning_ood.compare_tables import attack, headline, moved, seeds, sweep

    args = _parser().parse_args(list(argv))
    if args.kind == "seeds":
        text = seeds.seeds_tables(
            _labelled(args), args.title, args.scores, args.best_of, args.mark_best, args.group_metrics,
            args.per_set,
        )  # fmt: skip
    elif args.kind == "headline":
        lists = dict(headline.HEADLINE)
        for item in args.headline:
            method, sep, scores = item.partition("=")
            if not sep:
                raise SystemExit(f"--headline {item!r}: expected METHOD=S1,S2")
            lists[method] = tuple(s for s in scores.split(",") if s)
        text = headline.headline_table(find_runs(args.runs), args.title, lists)
    elif args.kind == "attack":
        runs = find_runs([args.run])
        if len(runs) != 1:
            raise SystemExit(f"attack: pass one attack run, found {len(runs)} under {args.run}")
        text = attack.attack_table(runs[0])
    elif args.kind == "sweep":
        text = sweep.sweep_table(
            find_runs(args.runs), args.vary, args.title, args.choose_by, args.scores, args.groups, args.metric
        )
    else:
        before, after = (find_runs([p]) for p in (args.before, args.after))
        if len(before) != 1 or len(after) != 1:
            raise SystemExit("moved: pass exactly one run (or ood_results.json) before and one after")
        text = moved.moved_table(before[0].rows, after[0].rows, args.tol)
    if args.out:
        atomic_write(args.out, text)
    return text


def main(argv: Sequence[str]) -> str:
    """Print (and return) the table ``render(argv)`` makes."""
    text = render(argv)
    print(text, end="")
    return text
