r"""``seeds``: the runs of one configuration (its seeds), selected scores, mean ± std per group and per OOD set.

    python -m lightning_ood.compare seeds 'results/quickstart/fashionmnist/classifier/seed*' --title "..."
    python -m lightning_ood.compare seeds 'results/quickstart/fashionmnist/heatmap/seed*' \
        --scores heatmap msp energy --best-of mahalanobis rmd knn vim class_mean_euclidean class_mean_cosine
    python -m lightning_ood.compare seeds --runs ssod='results/ssod/compare/fashionmnist/ssod/seed*' \
        --runs baseline='results/ssod/compare/fashionmnist/baseline/seed*' --per-set auroc fpr95_idpos

Rows are scores (every score of the first run, or ``--scores`` in that order; a ``*`` pattern expands to the
matching scores, sorted; ``@best`` places the ``--best-of`` choice, else it comes last). ``--best-of``: the
score among those named with the highest mean ``all`` AUROC over the runs: chosen on the test sets, so an
optimistic baseline, not a tuned method. ``--runs LABEL=GLOB`` (repeated) puts several methods in one table,
rows ``LABEL: score``. Columns: ``--group-metrics`` per group mean (near / far, and all when both exist), then a
table per ``--per-set`` metric over the OOD sets. Cells: mean ± sample std over the runs, in %.
"""

from __future__ import annotations

import fnmatch
import statistics
from collections.abc import Sequence

from lightning_ood.compare import Run
from lightning_ood.compare_tables.common import (
    Rows,
    environments,
    group_columns,
    id_accuracy,
    score_table,
    set_columns,
)

GROUP_METRICS = ("auroc", "fpr95_idpos", "fpr95_oodpos")
BEST = "@best"


def best_of(runs: Sequence[Run], names: Sequence[str]) -> str:
    """The first of ``names`` with the highest mean ``all`` AUROC over ``runs`` (absent scores never win)."""

    def mean_auroc(name: str) -> float:
        hits = [r["auroc"] for run in runs for r in run.rows if r["detector"] == name and r["set"] == "all"]
        return statistics.fmean(hits) if hits else float("-inf")

    return max(names, key=mean_auroc)


def chosen_scores(rows: Rows, scores: Sequence[str] | None, best: str | None) -> list[str]:
    """The row order: ``scores`` with patterns expanded against ``rows`` and ``@best`` replaced by ``best``."""
    present = list(dict.fromkeys(r["detector"] for r in rows))
    if scores is None:
        out = present
    else:
        out = []
        for s in scores:
            if s == BEST:
                out += [best] if best else []
            elif any(c in s for c in "*?["):
                out += sorted(d for d in present if fnmatch.fnmatchcase(d, s))
            elif s in present:
                out.append(s)
    if best and best not in out:
        out.append(best)
    return list(dict.fromkeys(out))


def _picked(run: Run, order: Sequence[str], label: str | None) -> Rows:
    rows = [r for r in run.rows if r["detector"] in order]
    rows.sort(key=lambda r: order.index(r["detector"]))
    return [{**r, "detector": f"{label}: {r['detector']}"} for r in rows] if label else rows


def seeds_tables(
    labelled: dict[str | None, list[Run]],
    title: str,
    scores: Sequence[str] | None = None,
    best: Sequence[str] | None = None,
    mark_best: bool = False,
    group_metrics: Sequence[str] = GROUP_METRICS,
    per_set: Sequence[str] = ("auroc",),
) -> str:
    """The Markdown of the ``seeds`` kind; ``labelled`` maps a label (``None``: no label) to its runs."""
    every = [run for runs in labelled.values() for run in runs]
    chosen = best_of(every, best) if best else None
    tables: list[Rows] = []
    for label, runs in labelled.items():
        order = chosen_scores(runs[0].rows, scores, chosen)
        if not order:
            raise SystemExit(f"none of the scores {list(scores or [])} in {runs[0].path}")
        for i, run in enumerate(runs):
            picked = _picked(run, order, label)
            if mark_best and chosen:
                name = f"{label}: {chosen}" if label else chosen
                for r in picked:
                    if r["detector"] == name:
                        r["detector"] = f"{name} (best feature detector, chosen on test)"
            if len(tables) <= i:
                tables.append([])
            tables[i] += picked
    first = next(iter(labelled.values()))[0].rows
    groups, sets = group_columns(first), set_columns(first)
    blocks = [f"### {title}\n"]
    if list(labelled) == [None]:
        blocks.append(f"{id_accuracy([r.rows for r in every])}; every metric in %, mean ± std over seeds.\n")
        blocks.append(f"Environment: {environments([r.info for r in every])}.\n")
    else:
        blocks += [f"- {label}: {id_accuracy([r.rows for r in runs])}" for label, runs in labelled.items()]
    if chosen:
        blocks.append(
            f"Best of {', '.join(best or [])} (highest mean `all` AUROC, read on the test sets): `{chosen}`.\n"
        )
    if list(labelled) != [None]:
        blocks.append("\nEvery metric in %, mean ± std over seeds. Group means:\n")
    elif tuple(group_metrics) == GROUP_METRICS:
        blocks.append(
            "Group means: AUROC, FPR95 with ID positive (`fpr95_idpos`) and with OOD positive (`fpr95_oodpos`).\n"
        )
    else:
        blocks.append(f"Group means: {', '.join(f'`{m}`' for m in group_metrics)}.\n")
    blocks.append(score_table(tables, group_metrics, groups))
    for metric in per_set:
        single = list(labelled) == [None] and metric == "auroc" and len(per_set) == 1
        blocks.append("AUROC per OOD set.\n" if single else f"`{metric}` per OOD set.\n")
        blocks.append(score_table(tables, (metric,), sets))
    return "".join(b + "\n" for b in blocks)
