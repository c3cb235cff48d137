"""One table over many runs: method x detector x near / far / all, mean ± std over seeds.

    python -m lightning_ood.compare results/**/seed*  --out comparison/
    python -m lightning_ood.compare 'results/*/*/seed*' --out comparison/ --metric auroc fpr95_idpos
    python -m lightning_ood.compare logs/openood_cifar10/ --reference openood_v15_cifar10

Every argument is a run directory (or a glob of them, or a directory holding runs further down): each
``ood_results.json`` found under it is one run. Runs are grouped by the run's method, backbone and dataset,
and by every model or training-budget setting that differs between runs of that method (e.g.
``gamma=0.9``); the seed is what varies inside a group. File paths (the checkpoints a run was built on) do
not split groups. Runs of one group whose *data* configurations differ (other than the split seed, the data
root and loader settings) are refused, naming the setting and the values: their numbers are not comparable.

A detector's settings are part of its identity: when runs of a group evaluated detectors of one name with
other hyperparameters, each setting gets its own row (``knn(k=1)``, ``knn(k=50)``). A row averages the runs
that evaluated that detector; two of them that evaluated the same checkpoint, or were trained with the same
seeds (training and split seed), are refused, naming both runs: one model would count as two seeds. A cell
averaged over fewer runs than its row's ``runs`` says so (``80.1 (n=1)``); ``-``: no run has the value.

Writes ``comparison.md``, ``comparison.csv`` (mean and std in separate columns) and ``comparison.png``
(AUROC vs FPR95 on the ``all`` group, one point per method and detector, error bars = std over seeds).

Other table kinds (``seeds``, ``headline``, ``attack``, ``sweep``, ``moved``): ``python -m lightning_ood.compare
<kind> --help`` (lightning_ood/compare_tables).
``--reference NAME`` adds a benchmark's published rows (:mod:`lightning_ood.leaderboard`), marked as published.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_ood.callbacks.results import atomic_write, read_results
from lightning_ood.compare_tables import KINDS as TABLE_KINDS
from lightning_ood.compare_tables import main as table_kind
from lightning_ood.contract import MEAN_GROUPS
from lightning_ood.leaderboard import reference_records

#: Data settings that may differ between the runs of a group (they do not change which images are used).
DATA_KEYS_IGNORED = ("seed", "root", "download", "num_workers", "eval_batch_size")
#: Training settings, besides the model's, that make a different variant of a method.
BUDGET_KEYS = ("trainer.max_epochs", "trainer.max_steps")


@dataclass
class Run:
    path: Path
    info: dict[str, Any]
    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    def detector_setting(self, name: str) -> str:
        """The class and hyperparameters of the run's detector ``name`` (``""`` when not recorded)."""
        return str(self.info.get("detectors", {}).get(name, ""))

    def replicate(self) -> tuple[str | None, tuple[str, str] | None]:
        """What makes this run another sample of its group: the checkpoint, and the (training, split) seeds."""
        seed = self.info.get("seed")
        seeds = None if seed in (None, "") else (str(seed), str(self.info.get("data_seed")))
        return self.info.get("ckpt_path") or None, seeds


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list):
        return {prefix[:-1]: repr(tree)}
    return {prefix[:-1]: tree}


