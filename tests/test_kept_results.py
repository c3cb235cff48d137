"""The results page's every-detector tables are what the compare command makes of the run results kept in the
repository (``docs/results/every/<benchmark>/seed<k>/``: each run's ``ood_results.json`` and ``config.yaml``), so
the page cannot drift from the runs, and a later run adds its seed to them without the earlier checkpoints."""

from pathlib import Path

import pytest

from lightning_ood.compare import find_runs
from lightning_ood.compare_tables import render

ROOT = Path(__file__).resolve().parents[1]
KEPT = ROOT / "docs" / "results" / "every"
BENCHMARKS = ("fashionmnist", "fashionmnist_openset")


def _tables(text: str) -> list[str]:
    """The Markdown tables of ``text``, each as one string."""
    blocks, lines = [], [*text.splitlines(), ""]
    start = None
    for i, line in enumerate(lines):
        if line.startswith("|") and start is None:
            start = i
        elif not line.startswith("|") and start is not None:
            blocks.append("\n".join(lines[start:i]))
            start = None
    return blocks


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_every_detector_tables_on_the_results_page_are_the_kept_runs_compared(benchmark):
    runs = find_runs([str(KEPT / benchmark / "seed*")])
    seeds = sorted(int(run.info["seed"]) for run in runs)
    assert seeds == sorted(set(seeds)) and [run.path.name for run in runs] == [f"seed{s}" for s in seeds]
    assert all(
        run.info["method"] == "classifier" and run.config for run in runs
    )  # config.yaml kept beside it
    tables = _tables(render(["seeds", str(KEPT / benchmark / "seed*"), "--title", benchmark]))
    assert len(tables) == 2  # group means, AUROC per OOD set
    page = (ROOT / "docs" / "results.md").read_text()
    for table in tables:
        assert table.count("\n") == 37  # header, rule and the 36 detectors of configs/detectors/every.yaml
        assert table in page, (
            f"docs/results.md lacks a table of {KEPT / benchmark}: regenerate it with the command given there"
        )
