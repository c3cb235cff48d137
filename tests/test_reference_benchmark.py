"""benchmarks/run_reference.sh runs every method once per benchmark and seed, feeds each derived method the
checkpoints of its own benchmark and seed, resumes, and tabulates with intervals and wall times.

Training and evaluation are replaced by a stub that writes what a finished run leaves (``ood_results.json``
with bootstrap bounds, a best checkpoint), so the test takes seconds.
"""

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from script_helpers import run_with_stub

ROOT = Path(__file__).resolve().parents[1]
STUB = """import json, os, sys
args = sys.argv[1:]
if args[0] not in ("train.py", "evaluate.py"):
    os.execv(sys.executable, [sys.executable, *args])
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
value = lambda key: next(a.split("=", 1)[1] for a in args if a.startswith(key + "="))
save_dir = value("--trainer.logger.save_dir")
ckpts = os.path.join(save_dir, "log", "version_0", "checkpoints")
os.makedirs(ckpts)
open(os.path.join(ckpts, "best-epoch=001.ckpt"), "w").close()
if os.path.basename(save_dir) == "diffusion":
    sys.exit(0)
bench, method = save_dir.split(os.sep)[-3:-1]
seed = int(save_dir[-1])
auroc = {"classifier": 0.9, "ssod": 0.8}.get(method, 0.7) + seed / 100
row = {"detector": "msp" if method != "heatmap" else "heatmap", "set": "all", "group": "all", "kind": "mean",
       "auroc": auroc, "auroc_lo": auroc - 0.01, "auroc_hi": auroc + 0.01, "fpr95_idpos": 0.5,
       "fpr95_oodpos": 0.4, "id_acc": 0.93}
run = {"method": method, "backbone": "net", "dataset": bench, "seed": str(seed)}
with open(os.path.join(value("--ood_eval.output_dir"), "ood_results.json"), "w") as f:
    json.dump({"run": run, "rows": [{**run, **row}]}, f)
"""
BENCHES = ("fashionmnist", "fashionmnist_openset")


def _run(tmp_path: Path, *stage: str, **env: str) -> subprocess.CompletedProcess:
    return run_with_stub("run_reference.sh", tmp_path, STUB, *stage, **env)


def _calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.txt").read_text().splitlines()


@pytest.mark.slow
def test_runs_every_method_once_with_its_own_checkpoints_and_resumes(tmp_path, monkeypatch, capsys):
    first = _run(tmp_path, DG_TEST_LIMIT="50", DG_OOD_LIMIT="20")
    calls = _calls(tmp_path)
    out = tmp_path / "results"
    kinds = {
        "classifier": [c for c in calls if "configs/reference_" in c and "ssod_reference" not in c],
        "ssod": [c for c in calls if "configs/model/ssod_reference.yaml" in c],
        "oodformer": [c for c in calls if "oodformer_fashionmnist.yaml" in c],
        "diffusion": [c for c in calls if "diffusion_fashionmnist.yaml" in c],
        "heatmap": [c for c in calls if "heatmap_fashionmnist.yaml" in c],
        "frozen_encoder": [c for c in calls if "frozen_encoder_fashionmnist.yaml" in c],
        "diffguard": [c for c in calls if "diffguard_fashionmnist.yaml" in c],
    }
    assert {k: len(v) for k, v in kinds.items()} == {
        "classifier": 6, "ssod": 6, "oodformer": 6, "diffusion": 2, "heatmap": 6, "frozen_encoder": 6,
        "diffguard": 6,
    }  # fmt: skip
    assert len(calls) == 38
    assert all("--trainer.accelerator=cpu" in c for c in calls)
    assert all("--ood_eval.bootstrap=1000" in c for c in calls if "diffusion_fashionmnist" not in c)
    for call in kinds["heatmap"] + kinds["frozen_encoder"] + kinds["diffguard"]:
        bench = "fashionmnist_openset" if "fashionmnist_openset" in call else "fashionmnist"
        seed = re.search(r"--seed_everything (\d)", call).group(1)
        ckpt = (
            out
            / bench
            / "classifier"
            / f"seed{seed}"
            / "log"
            / "version_0"
            / "checkpoints"
            / "best-epoch=001.ckpt"
        )
        assert str(ckpt) in call  # its own benchmark's and seed's classifier
        if "diffguard" in call:
            assert str(out / bench / "diffusion" / "log") in call
    limited = yaml.safe_load((out / "fashionmnist_openset" / "diffguard" / "data.yaml").read_text())
    assert limited["init_args"]["test_limit"] == 50
    assert all(spec["limit"] == 20 for spec in limited["init_args"]["ood_sets"])
    # the tables: compare's files, the headline rows with intervals, the wall times
    assert (out / "compare" / "fashionmnist" / "comparison.md").is_file()
    assert "| benchmark | method | runs | wall time" in first.stdout
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import reference_table

    reference_table.main([str(out)])
    table = capsys.readouterr().out  # fmt: skip
    # classifier MSP: AUROC 0.90, 0.91, 0.92 over the seeds; interval = mean of the runs' bounds
    assert (
        "| classifier / net / fashionmnist | msp | 3 | 93.0 ± 0.0 | - | - | 91.0 ± 1.0 [90.0, 92.0] |"
        in table
    )
    assert "| heatmap / net / fashionmnist_openset | heatmap | 3 |" in table
    # nothing runs twice; a run cut short runs again, alone
    _run(tmp_path, "train")
    assert len(_calls(tmp_path)) == 38
    (out / "fashionmnist" / "ssod" / "seed2" / "ood_results.json").unlink()
    _run(tmp_path, "train")
    again = _calls(tmp_path)[38:]
    assert len(again) == 1 and "ssod_reference" in again[0] and "--seed_everything 2" in again[0]


def test_stub_results_are_what_compare_reads(tmp_path):
    """The stub's result file has the keys ``lightning_ood.compare`` groups and averages by."""
    from lightning_ood.compare import find_runs

    run_dir = tmp_path / "fashionmnist" / "classifier" / "seed0"
    run_dir.mkdir(parents=True)
    row = {
        "method": "classifier",
        "backbone": "net",
        "dataset": "fashionmnist",
        "seed": "0",
        "detector": "msp",
    }
    row |= {"set": "all", "group": "all", "kind": "mean", "auroc": 0.9, "id_acc": 0.9}
    (run_dir / "ood_results.json").write_text(json.dumps({"run": row, "rows": [row]}))
    (run,) = find_runs([str(tmp_path / "*" / "*" / "seed*")])
    assert run.info["method"] == "classifier" and run.rows[0]["auroc"] == 0.9
