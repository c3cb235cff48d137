"""``attack``: AUROC on clean vs attacked OOD images, from one attack run (docs/frozen_encoders.md).

    python -m lightning_ood.compare attack results/quickstart/fashionmnist/attack/seed0

Rows: scores (``knn`` has the attack targets in its bank, ``knn_without_targets`` not); columns: for each
attacked set the AUROC of ``<set>_clean`` and of each attacked variant (``<set>_smooth``, ``<set>_patchy``),
then the means over the attacked sets. Values in %.
"""

from __future__ import annotations

import statistics

from lightning_ood.compare import Run
from lightning_ood.compare_tables.common import Rows


def attack_rows(rows: Rows) -> str:
    """Two Markdown tables of AUROC (%): per score the means over the attacked sets of each variant, then per
    attacked set and variant every score."""
    auroc = {(r["detector"], r["set"]): 100 * r["auroc"] for r in rows if r["kind"] == "set"}
    names = list(dict.fromkeys(s for _, s in auroc))
    scores = list(dict.fromkeys(d for d, _ in auroc))
    sets = [s.removesuffix("_clean") for s in names if s.endswith("_clean")]
    if not sets:
        raise SystemExit("no attacked sets (<set>_clean) in the results: pass an attack run")
    suffixes = (s.removeprefix(f"{base}_") for base in sets for s in names if s.startswith(f"{base}_"))
    variants = list(dict.fromkeys(["clean", *suffixes]))
    lines = [f"Means over the {len(sets)} attacked sets ({', '.join(sets)}).", ""]
    lines += ["| score | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for det in scores:
        means = [statistics.fmean(auroc[(det, f"{s}_{v}")] for s in sets) for v in variants]
        lines.append(f"| {det} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    lines += ["", "Per attacked set.", "", "| set | variant | " + " | ".join(scores) + " |"]
    lines.append("|---|---|" + "---:|" * len(scores))
    for base in sets:
        for v in variants:
            cells = " | ".join(f"{auroc[(d, f'{base}_{v}')]:.1f}" for d in scores)
            lines.append(f"| {base} | {v} | {cells} |")
    return "\n".join(lines) + "\n"


def attack_table(run: Run) -> str:
    title = f"#### Feature-matching attack ({run.info.get('backbone', '')}), AUROC % clean vs attacked\n"
    return title + "\n" + attack_rows(run.rows) + "\n"
