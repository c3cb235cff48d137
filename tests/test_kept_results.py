"""The results page's every-detector tables are what the compare command makes of the run results kept in the
repository (``docs/results/every/<benchmark>/seed<k>/``: each run's ``ood_results.json`` and ``config.yaml``), so
the page cannot drift from the runs, and a later run adds its seed to them without the earlier checkpoints."""

from pathlib import Path

import pytest

from lightning_ood import compare
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


DIFFGUARD = ROOT / "docs" / "results" / "diffguard"
FULL_OOD_SETS = {
    "digits": 1797,
    "faces": 200,
    "textures": 2000,
    "photos": 2000,
    "gaussian": 2000,
    "uniform": 2000,
}


def _check_kept_diffguard_runs(benchmark: str) -> None:
    """Each kept DiffGuard run of ``benchmark`` is the re-run the page describes."""
    runs = find_runs([str(DIFFGUARD / benchmark / "seed*")])
    assert [run.path.name for run in runs] == [f"seed{int(run.info['seed'])}" for run in runs]
    assert sorted(int(run.info["seed"]) for run in runs) == [0, 1, 2]
    for run in runs:
        assert run.info["method"] == "diffguard"
        assert run.config["model.init_args.preset"] == "cfg_latent"
        assert run.config["model.init_args.steps"] == 25
        assert {row["n_id"] for row in run.rows} == {
            10000 if benchmark == "fashionmnist" else 6000
        }  # full sets
        sizes = {row["set"]: row["n_ood"] for row in run.rows if row["kind"] == "set"}
        assert sizes == FULL_OOD_SETS | ({"fmnist_6to9": 4000} if benchmark == "fashionmnist_openset" else {})


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_diffguard_tables_on_the_results_page_are_the_kept_runs_compared(benchmark, tmp_path):
    """The results page's DiffGuard re-run (issue 23): its own tables, its rows of the headline tables, and its
    rows of the full per-benchmark table are the compare command's output over the kept runs."""
    _check_kept_diffguard_runs(benchmark)
    pattern = str(DIFFGUARD / benchmark / "seed*")
    page = (ROOT / "docs" / "results.md").read_text()
    seeds = render(["seeds", pattern, "--title", benchmark, *DIFFGUARD_SEEDS_ARGS])
    for table in _tables(seeds):
        assert table in page, (
            f"docs/results.md lacks a DiffGuard table of {pattern}: regenerate it (see there)"
        )
    headline_rows = _tables(render(["headline", pattern, "--title", benchmark]))[0].splitlines()[2:]
    assert len(headline_rows) == 5  # diffguard_logits, _features, _l2, _ssim, _logits_plus_energy
    for row in headline_rows:
        assert row in page, f"docs/results.md's headline table lacks the kept DiffGuard row {row[:90]!r}"
    full = (ROOT / "docs" / "results" / f"reference_{benchmark}.md").read_text()
    old = [line for line in full.splitlines() if line.startswith("| diffguard /")]
    compare.main([pattern, "--out", str(tmp_path)])  # what the page's command writes to comparison.md
    new = [
        line
        for line in (tmp_path / "comparison.md").read_text().splitlines()
        if line.startswith("| diffguard /")
    ]
    assert old == new, f"docs/results/reference_{benchmark}.md: its DiffGuard rows are not those of {pattern}"


DIFFGUARD_SEEDS_ARGS = [
    "--scores", "msp", "energy", "@best", "diffguard_*", "--mark-best",
    "--group-metrics", "auroc", "fpr95_idpos", "--per-set", "auroc",
    "--best-of", "mahalanobis", "rmd", "class_mean_euclidean", "class_mean_cosine", "knn", "vim", "react",
]  # fmt: skip


QUICKSTART_DG_ARGS = [
    "--scores", "msp", "energy", "@best", "diffguard_*", "--mark-best", "--group-metrics", "auroc",
    "fpr95_idpos", "--per-set", "--best-of", "mahalanobis", "rmd", "class_mean_euclidean", "class_mean_cosine",
    "knn", "vim", "react", "ash",
]  # fmt: skip


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_quickstart_diffguard_tables_are_the_kept_runs_with_their_own_diffusion_model(benchmark):
    """The quickstart subsets' DiffGuard table (docs/results.md, "DiffGuard", with the presets) is the compare
    output over the kept run, and that run's diffusion model is its own benchmark's (for the open set: trained on
    the six ID classes only, so it has never seen the near-OOD classes)."""
    pattern = str(DIFFGUARD / "quickstart" / benchmark / "seed0")
    (run,) = find_runs([pattern])
    assert run.config["model.init_args.preset"] == "cfg_latent" and run.config["model.init_args.steps"] == 25
    assert run.config["model.init_args.diffusion"].startswith(f"results/quickstart/{benchmark}/diffusion/")
    assert {row["n_id"] for row in run.rows} == {300}
    assert {row["n_ood"] for row in run.rows if row["kind"] == "set"} == {100}
    page = (ROOT / "docs" / "results.md").read_text()
    (table,) = _tables(render(["seeds", pattern, "--title", benchmark, *QUICKSTART_DG_ARGS]))
    assert table in page, f"docs/results.md lacks the quickstart DiffGuard table of {pattern}: regenerate it"
