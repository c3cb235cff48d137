"""OpenOOD v1.5's published rows: the shipped file is what the converter writes from the leaderboard's CSVs, and
``compare --reference`` puts them, parsed and nothing else, beside a run's rows."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from lightning_ood import compare, leaderboard

ROOT = Path(__file__).resolve().parents[1]
HEADER = (
    "Training,Postprocessor,Near-OOD_AUROC,Far-OOD_AUROC,ID_Accuracy,Outlier_Data,Arch,Additional_Description"
)


def test_converter_copies_the_standard_classifiers_rows_verbatim(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import openood_leaderboard

    results = tmp_path / "clone" / "results"
    results.mkdir(parents=True)
    rows = {
        "cifar10": ["CrossEntropy,MSP,88.03 ± 0.25,90.73 ± 0.43,95.06 ± 0.30,No,ResNet18,100 epochs",
                    "CrossEntropy,TempScale,1.00 ± 0.10,2.00 ± 0.20,95.06 ± 0.30,No,ResNet18,100 epochs",
                    "CrossEntropy,NAC,3.00 ± 0.10,4.00 ± 0.20,95.06 ± 0.30,No,ResNet18,100 epochs",
                    "LogitNorm,MSP,9.00 ± 0.10,9.00 ± 0.20,94.00 ± 0.30,No,ResNet18,100 epochs"],
        "cifar100": [], "imagenet200_ood": [],
        "imagenet1k_ood": ["CrossEntropy,KNN,71.10,90.18,76.18,No,ResNet50,torchvision ckpt",
                           "CrossEntropy,KNN,71.62,89.37,81.59,No,Swin-T,torchvision ckpt"],
    }  # fmt: skip
    for name, lines in rows.items():
        (results / f"{name}.csv").write_text("\n".join([HEADER, *lines]) + "\n", encoding="utf-8")
    out = tmp_path / "out.json"
    openood_leaderboard.main(
        [str(tmp_path / "clone"), "--commit", "abc", "--date", "2025-07-19", "--out", str(out)]
    )
    data = json.loads(out.read_text(encoding="utf-8"))
    cifar10 = data["benchmarks"]["openood_v15_cifar10"]["rows"]
    assert [(r["postprocessor"], r["detector"], r["near_auroc"]) for r in cifar10] == [
        ("MSP", "msp", "88.03 ± 0.25"),
        ("TempScale", "temperature_scaled_msp", "1.00 ± 0.10"),
        ("NAC", None, "3.00 ± 0.10"),  # a postprocessor lightning-ood does not have
    ]
    assert [r["far_auroc"] for r in data["benchmarks"]["openood_v15_imagenet1k"]["rows"]] == ["90.18"]
    assert data["commit"] == "abc" and data["date"] == "2025-07-19"


def test_shipped_file_names_its_source_and_holds_every_benchmark() -> None:
    data = leaderboard.load()
    assert "zjysteven/OpenOOD" in data["source"] and data["commit"] and data["date"]
    assert set(data["benchmarks"]) == {
        f"openood_v15_{b}" for b in ("cifar10", "cifar100", "imagenet200", "imagenet1k")
    }
    for table in data["benchmarks"].values():
        for row in table["rows"]:
            leaderboard.parse_value(row["near_auroc"]), leaderboard.parse_value(row["far_auroc"])


def test_parse_value() -> None:
    assert leaderboard.parse_value("88.03 ± 0.25") == (0.8803, 0.0025)
    assert leaderboard.parse_value("76.02") == (0.7602, None)
    with pytest.raises(ValueError, match="not a published"):
        leaderboard.parse_value("n/a")


def test_compare_reference_adds_published_rows(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    row = {"method": "classifier", "backbone": "openood_resnet18_32x32", "dataset": "openood_v15_cifar10",
           "detector": "msp", "id_acc": 0.95}  # fmt: skip
    rows = [
        {**row, "set": s, "auroc": 0.9, "fpr95_idpos": 0.3, "fpr95_oodpos": 0.2}
        for s in ("near", "far", "all")
    ]
    (run / "ood_results.json").write_text(json.dumps({"run": {}, "rows": rows}))
    records = compare.main([str(run), "--out", str(tmp_path / "cmp"), "--metric", "auroc", "fpr95_idpos",
                            "--reference", "openood_v15_cifar10"])  # fmt: skip
    published = [r for r in records if "published" in r["group"]]
    table = leaderboard.load()["benchmarks"]["openood_v15_cifar10"]["rows"]
    assert [r["detector"] for r in published] == [r["detector"] for r in table if r["detector"]]
    msp = next(r for r in published if r["detector"] == "msp")
    source = next(r for r in table if r["postprocessor"] == "MSP")
    assert msp["near/auroc"] == leaderboard.parse_value(source["near_auroc"])
    assert msp["far/auroc"] == leaderboard.parse_value(source["far_auroc"])
    assert msp["all/auroc"] is None and msp["near/fpr95_idpos"] is None  # not published: left empty
    with open(tmp_path / "cmp" / "comparison.csv", encoding="utf-8") as handle:
        groups = [r["method"] for r in csv.DictReader(handle)]
    assert any("OpenOOD v1.5 leaderboard (published" in g for g in groups)
    with pytest.raises(SystemExit, match="no such published table; known: openood_v15_cifar10"):
        compare.main([str(run), "--out", str(tmp_path / "cmp"), "--reference", "cifar"])