def find_runs(patterns: Sequence[str]) -> list[Run]:
    """Every run (a directory with ``ood_results.json``) at or below the given paths or globs."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or [pattern]
        for match in map(Path, matches):
            if match.is_file() and match.name == "ood_results.json":
                files[match.resolve()] = None
            elif match.is_dir():
                files.update(dict.fromkeys(p.resolve() for p in sorted(match.rglob("ood_results.json"))))
    if not files:
        raise SystemExit(f"no ood_results.json at or below {list(patterns)}; pass run directories or a glob")
    runs = []
    for path in files:
        info, rows = read_results(path)
        config_file = path.parent / "config.yaml"
        config = _flatten(yaml.safe_load(config_file.read_text())) if config_file.is_file() else {}
        runs.append(Run(path.parent, info, rows, config))
    return runs


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and ("/" in value or value.endswith((".ckpt", ".pt", ".safetensors")))


def _varying(runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
    """The keys whose value differs between ``runs`` (file paths left out)."""
    out = []
    for key in keys:
        values = {repr(r.config.get(key)) for r in runs}
        if len(values) > 1 and not all(_is_path(r.config.get(key)) for r in runs):
            out.append(key)
    return out


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """``{label: runs}``: label = ``method / backbone / dataset`` plus the settings that tell variants apart."""
    by_method: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for run in runs:
        by_method[tuple(str(run.info.get(k, "")) for k in ("method", "backbone", "dataset"))].append(run)
    groups: dict[str, list[Run]] = {}
    for ident, members in by_method.items():
        keys = sorted({k for r in members for k in r.config if k.startswith("model.")} | set(BUDGET_KEYS))
        keys = [k for k in keys if not k.endswith((".detectors", ".detector_cache"))]
        varying = _varying(members, keys)
        for run in members:
            variant = ", ".join(f"{k.rsplit('.', 1)[-1]}={run.config.get(k)}" for k in varying)
            groups.setdefault(" / ".join(ident) + (f" ({variant})" if variant else ""), []).append(run)
    for label, members in groups.items():
        check_same_data(label, members)
    return groups


def check_same_data(label: str, runs: Sequence[Run]) -> None:
    """Refuse a group whose runs were evaluated on different data, naming the first differing setting."""
    keys = sorted({k for r in runs for k in r.config if k.startswith("data.")})
    keys = [k for k in keys if k.rsplit(".", 1)[-1] not in DATA_KEYS_IGNORED]
    for key in keys:
        values = {repr(r.config.get(key)) for r in runs}
        if len(values) > 1:
            where = "; ".join(f"{r.path}: {r.config.get(key)!r}" for r in runs)
            raise SystemExit(
                f"refusing to average the runs of {label!r}: their data configs differ in {key} ({where}). "
                "Compare runs evaluated on the same data, or pass them separately."
            )


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single run: no spread was measured)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def _settings(text: str) -> dict[str, str]:
    """``"KNN(k=50, chunk_size=8192)"`` -> ``{"class": "KNN", "k": "50", "chunk_size": "8192"}``."""
    cls, _, inner = text.partition("(")
    out = {"class": cls}
    for part in re.split(r", (?=\w+=)", inner.removesuffix(")")):
        key, eq, value = part.partition("=")
        if eq:
            out[key] = value
    return out


def detector_labels(runs: Sequence[Run]) -> dict[tuple[str, str], str]:
    """``{(detector name, setting): label}``: the name alone, or with the settings that tell apart detectors of
    one name evaluated with other hyperparameters in these runs (``knn(k=50)``)."""
    settings: dict[str, dict[str, None]] = defaultdict(dict)
    for run in runs:
        for row in run.rows:
            settings[row["detector"]][run.detector_setting(row["detector"])] = None
    labels = {}
    for name, texts in settings.items():
        parsed = {text: _settings(text) for text in texts}
        keys = list(dict.fromkeys(k for p in parsed.values() for k in p))
        varying = [k for k in keys if len({p.get(k) for p in parsed.values()}) > 1]
        for text, p in parsed.items():
            shown = ", ".join(p.get(k, "?") if k == "class" else f"{k}={p.get(k, '?')}" for k in varying)
            labels[(name, text)] = f"{name}({shown})" if len(texts) > 1 else name
    return labels


def check_distinct(label: str, detector: str, runs: Sequence[Run]) -> None:
    """Refuse to average two runs of one model (same checkpoint, or same training and split seeds)."""
    for kind, index in (("checkpoint", 0), ("seeds (training seed, split seed)", 1)):
        seen: dict[Any, Run] = {}
        for run in runs:
            key = run.replicate()[index]
            if key is None:
                continue
            if key in seen:
                raise SystemExit(
                    f"refusing to average {seen[key].path} and {run.path} in {label!r}, detector {detector!r}: "
                    f"both have the same {kind} {key}, so one model would count as two seeds. Pass only one "
                    "of them, or evaluate new detector settings under another detector `name`."
                )
            seen[key] = run


def summarise(groups: Mapping[str, Sequence[Run]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One record per (group, detector identity): its runs, ID accuracy and ``<set>/<metric>`` ``(mean, std)``
    pairs, with ``counts[<set>/<metric>]`` = the number of runs each pair averages."""
    records = []
    for label, runs in groups.items():
        labels = detector_labels(runs)
        for (det, setting), det_label in labels.items():
            members = [
                run
                for run in runs
                if run.detector_setting(det) == setting and any(r["detector"] == det for r in run.rows)
            ]
            check_distinct(label, det_label, members)
            accs = [run.rows[0]["id_acc"] for run in members if run.rows[0]["id_acc"] is not None]
            record: dict[str, Any] = {
                "group": label,
                "detector": det_label,
                "runs": len(members),
                "counts": {},
            }
            record["id_acc"] = _mean_std(accs) if accs else None
            record["counts"]["id_acc"] = len(accs)
            for group in MEAN_GROUPS:
                for metric in metrics:
                    values = [
                        r[metric]
                        for run in members
                        for r in run.rows
                        if r["detector"] == det and r["set"] == group and r.get(metric) is not None
                    ]
                    record[f"{group}/{metric}"] = _mean_std(values) if values else None
                    record["counts"][f"{group}/{metric}"] = len(values)
            records.append(record)
    return records


