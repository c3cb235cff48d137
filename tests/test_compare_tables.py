"""Every table kind of ``python -m lightning_ood.compare`` gives the tables of the benchmark script it replaced.

The expected outputs in ``tests/fixtures/tables/`` were made once, before the scripts were deleted, by running
``benchmarks/{results_table,heatmap_table,diffguard_table,reference_table,ssod_table,attack_table,
compare_rows}.py`` on the synthetic runs that ``table_helpers.make_*`` writes (the same files every time).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import table_helpers as helpers

from lightning_ood.compare import main as compare_main

FIXTURES = Path(__file__).parent / "fixtures" / "tables"


def _expected(name: str) -> str:
    return (FIXTURES / name).read_text()


def _sections(text: str) -> dict[str, str]:
    """``{heading: body}`` for each ``#``-heading block, trailing blank lines dropped."""
    parts = re.split(r"^(#+ .*)$", text, flags=re.M)
    return {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts), 2)}


def _tables(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def _compare(*argv: str) -> str:
    """What ``python -m lightning_ood.compare <argv>`` prints."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        compare_main(list(argv))
    return buf.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tables")
    for kind in ("results", "heatmap", "diffguard", "reference", "ssod", "attack", "moved"):
        getattr(helpers, f"make_{kind}")(root / kind)
    return root


def test_compare_dispatches_table_kinds_and_keeps_its_own_table(runs, tmp_path):
    out = _compare(
        "seeds", str(runs / "results" / "far" / "seed*"), "--title", "Far", "--out", str(tmp_path / "t.md")
    )
    assert out == (tmp_path / "t.md").read_text() and out.startswith("### Far")
    records = compare_main(
        [str(runs / "results" / "far"), "--out", str(tmp_path / "cmp"), "--metric", "auroc"]
    )
    assert len(records) == 7 and (tmp_path / "cmp" / "comparison.md").is_file()


@pytest.mark.parametrize("bench, title", [("far", "Far"), ("openset", "Open set")])
def test_seeds_is_results_table(runs, bench, title):
    got = _compare("seeds", str(runs / "results" / bench / "seed*"), "--title", title)
    assert got == _expected(f"results_{bench}.md")


def test_seeds_with_scores_and_best_of_is_heatmap_table(runs):
    expected = _sections(_expected("heatmap.md"))
    for bench in ("fashionmnist", "fashionmnist_openset"):
        got = _compare(
            "seeds", str(runs / "heatmap" / bench / "seed*"), "--scores", "heatmap", "msp", "energy",
            "--best-of", "mahalanobis", "rmd", "knn", "vim", "class_mean_euclidean", "class_mean_cosine",
        )  # fmt: skip
        (old,) = [body for head, body in expected.items() if f"`{bench}`" in head]
        assert _tables(got) == _tables(old)
        best = re.search(r"read on the test sets\): (`\w+`)", old).group(1)
        assert f"read on the test sets): {best}." in got
        assert re.search(r"ID accuracy [0-9.]+ ± [0-9.]+ % \(3 seeds\)", old).group(0) in got


@pytest.mark.parametrize("bench", ["far", "openset"])
def test_seeds_of_one_run_is_diffguard_table(runs, bench):
    name = {"far": "fashionmnist", "openset": "fashionmnist_openset"}[bench]
    got = _compare(
        "seeds", str(runs / "diffguard" / name), "--scores", "msp", "energy", "@best", "diffguard_*",
        "--best-of", "mahalanobis", "rmd", "class_mean_euclidean", "class_mean_cosine", "knn", "vim", "react",
        "ash", "--mark-best", "--group-metrics", "auroc", "fpr95_idpos", "--per-set",
    )  # fmt: skip
    old = _tables(_expected(f"diffguard_{bench}.md"))
    header = (
        old[0].replace("| score |", "| detector |").replace("AUROC", "auroc").replace("FPR95", "fpr95_idpos")
    )
    assert _tables(got) == [header, *old[1:]]  # the column names are the metric keys now
    assert "(best feature detector, chosen on test)" in old[4]


def test_headline_is_reference_table(runs):
    expected = _sections(_expected("reference.md"))
    for bench in ("fashionmnist", "fashionmnist_openset"):
        got = _compare("headline", str(runs / "reference" / bench / "*" / "seed*"), "--title", f"`{bench}`")
        assert _sections(got) == {f"#### `{bench}`": expected[f"#### `{bench}`"]}


def test_seeds_with_labelled_runs_and_sweep_are_ssod_table(runs):
    expected = _sections(_expected("ssod.md"))
    root = runs / "ssod"
    for bench in ("fashionmnist", "fashionmnist_openset"):
        title = f"SSOD vs baseline on `{bench}` (seed0, seed1, seed2)"
        got = _compare(
            "seeds", "--runs", f"ssod={root}/compare/{bench}/ssod/seed*",
            "--runs", f"baseline={root}/compare/{bench}/baseline/seed*", "--title", title,
            "--scores", "msp", "energy", "mahalanobis", "knn", "vim", "ssod", "ood_head",
            "--per-set", "auroc", "fpr95_idpos", "fpr95_oodpos",
        )  # fmt: skip
        assert _sections(got) == {f"### {title}": expected[f"### {title}"]}
    title = "SSOD gamma x alpha sweep on `fashionmnist_openset` (seed 0)"
    got = _compare(
        "sweep", f"{root}/sweep/*", f"{root}/compare/fashionmnist_openset/ssod/seed0",
        "--vary", "model.init_args.gamma", "model.init_args.alpha", "--title", title,
    )  # fmt: skip
    assert _sections(got) == {f"### {title}": expected[f"### {title}"]}


def test_attack_is_attack_table(runs):
    assert _compare("attack", str(runs / "attack")) == _expected("attack.md")


@pytest.mark.parametrize("tol, fixture", [("0", "moved.md"), ("1e-4", "moved_tol.md")])
def test_moved_is_compare_rows(runs, tol, fixture):
    got = _compare("moved", str(runs / "moved" / "before"), str(runs / "moved" / "after"), "--tol", tol)
    assert got == _expected(fixture)
    assert "| energy | 1.2 |" in _expected("moved.md")  # the 0.0123 AUROC change, in points


def test_bad_input_is_named(runs):
    with pytest.raises(SystemExit, match="no attacked sets"):
        _compare("attack", str(runs / "moved" / "before"))
    with pytest.raises(SystemExit, match=r"config\.yaml has no"):
        _compare("sweep", str(runs / "results" / "far" / "seed0"), "--vary", "model.init_args.gamma")
    with pytest.raises(SystemExit, match="expected LABEL=GLOB"):
        _compare("seeds", "--runs", "no-label")
