"""benchmarks/run_ssod.sh runs exactly the comparison and the sweep, resumes, and its tables choose on val/acc.

Training is replaced by a stub that writes the files a finished run leaves (``ood_results.json`` and the CSV
logger's ``metrics.csv``), so the test takes seconds.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
from script_helpers import run_with_stub

from lightning_ood.callbacks.results import build_rows, write_results
from lightning_ood.metrics import METRIC_KEYS

STUB = """import os, re, shutil, sys
args = sys.argv[1:]
if args[0] != "train.py":
    os.execv(sys.executable, [sys.executable, *args])
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
out = next(a.split("=", 1)[1] for a in args if a.startswith("--ood_eval.output_dir="))
shutil.copy(os.environ["STUB_RESULTS"], os.path.join(out, "ood_results.json"))
gamma = float(next((a.split("=")[1] for a in args if "gamma=" in a), "0.95"))
alpha = float(next((a.split("=")[1] for a in args if "alpha=" in a), "1"))
os.makedirs(os.path.join(out, "log", "version_0"))
with open(os.path.join(out, "log", "version_0", "metrics.csv"), "w") as f:  # best val/acc: gamma 0.99, alpha 0.1
    f.write("epoch,val/acc\\n0,0.5\\n1,%f\\n2,\\n" % (0.8 + gamma / 10 - alpha / 10))
"""


def _fixture(tmp_path: Path) -> Path:
    per_set = {
        score: {"digits": dict.fromkeys(METRIC_KEYS, 0.6), "fmnist_6to9": dict.fromkeys(METRIC_KEYS, 0.7)}
        for score in ("msp", "energy", "ssod", "ood_head")
    }
    groups = {"digits": "far", "fmnist_6to9": "near"}
    rows = build_rows(per_set, {"id": 10, "digits": 5, "fmnist_6to9": 4}, groups, n_id=10, id_acc=0.9, run={})
    write_results(rows, tmp_path / "fixture")
    return tmp_path / "fixture" / "ood_results.json"


def _run(tmp_path: Path, *stage: str) -> subprocess.CompletedProcess:
    return run_with_stub("run_ssod.sh", tmp_path, STUB, *stage, STUB_RESULTS=str(_fixture(tmp_path)))


@pytest.mark.slow
def test_runs_the_comparison_and_the_sweep_once_and_resumes(tmp_path):
    first = _run(tmp_path)
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 12 + 5  # 2 methods x 2 benchmarks x 3 seeds; 6 sweep settings, one reused
    ssod = [c for c in calls if "configs/ssod_fashionmnist.yaml" in c]
    base = [c for c in calls if "configs/ssod_baseline_fashionmnist.yaml" in c]
    assert len(ssod) == 6 + 5 and len(base) == 6
    for config in (ssod[:6], base):
        assert sorted(c.split("--seed_everything ")[1].split()[0] for c in config) == sorted(
            ["0", "1", "2"] * 2
        )
    sweep = [c for c in calls if "gamma=" in c]
    assert all("fashionmnist_openset.yaml" in c and "--seed_everything 0" in c for c in sweep)
    reused = tmp_path / "results" / "sweep" / "gamma0.95_alpha1"
    assert reused.is_symlink() and (reused / "ood_results.json").is_file()
    assert "| ssod: ssod |" in first.stdout and "| baseline: msp |" in first.stdout
    assert "Chosen on ID validation accuracy only: gamma 0.99, alpha 0.1." in first.stdout
    # a second call runs nothing; a run cut short (no ood_results.json) runs again from scratch
    cut = tmp_path / "results" / "compare" / "fashionmnist" / "baseline" / "seed1"
    (cut / "ood_results.json").unlink()
    _run(tmp_path)
    again = (tmp_path / "calls.txt").read_text().splitlines()[len(calls) :]
    assert len(again) == 1 and "--seed_everything 1" in again[0] and "baseline" in again[0]
    shutil.rmtree(tmp_path / "results" / "sweep")
    assert "No finished sweep runs." in _run(tmp_path, "table").stdout
