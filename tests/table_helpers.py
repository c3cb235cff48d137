"""Synthetic finished runs (``ood_results.json``, ``config.yaml``, a CSV log) for the table tests.

Every value is drawn from a seeded generator, so the same call always writes the same files: the expected
tables in ``tests/fixtures/tables/`` were made from them by the benchmark scripts the table kinds replace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml

from lightning_ood.callbacks.results import build_rows, read_results, write_results
from lightning_ood.metrics import METRIC_KEYS
from lightning_ood.metrics.bootstrap import BOOTSTRAP_KEYS

ENV = {"python": "3.11.7", "torch": "2.14.1"}
FAR = {"digits": "far", "faces": "far", "gaussian": "far"}
OPENSET = {"fmnist_6to9": "near", **FAR}
FEATURES = ("mahalanobis", "rmd", "knn", "vim", "class_mean_euclidean")


def write_run(
    directory: Path,
    scores: Sequence[str],
    sets: Mapping[str, str],
    seed: int,
    run: Mapping[str, str] | None = None,
    intervals: bool = False,
    config: Mapping[str, object] | None = None,
    val_acc: Sequence[float] | None = None,
) -> Path:
    """Write one finished run into ``directory``: random metrics in [0.3, 1) for every (score, set).

    ``intervals`` adds bootstrap bounds (value -/+ a random width); ``config`` is written as ``config.yaml``
    (nested by the dots of its keys); ``val_acc`` as the ``val/acc`` column of ``log/version_0/metrics.csv``.
    """
    rng = np.random.default_rng(seed)
    per_set = {
        s: {name: {k: float(rng.uniform(0.3, 1.0)) for k in METRIC_KEYS} for name in sets} for s in scores
    }
    sizes = {name: 20 + i for i, name in enumerate(sets)}
    info = {"seed": str(seed), **(run or {}), "environment": ENV}
    bounds = None
    if intervals:
        bounds = {}
        for s in scores:
            rows = build_rows({s: per_set[s]}, sizes, sets, n_id=50, id_acc=0.0, run={})
            bounds[s] = {
                r["set"]: {
                    f"{k}_{end}": r[k] + sign * float(rng.uniform(0.001, 0.02))
                    for k in BOOTSTRAP_KEYS
                    for end, sign in (("lo", -1), ("hi", 1))
                }
                for r in rows
            }
    id_acc = float(rng.uniform(0.8, 0.95))
    rows = build_rows(per_set, sizes, sets, n_id=50, id_acc=id_acc, run=info, intervals=bounds)
    write_results(rows, directory, info)
    if config is not None:
        tree: dict = {}
        for key, value in config.items():
            *parents, leaf = key.split(".")
            node = tree
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        (directory / "config.yaml").write_text(yaml.safe_dump(tree))
    if val_acc is not None:
        log = directory / "log" / "version_0"
        log.mkdir(parents=True)
        lines = ["epoch,val/acc", *(f"{i},{v}" for i, v in enumerate(val_acc)), f"{len(val_acc)},"]
        (log / "metrics.csv").write_text("\n".join(lines) + "\n")
    return directory


def seed_runs(root: Path, scores: Sequence[str], sets: Mapping[str, str], base: int, **kw) -> list[Path]:
    """Three runs ``root/seed0..2`` (generator seeds ``base``, ``base + 1``, ``base + 2``)."""
    return [write_run(root / f"seed{k}", scores, sets, base + k, **kw) for k in range(3)]


def make_results(root: Path) -> None:
    """results_table / seeds: a far-only benchmark and an open-set one, 3 seeds each."""
    scores = ("msp", "energy", *FEATURES)
    seed_runs(root / "far", scores, FAR, 10)
    seed_runs(root / "openset", scores, OPENSET, 20)


def make_heatmap(root: Path) -> None:
    """heatmap_table: ``root/<benchmark>/seed<k>`` with the decoder's and the frozen classifier's scores."""
    scores = ("msp", "energy", "max_logit", *FEATURES, "heatmap")
    seed_runs(root / "fashionmnist", scores, FAR, 30)
    seed_runs(root / "fashionmnist_openset", scores, OPENSET, 40)


def make_diffguard(root: Path) -> None:
    """diffguard_table: one run per benchmark."""
    scores = ("msp", "max_logit", "energy", *FEATURES, "react", "ash", "diffguard_ssim", "diffguard_l2")
    write_run(root / "fashionmnist", scores, FAR, 50)
    write_run(root / "fashionmnist_openset", scores, OPENSET, 51)


REFERENCE_METHODS = {
    "classifier": ("msp", "energy", "knn", "vim"),
    "ssod": ("ssod", "msp", "vim", "ood_head"),
}


def make_reference(root: Path) -> None:
    """reference_table: ``root/<benchmark>/<method>/seed<k>`` with intervals and run identities."""
    for b, (bench, sets) in enumerate((("fashionmnist", FAR), ("fashionmnist_openset", OPENSET))):
        for m, (method, scores) in enumerate(REFERENCE_METHODS.items()):
            run = {"method": method, "backbone": "net", "dataset": bench}
            seed_runs(root / bench / method, scores, sets, 60 + 10 * b + 3 * m, run=run, intervals=True)


def make_ssod(root: Path) -> None:
    """ssod_table: the comparison (``compare/<benchmark>/<ssod|baseline>/seed<k>``) and the sweep runs."""
    ssod = ("msp", "energy", "mahalanobis", "knn", "vim", "max_logit", "ssod", "ood_head")
    base = ("msp", "energy", "mahalanobis", "knn", "vim", "max_logit")
    for b, (bench, sets) in enumerate((("fashionmnist", FAR), ("fashionmnist_openset", OPENSET))):
        for m, (method, scores) in enumerate((("ssod", ssod), ("baseline", base))):
            config = {"model.init_args.gamma": 0.95, "model.init_args.alpha": 1.0}
            seed_runs(root / "compare" / bench / method, scores, sets, 80 + 10 * b + 3 * m, config=config,
                      val_acc=[0.5, 0.8])  # fmt: skip
    for i, (gamma, alpha) in enumerate((g, a) for g in (0.9, 0.95, 0.99) for a in (0.1, 1)):
        if (gamma, alpha) == (0.95, 1):
            continue  # the comparison's open-set seed-0 SSOD run
        config = {"model.init_args.gamma": gamma, "model.init_args.alpha": float(alpha)}
        write_run(root / "sweep" / f"gamma{gamma}_alpha{alpha}", ssod, OPENSET, 100 + i, config=config,
                  val_acc=[0.5, 0.7 + 0.2 * gamma - alpha / 10, 0.6])  # fmt: skip


def make_attack(root: Path) -> None:
    """attack_table: one run with clean and attacked copies of two far sets."""
    sets = dict(FAR)
    for base in ("digits", "faces"):
        sets |= {f"{base}_{v}": "far" for v in ("clean", "smooth", "patchy")}
    write_run(root, ("knn", "knn_without_targets", "mahalanobis", "rmd"), sets, 120, run={"backbone": "net"})


def make_moved(root: Path) -> None:
    """compare_rows: the same run before and after a change of two scores, and a score only in one of them."""
    write_run(root / "before", ("msp", "energy", "knn", "gone"), FAR, 130)
    after = write_run(root / "after", ("msp", "energy", "knn", "new"), FAR, 130)
    info, rows = read_results(after / "ood_results.json")
    for r in rows:
        if r["detector"] == "energy" and r["set"] in ("faces", "far", "all"):
            r["auroc"] += 0.0123
        if r["detector"] == "knn" and r["set"] == "digits":
            r["fpr95_idpos"] -= 2e-5
    write_results(rows, after, info)
