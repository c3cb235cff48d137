"""Result rows, group means and the result files."""

import csv
import json

import numpy as np
import pytest
import torch

from lightning_ood.callbacks.plots import plot_histograms, plot_roc, save_figure
from lightning_ood.callbacks.results import COLUMNS, build_rows, read_results, write_results
from lightning_ood.callbacks.score_buffer import ScoreBuffer
from lightning_ood.metrics import METRIC_KEYS


def _metrics(v: float) -> dict[str, float]:
    return dict.fromkeys(METRIC_KEYS, v)


@pytest.fixture
def rows():
    per_set = {"msp": {"a": _metrics(0.2), "b": _metrics(0.4), "c": _metrics(0.9)}}
    groups = {"a": "near", "b": "far", "c": "far"}
    sizes = {"id": 10, "a": 3, "b": 5, "c": 7}
    run = {"method": "classifier", "backbone": "r", "dataset": "d", "seed": 1}
    return build_rows(per_set, sizes, groups, n_id=10, id_acc=0.5, run=run)


def test_group_means_and_sizes(rows):
    by_set = {r["set"]: r for r in rows}
    assert by_set["near"]["auroc"] == pytest.approx(0.2)
    assert by_set["far"]["auroc"] == pytest.approx(0.65)
    assert by_set["all"]["auroc"] == pytest.approx(0.5)
    assert by_set["far"]["n_ood"] == 12 and by_set["all"]["n_ood"] == 15
    assert {r["kind"] for r in rows} == {"set", "mean"}
    assert all(r["n_id"] == 10 and r["id_acc"] == 0.5 for r in rows)
    assert all(set(r) == set(COLUMNS) for r in rows)


def test_group_without_sets_is_left_out():
    rows = build_rows({"msp": {"a": _metrics(0.3)}}, {"a": 2}, {"a": "far"}, 4, 1.0, {})
    assert [r["set"] for r in rows] == ["a", "far", "all"]


def test_files_agree(rows, tmp_path):
    paths = write_results(rows, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["ood_results.csv", "ood_results.json", "ood_results.md"]
    loaded = json.loads((tmp_path / "out" / "ood_results.json").read_text())
    assert loaded == {"run": {}, "rows": rows}
    assert read_results(tmp_path / "out" / "ood_results.json") == ({}, rows)
    with open(tmp_path / "out" / "ood_results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["set"] for r in csv_rows] == [r["set"] for r in rows]
    assert float(csv_rows[0]["auroc"]) == pytest.approx(rows[0]["auroc"])
    md = (tmp_path / "out" / "ood_results.md").read_text().splitlines()
    assert len(md) == 2 + len(rows) and md[0].startswith("| method")
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temporary files left behind


def test_score_buffer_keeps_order_and_nan():
    buf = ScoreBuffer(2)
    assert buf.compute()[0].shape == (0, 2)  # seeded empty entry: a rank with no batch still gathers
    buf.update(torch.tensor([[1.0, 2.0]]), torch.tensor([0]), torch.tensor([0]))
    buf.update(torch.tensor([[float("nan"), 4.0]]), torch.tensor([1]), torch.tensor([-1]))
    scores, preds, targets = buf.compute()
    assert scores.shape == (2, 2) and torch.isnan(scores[1, 0])  # NaN is kept, for the metric to report
    assert preds.tolist() == [0, 1] and targets.tolist() == [0, -1]
    buf.reset()
    assert buf.compute()[0].shape == (0, 2)


def test_plots_are_written_with_infinite_scores(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.normal(size=50)
    ood = {"x": np.r_[rng.normal(2, size=30), np.inf], "y": rng.normal(1, size=20)}
    roc = save_figure(plot_roc("msp", ids, ood, {"x": 0.9, "y": 0.7}), tmp_path / "roc.png")
    hist = save_figure(plot_histograms("msp", ids, ood), tmp_path / "hist.png")
    assert roc.stat().st_size > 1000 and hist.stat().st_size > 1000