def format_cell(
    pair: tuple[float, float | None] | None, n: int | None = None, runs: int | None = None
) -> str:
    """A ``(mean, std)`` pair as ``"mean ± std"`` in % (``"-"`` for none, no ``±`` for a single run), with
    ``" (n=<n>)"`` when it averages fewer runs (``n``) than its row has (``runs``)."""
    if pair is None:
        return "-"
    text = f"{100 * pair[0]:.1f}" if pair[1] is None else f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"
    return f"{text} (n={n})" if n is not None and runs is not None and n != runs else text


def to_markdown(records: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    columns = [f"{g}/{m}" for g in MEAN_GROUPS for m in metrics]
    lines = [
        "| method | detector | runs | ID acc | " + " | ".join(columns) + " |",
        "|---|---|---:|---:|" + "---:|" * len(columns),
    ]
    for r in records:
        counts = r.get("counts", {})
        cells = [format_cell(r[c], counts.get(c), r["runs"]) for c in columns]
        acc = format_cell(r["id_acc"], counts.get("id_acc"), r["runs"])
        lines.append(f"| {r['group']} | {r['detector']} | {r['runs']} | {acc} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: Path) -> None:
    columns = ["id_acc", *(f"{g}/{m}" for g in MEAN_GROUPS for m in metrics)]
    header = ["method", "detector", "runs", *(f"{c}_{s}" for c in columns for s in ("mean", "std", "n"))]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in records:
        counts = r.get("counts", {})
        values = [
            ("" if v is None else v)
            for c in columns
            for v in (*(r[c] or (None, None)), counts.get(c, r["runs"] if r[c] else 0))
        ]
        writer.writerow([r["group"], r["detector"], r["runs"], *values])
    atomic_write(path, buf.getvalue())


def plot(records: Sequence[Mapping[str, Any]], path: Path, fpr_key: str = "fpr95_idpos") -> None:
    """AUROC vs FPR95 on the ``all`` group: one marker per method, one point per detector, std error bars."""
    import matplotlib.pyplot as plt

    from lightning_ood.callbacks.plots import save_figure

    fig, ax = plt.subplots(figsize=(8, 6))
    markers = "osD^v<>pPX*h"
    for i, label in enumerate(dict.fromkeys(r["group"] for r in records)):
        points = [r for r in records if r["group"] == label and r["all/auroc"] and r.get(f"all/{fpr_key}")]
        if not points:
            continue
        ax.errorbar(
            [100 * r[f"all/{fpr_key}"][0] for r in points],
            [100 * r["all/auroc"][0] for r in points],
            xerr=[100 * (r[f"all/{fpr_key}"][1] or 0.0) for r in points],
            yerr=[100 * (r["all/auroc"][1] or 0.0) for r in points],
            fmt=markers[i % len(markers)],
            capsize=2,
            label=label,
        )
        for r in points:
            ax.annotate(r["detector"], (100 * r[f"all/{fpr_key}"][0], 100 * r["all/auroc"][0]), fontsize=6)
    ax.set_xlabel(f"FPR95 ({fpr_key}, %), lower is better")
    ax.set_ylabel("AUROC (%), higher is better")
    ax.set_title("all OOD sets: mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TABLE_KINDS:  # the other table kinds live in compare_tables
        table_kind(argv)
        return []
    parser = argparse.ArgumentParser(
        prog="lightning-ood compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("runs", nargs="+", help="run directories, globs, or directories holding runs")
    parser.add_argument("--out", type=Path, default=Path("comparison"), help="where the table files go")
    parser.add_argument(
        "--metric", nargs="+", default=["auroc", "fpr95_idpos", "fpr95_oodpos"], help="metrics to tabulate"
    )
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="NAME",
        help="add a benchmark's published rows, e.g. openood_v15_cifar10 (lightning_ood.leaderboard)",
    )
    args = parser.parse_args(argv)
    groups = group_runs(find_runs(args.runs))
    records = summarise(groups, args.metric)
    records += [r for name in args.reference for r in reference_records(name, args.metric)]
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(records, args.metric)
    atomic_write(args.out / "comparison.md", markdown)
    write_csv(records, args.metric, args.out / "comparison.csv")
    if "auroc" in args.metric and any(m.startswith("fpr95") for m in args.metric):
        plot(records, args.out / "comparison.png", next(m for m in args.metric if m.startswith("fpr95")))
    print(markdown)
    print(f"{sum(len(v) for v in groups.values())} runs in {len(groups)} groups; tables in {args.out}/")
    return records


if __name__ == "__main__":
    main()
