"""benchmarks/run_heatmap.sh trains one decoder per classifier checkpoint and resumes; benchmarks/heatmap_table.py
reports the mean and std over seeds of the heatmap score, MSP, Energy and the best feature detector.

Training is replaced by a stub that copies a prepared ``ood_results.json`` (one per seed), so the test takes
seconds.
"""

import subprocess
from pathlib import Path

import pytest
from script_helpers import run_with_stub

from lightning_ood.callbacks.results import build_rows, write_results
from lightning_ood.metrics import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]
STUB = """import os, shutil, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
if args[0] != "train.py":  # the table script: tested in this process (test_table_...)
    sys.exit(0)
out = next(a.split("=", 1)[1] for a in args if a.startswith("--ood_eval.output_dir="))
seed = args[args.index("--seed_everything") + 1]
shutil.copy(os.path.join(os.environ["STUB_RESULTS"], seed, "ood_results.json"), out)
"""
#: Per seed, the AUROC of each score on the two OOD sets (the other metrics follow it).
AUROC = {
    "heatmap": (0.90, 0.80),
    "msp": (0.70, 0.60),
    "energy": (0.65, 0.55),
    "mahalanobis": (0.95, 0.85),  # the best feature detector
    "knn": (0.92, 0.84),
    "vim": (0.50, 0.50),
}


def _results(tmp_path: Path) -> Path:
    groups = {"digits": "far", "fmnist_6to9": "near"}
    for seed in range(3):
        shift = 0.01 * seed  # seeds 0, 1, 2: mean = seed-1 value, sample std = 0.01
        per_set = {
            score: {
                name: dict.fromkeys(METRIC_KEYS, value + shift)
                for name, value in zip(groups, values, strict=True)
            }
            for score, values in AUROC.items()
        }
        counts = {"id": 10, "digits": 5, "fmnist_6to9": 4}
        rows = build_rows(per_set, counts, groups, n_id=10, id_acc=0.9, run={})
        write_results(rows, tmp_path / "fixture" / str(seed))
    return tmp_path / "fixture"


def _run(tmp_path: Path, *stage: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_with_stub(
        "run_heatmap.sh", tmp_path, STUB, *stage, check=check,
        CLASSIFIERS=str(tmp_path / "classifiers"), STUB_RESULTS=str(_results(tmp_path)),
    )  # fmt: skip


def _classifiers(tmp_path: Path) -> None:
    for bench in ("fashionmnist", "fashionmnist_openset"):
        for seed in range(3):
            ckpt = tmp_path / "classifiers" / bench / f"seed{seed}" / "checkpoints" / "best-epoch=001.ckpt"
            ckpt.parent.mkdir(parents=True)
            ckpt.write_text("")


@pytest.mark.slow
def test_one_decoder_per_classifier_and_resumable(tmp_path: Path) -> None:
    missing = _run(tmp_path, check=False)
    assert missing.returncode != 0 and "missing classifier" in missing.stderr
    _classifiers(tmp_path)
    _run(tmp_path)
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    train = [c for c in calls if c.startswith("train.py")]
    assert len(train) == 6 and calls[-1] == f"benchmarks/heatmap_table.py {tmp_path / 'results'}"
    for bench in ("fashionmnist", "fashionmnist_openset"):
        mine = [c for c in train if f"--data configs/data/{bench}_heatmap.yaml" in c]
        assert len(mine) == 3
        for seed in range(3):
            ckpt = tmp_path / "classifiers" / bench / f"seed{seed}" / "checkpoints" / "best-epoch=001.ckpt"
            assert sum(f"--seed_everything {seed}" in c and f"classifier_ckpt={ckpt}" in c for c in mine) == 1
    assert all("--trainer.limit_train_batches=0.5" in c and "--trainer.max_epochs=1" in c for c in train)
    # nothing runs again; a run cut short (no ood_results.json) runs again
    (tmp_path / "results" / "fashionmnist_openset" / "seed2" / "ood_results.json").unlink()
    _run(tmp_path)
    again = [
        c for c in (tmp_path / "calls.txt").read_text().splitlines()[len(calls) :] if c.startswith("train")
    ]
    assert len(again) == 1 and "--seed_everything 2" in again[0] and "openset" in again[0]


def test_table_reports_the_best_feature_detector_and_seed_statistics(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from heatmap_table import benchmark_table

    fixture = _results(tmp_path)
    text = benchmark_table(
        [fixture / str(seed) / "ood_results.json" for seed in range(3)], "fashionmnist_openset"
    )
    assert "(highest mean `all` AUROC, read on the test sets): `mahalanobis`" in text
    assert "| heatmap | 81.0 ± 1.0 |" in text  # near (fmnist_6to9) AUROC 0.80, 0.81, 0.82 in %
    assert "| mahalanobis | 86.0 ± 1.0 |" in text
    assert "| knn |" not in text and "| vim |" not in text
    rows = [
        line.split(" |")[0] for line in text.splitlines() if line.startswith("| ") and "detector" not in line
    ]
    assert rows[:4] == ["| heatmap", "| msp", "| energy", "| mahalanobis"]
