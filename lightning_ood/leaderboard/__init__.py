"""Published results to put beside a run's: OpenOOD v1.5's leaderboard (``openood_v15.json`` in this package).

The file holds, verbatim, the leaderboard's rows of each benchmark's standard classifier (written by
``benchmarks/openood_leaderboard.py`` from github.com/zjysteven/OpenOOD ``results/*.csv``; source commit and date
inside): near- and far-OOD AUROC and ID accuracy in percent, ``"mean ± std"`` over 3 training runs. The
leaderboard publishes no FPR95 and no mean over all OOD sets, so those cells stay empty: nothing is computed
from the published numbers, they are only parsed and converted from percent to fractions (the unit of
lightning-ood's result rows).

``python -m lightning_ood.compare <runs> --reference openood_v15_cifar10`` adds one row per published detector
that lightning-ood also has (its ``detector`` name), marked as published, beside the runs' rows.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import Any

from lightning_ood.contract import MEAN_GROUPS

#: The reference tables shipped with the package (``--reference`` names a benchmark of one of them).
FILES = ("openood_v15.json",)
_VALUE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:±\s*(\d+(?:\.\d+)?))?\s*$")


@cache
def load(file: str = "openood_v15.json") -> dict[str, Any]:
    """The parsed reference file ``file`` of this package."""
    return json.loads(resources.files(__package__).joinpath(file).read_text(encoding="utf-8"))


def benchmarks() -> dict[str, tuple[str, dict[str, Any]]]:
    """``{benchmark name: (file, its table)}`` over every shipped file."""
    return {name: (f, table) for f in FILES for name, table in load(f)["benchmarks"].items()}


def parse_value(text: str) -> tuple[float, float | None]:
    """``"88.03 ± 0.25"`` -> ``(0.8803, 0.0025)``; ``"76.02"`` -> ``(0.7602, None)`` (percent -> fraction)."""
    match = _VALUE.match(text)
    if match is None:
        raise ValueError(f"not a published 'mean ± std' percentage: {text!r}")
    mean, std = match.groups()
    return round(float(mean) / 100, 8), (round(float(std) / 100, 8) if std is not None else None)


def reference_records(name: str, metrics: list[str]) -> list[dict[str, Any]]:
    """Compare records (see :func:`lightning_ood.compare.summarise`) of benchmark ``name``'s published rows
    that map to a lightning-ood detector; metrics other than ``near`` / ``far`` ``auroc`` are ``None``.

    Raises:
        SystemExit: for an unknown benchmark, listing the known ones.
    """
    known = benchmarks()
    if name not in known:
        raise SystemExit(f"--reference {name!r}: no such published table; known: {', '.join(sorted(known))}")
    file, table = known[name]
    source = load(file)
    label = f"{source['name']} (published, {source['date']}) / {table['backbone']} / {name}"
    records = []
    for row in table["rows"]:
        if row["detector"] is None:
            continue
        published = {"near/auroc": parse_value(row["near_auroc"]), "far/auroc": parse_value(row["far_auroc"])}
        runs = 3 if published["near/auroc"][1] is not None else 1
        record: dict[str, Any] = {"group": label, "detector": row["detector"], "runs": runs}
        record["id_acc"] = parse_value(row["id_accuracy"])
        for group in MEAN_GROUPS:
            for metric in metrics:
                record[f"{group}/{metric}"] = published.get(f"{group}/{metric}")
        records.append(record)
    return records
