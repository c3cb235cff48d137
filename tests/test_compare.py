"""``python -m lightning_ood.compare``: grouping by method and varying settings, mean ± std over seeds,
detector settings as identity, per-cell run counts, and refusal to average runs evaluated on different data
or two runs of one model."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest
import yaml

from lightning_ood.callbacks.results import build_rows, write_results
from lightning_ood.compare import main
from lightning_ood.metrics import METRIC_KEYS


def _run(
    root: Path,
    name: str,
    method: str,
    seed: int,
    auroc: float,
    gamma: float = 0.95,
    detectors: dict[str, str] | None = None,
    ckpt: str | None = None,
    only_near: bool = False,
    **data,
) -> Path:
    directory = root / name
    metrics = {k: 0.5 for k in METRIC_KEYS} | {"auroc": auroc}
    detectors = detectors or {"msp": "MSP()"}
    info = {"method": method, "backbone": "net", "dataset": "fmnist", "seed": seed, "data_seed": 0}
    info |= {"detectors": detectors, "ckpt_path": ckpt}
    sets = {"a": metrics} if only_near else {"a": metrics, "b": metrics | {"auroc": auroc - 0.1}}
    per_set = {det: sets for det in detectors}
    rows = build_rows(per_set, {"a": 10, "b": 10}, {"a": "near", "b": "far"}, 20, 0.9 + seed / 100, info)
    write_results(rows, directory, run=info)
    config = {
        "seed_everything": seed,
        "trainer": {"max_epochs": 5},
        "model": {"init_args": {"gamma": gamma, "classifier_ckpt": f"/runs/seed{seed}/best.ckpt"}},
        "data": {"init_args": {"seed": seed, "image_size": 28, "num_workers": seed, **data}},
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


def test_groups_average_over_seeds_and_split_variants(tmp_path):
    for seed, auroc in enumerate((0.80, 0.84, 0.90)):
        _run(tmp_path / "runs", f"a{seed}", "ssod", seed, auroc)
    _run(tmp_path / "runs", "b0", "ssod", 0, 0.70, gamma=0.9)
    records = main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    by_group = {r["group"]: r for r in records}
    assert set(by_group) == {"ssod / net / fmnist (gamma=0.95)", "ssod / net / fmnist (gamma=0.9)"}
    main_group = by_group["ssod / net / fmnist (gamma=0.95)"]
    assert main_group["runs"] == 3  # the checkpoint paths differ per seed and do not split the group
    aurocs = [0.80, 0.84, 0.90]
    assert main_group["near/auroc"] == pytest.approx((statistics.fmean(aurocs), statistics.stdev(aurocs)))
    alls = [(a + a - 0.1) / 2 for a in aurocs]
    assert main_group["all/auroc"] == pytest.approx((statistics.fmean(alls), statistics.stdev(alls)))
    assert main_group["id_acc"] == pytest.approx((0.91, 0.01))
    assert by_group["ssod / net / fmnist (gamma=0.9)"]["near/auroc"] == (pytest.approx(0.70), None)
    out = tmp_path / "out"
    markdown = (out / "comparison.md").read_text()
    assert "| ssod / net / fmnist (gamma=0.95) | msp | 3 | 91.0 ± 1.0 | 84.7 ± 5.0 |" in markdown
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert float(rows[0]["near/auroc_mean"]) == pytest.approx(statistics.fmean(aurocs))
    assert (out / "comparison.png").stat().st_size > 0


def test_runs_on_different_data_are_refused_with_the_setting_named(tmp_path):
    _run(tmp_path, "a0", "classifier", 0, 0.8)
    _run(tmp_path, "a1", "classifier", 1, 0.8, image_size=32)
    with pytest.raises(SystemExit, match=r"data configs differ in data\.init_args\.image_size"):
        main([str(tmp_path / "a*"), "--out", str(tmp_path / "out")])


def test_no_runs_found_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"no ood_results\.json"):
        main([str(tmp_path), "--out", str(tmp_path / "out")])


KNN50 = {"msp": "MSP()", "knn": "KNN(k=50, chunk_size=8192)"}


def test_detector_settings_are_part_of_its_identity(tmp_path):
    _run(tmp_path, "a0", "classifier", 0, 0.80, detectors=KNN50, ckpt="/r/a0/best.ckpt")
    _run(tmp_path, "a1", "classifier", 1, 0.90, detectors=KNN50, ckpt="/r/a1/best.ckpt")
    # a second evaluation of a0's checkpoint with another k: its own row, not a third "seed" of knn
    _run(
        tmp_path,
        "e0",
        "classifier",
        0,
        0.60,
        detectors={"knn": "KNN(k=1, chunk_size=8192)"},
        ckpt="/r/a0/best.ckpt",
    )
    records = main([str(tmp_path / "*"), "--out", str(tmp_path / "out")])
    by_det = {r["detector"]: r for r in records}
    assert set(by_det) == {"msp", "knn(k=50)", "knn(k=1)"}
    assert by_det["knn(k=50)"]["runs"] == 2 and by_det["knn(k=1)"]["runs"] == 1
    assert by_det["knn(k=50)"]["near/auroc"] == pytest.approx((0.85, statistics.stdev([0.8, 0.9])))
    assert by_det["knn(k=1)"]["near/auroc"] == (pytest.approx(0.60), None)
    assert by_det["knn(k=1)"]["id_acc"] == (pytest.approx(0.90), None)


def test_two_runs_of_one_checkpoint_are_refused_naming_both(tmp_path):
    _run(tmp_path, "a0", "classifier", 0, 0.80, ckpt="/r/a0/best.ckpt")
    _run(tmp_path, "e0", "classifier", 3, 0.80, ckpt="/r/a0/best.ckpt")
    with pytest.raises(SystemExit, match=r"a0 and .*e0 .*'msp'.*same checkpoint /r/a0/best\.ckpt"):
        main([str(tmp_path / "*"), "--out", str(tmp_path / "out")])


def test_two_runs_of_one_seed_are_refused_naming_both(tmp_path):
    _run(tmp_path, "a0", "classifier", 0, 0.80, ckpt="/r/a0/best.ckpt")
    _run(tmp_path, "b0", "classifier", 0, 0.82, ckpt="/r/b0/best.ckpt")
    with pytest.raises(
        SystemExit, match=r"a0 and .*b0 .*same seeds \(training seed, split seed\) \('0', '0'\)"
    ):
        main([str(tmp_path / "*"), "--out", str(tmp_path / "out")])


def test_each_cell_shows_its_own_count(tmp_path):
    _run(tmp_path, "a0", "classifier", 0, 0.80)
    _run(tmp_path, "a1", "classifier", 1, 0.90, only_near=True)  # no far set: 'far' and 'all' have one run
    (record,) = main([str(tmp_path / "*"), "--out", str(tmp_path / "out")])
    assert record["runs"] == 2 and record["counts"]["near/auroc"] == 2 and record["counts"]["far/auroc"] == 1
    assert record["far/auroc"] == (pytest.approx(0.70), None)
    line = next(x for x in (tmp_path / "out" / "comparison.md").read_text().splitlines() if "| msp |" in x)
    assert "| 85.0 ± 7.1 |" in line and "| 70.0 (n=1) |" in line
    rows = list(csv.DictReader((tmp_path / "out" / "comparison.csv").open()))
    assert rows[0]["far/auroc_n"] == "1" and rows[0]["near/auroc_n"] == "2"
