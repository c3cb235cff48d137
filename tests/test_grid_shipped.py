"""The shipped grids expand into exactly the runs of the shell scripts they replace (benchmarks/run_*.sh, deleted
in issue 24), with the same arguments, each derived run reading its own benchmark's and seed's checkpoints.

``script_*`` below transcribe the argument lists those scripts built; arguments are compared as (key, value)
pairs, so ``--seed_everything 0`` and ``--seed_everything=0`` are the same argument.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from lightning_ood.grid.run_job import command, write_limited_data
from lightning_ood.grid.spec import CHECKPOINT_GLOB, load_grid

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("fashionmnist", "fashionmnist_openset")
AUG = (
    "[{class_path: torchvision.transforms.v2.RandomResizedCrop, init_args: {size: 28, scale: [0.2, 1.0]}}, "
    "{class_path: torchvision.transforms.v2.RandomHorizontalFlip}]"
)


def pairs(args: list[str]) -> list[tuple[str, str]]:
    """``["--a", "1", "--b=2"]`` -> ``[("--a", "1"), ("--b", "2")]``."""
    out, i = [], 0
    while i < len(args):
        key, sep, value = args[i].partition("=")
        if sep:
            out.append((key, value))
            i += 1
        else:
            out.append((key, args[i + 1]))
            i += 2
    return out


def csv_log(d: Path) -> list[str]:
    return [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={d}",
        "--trainer.logger.name=log",
        "--trainer.logger.version=0",
        "--trainer.enable_progress_bar=false",
    ]


def _grid(name: str, tmp_path: Path, **overrides: str):
    out, jobs = load_grid(ROOT / "configs" / "grids" / name, overrides, out=tmp_path / "out")
    assert out == tmp_path / "out"
    return jobs


def _fill(job) -> list[str]:
    """The job's arguments with its upstream checkpoints filled in (fake checkpoint files are created)."""
    for up in job.needs.values():
        ckpt = up / CHECKPOINT_GLOB.replace("*", "epoch=001")
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.touch()
    cmd = command(job)
    assert cmd[1:4] == ["-m", "lightning_ood.grid.launch", job.entry]
    return cmd[4:]


def _ckpt(d: Path) -> str:
    return str(d / CHECKPOINT_GLOB.replace("*", "epoch=001"))


def script_reference(method: str, bench: str, seed: int, out: Path) -> list[str]:
    """run_reference.sh's arguments for one run (ACCEL=cpu, BOOTSTRAP=1000, DG_STEPS=10)."""
    d = out / bench / method / f"seed{seed}"
    clf = _ckpt(out / bench / "classifier" / f"seed{seed}")
    run = ["--trainer.accelerator=cpu", *csv_log(d), f"--ood_eval.output_dir={d}", "--ood_eval.print_table=false",
           "--ood_eval.bootstrap=1000"]  # fmt: skip
    seed_args = ["--seed_everything", str(seed)]
    if method == "classifier":
        return ["--config", f"configs/reference_{bench}.yaml", *seed_args, *run]
    if method == "ssod":
        return ["--config", f"configs/reference_{bench}.yaml", "--model", "configs/model/ssod_reference.yaml",
                *seed_args, *run]  # fmt: skip
    if method == "oodformer":
        extra = ["--data", f"configs/data/{bench}.yaml", f"--data.train_transforms={AUG}"]
        return ["--config", "configs/oodformer_fashionmnist.yaml", *seed_args,
                *(extra if bench != "fashionmnist" else []), *run]  # fmt: skip
    if method == "diffusion":
        d = out / bench / "diffusion"
        return ["--config", "configs/diffusion_fashionmnist.yaml", "--data", f"configs/data/{bench}.yaml",
                "--data.init_args.train_transforms=[]", "--data.init_args.batch_size=64",
                "--trainer.accelerator=cpu", *csv_log(d),
                f"--trainer.callbacks.init_args.output_dir={d}/samples"]  # fmt: skip
    if method == "heatmap":
        return ["--config", "configs/heatmap_fashionmnist.yaml", "--data", f"configs/data/{bench}_heatmap.yaml",
                *seed_args, f"--model.init_args.classifier_ckpt={clf}", "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=0.5", "--trainer.limit_val_batches=4", *run]  # fmt: skip
    if method == "frozen_encoder":
        return ["--config", "configs/frozen_encoder_fashionmnist.yaml", "--data", f"configs/data/{bench}.yaml",
                *seed_args, f"--model.init_args.encoder.init_args.checkpoint={clf}", *run]  # fmt: skip
    assert method == "diffguard"
    # the script wrote the (here unlimited) data config to <out>/<bench>/diffguard/data.yaml; the grid writes it
    # into the run's own directory
    return ["--config", "configs/diffguard_fashionmnist.yaml", "--data", f"{d}/data.yaml", *seed_args,
            f"--model.init_args.classifier={clf}",
            f"--model.init_args.diffusion={_ckpt(out / bench / 'diffusion')}", "--model.init_args.preset=cfg_latent",
            "--model.init_args.steps=25",
            f"--trainer.callbacks.init_args.output_dir={d}/regenerations", *run]  # fmt: skip


def test_reference_grid_is_run_reference(tmp_path):
    jobs = _grid("reference.yaml", tmp_path)
    out = tmp_path / "out"
    assert Counter(j.method for j in jobs) == {
        "classifier": 6, "ssod": 6, "oodformer": 6, "diffusion": 2, "heatmap": 6, "frozen_encoder": 6,
        "diffguard": 6,
    }  # fmt: skip
    position = {j.name: i for i, j in enumerate(jobs)}
    for job in jobs:
        assert all(position[u] < position[job.name] for u in job.upstream)  # upstream runs come first
        expected = script_reference(job.method, job.benchmark, job.seed, out)
        got = _fill(job)
        if (
            job.method == "diffusion"
        ):  # the callback's output_dir sits after the logger there: independent keys
            assert sorted(pairs(got)) == sorted(pairs(expected)) and got[:6] == expected[:6]
        else:
            assert pairs(got) == pairs(expected), job.name
        entry = "evaluate" if job.method in ("frozen_encoder", "diffguard") else "train"
        assert job.entry == entry and job.done == ("checkpoint" if job.method == "diffusion" else "results")
    dg = next(j for j in jobs if j.name == "fashionmnist_openset/diffguard/seed2")
    assert dg.upstream == ("fashionmnist_openset/classifier/seed2", "fashionmnist_openset/diffusion")


def test_reference_grid_variables_and_limited_data(tmp_path):
    jobs = _grid("reference.yaml", tmp_path, accelerator="gpu", bootstrap="200", dg_test_limit="50",
                 dg_ood_limit="20")  # fmt: skip
    assert all("--trainer.accelerator=gpu" in j.args for j in jobs)
    assert (
        sum("--ood_eval.bootstrap=200" in j.args for j in jobs) == 36
    )  # every run but the 2 diffusion models
    dg = next(j for j in jobs if j.method == "diffguard" and j.benchmark == "fashionmnist_openset")
    dg.directory.mkdir(parents=True)
    write_limited_data(dg)
    limited = yaml.safe_load((dg.directory / "data.yaml").read_text())
    assert limited["init_args"]["test_limit"] == 50
    assert [s.get("limit") for s in limited["init_args"]["ood_sets"]] == [20] * 7
    full = next(j for j in _grid("reference.yaml", tmp_path / "b") if j.method == "diffguard")
    full.directory.mkdir(parents=True)
    write_limited_data(full)
    assert yaml.safe_load((full.directory / "data.yaml").read_text()) == yaml.safe_load(
        (ROOT / "configs" / "data" / "fashionmnist.yaml").read_text()
    )


def test_ssod_sweep_grid_is_run_ssod(tmp_path):
    """run_ssod.sh with EXTRA=--trainer.accelerator=cpu (the configs' own accelerator) and its default sweep."""
    jobs = _grid("ssod_sweep.yaml", tmp_path)
    out = tmp_path / "out"
    assert len(jobs) == 12 + 5 and all(not j.needs for j in jobs)
    for job in jobs:
        d = job.directory
        tail = [
            "--trainer.accelerator=cpu",
            *csv_log(d),
            f"--ood_eval.output_dir={d}",
            "--ood_eval.print_table=false",
        ]
        if job.method == "ssod_sweep":
            gamma, alpha = d.name.removeprefix("gamma").split("_alpha")
            expected = ["--config", "configs/ssod_fashionmnist.yaml", "--data",
                        "configs/data/fashionmnist_openset.yaml", "--seed_everything", "0",
                        f"--model.init_args.gamma={gamma}", f"--model.init_args.alpha={alpha}"]  # fmt: skip
        else:
            assert d == out / "compare" / job.benchmark / job.method / f"seed{job.seed}"
            config = {
                "ssod": "configs/ssod_fashionmnist.yaml",
                "baseline": "configs/ssod_baseline_fashionmnist.yaml",
            }
            expected = ["--config", config[job.method], "--data", f"configs/data/{job.benchmark}.yaml",
                        "--seed_everything", str(job.seed)]  # fmt: skip
        assert pairs(list(job.args)) == pairs(expected + tail), job.name
    sweep = sorted(j.directory.name for j in jobs if j.method == "ssod_sweep")
    assert sweep == ["gamma0.95_alpha0.1", "gamma0.99_alpha0.1", "gamma0.99_alpha1", "gamma0.9_alpha0.1",
                     "gamma0.9_alpha1"]  # (0.95, 1) is the comparison's open-set seed-0 SSOD run  # fmt: skip


def test_quickstart_grid_is_run_results_heatmap_diffguard_frozen_encoder(tmp_path):
    jobs = _grid("quickstart_seeds.yaml", tmp_path)
    out = tmp_path / "out"
    assert Counter(j.method for j in jobs) == {
        "classifier": 6, "heatmap": 6, "frozen_encoder": 1, "attack": 1, "diffusion": 2, "diffguard": 2
    }  # fmt: skip
    logging = {
        "--trainer.logger",
        "--trainer.logger.save_dir",
        "--trainer.logger.name",
        "--trainer.logger.version",
    }
    for job in jobs:
        got = pairs(_fill(job))
        d, clf = job.directory, _ckpt(out / job.benchmark / "classifier" / f"seed{job.seed}")
        assert ("--trainer.logger.save_dir", str(d)) in got and ("--trainer.accelerator", "cpu") in got
        method = [p for p in got if p[0] not in logging | {"--trainer.accelerator"}]
        seed = [("--seed_everything", str(job.seed))]
        evaluation = [("--ood_eval.output_dir", str(d)), ("--ood_eval.print_table", "false")]
        bar = [("--trainer.enable_progress_bar", "false")]
        expected = {  # the scripts' arguments, less their logging (logger=false / default_root_dir there)
            "classifier": [("--config", "configs/quickstart.yaml"), ("--data", f"configs/data/{job.benchmark}.yaml"),
                           *seed, *bar, *evaluation],
            "heatmap": [("--config", "configs/heatmap_fashionmnist.yaml"),
                        ("--data", f"configs/data/{job.benchmark}_heatmap.yaml"), *seed,
                        ("--model.init_args.classifier_ckpt", clf), ("--trainer.max_epochs", "1"),
                        ("--trainer.limit_train_batches", "0.5"), ("--trainer.limit_val_batches", "4"), *bar,
                        *evaluation],
            "frozen_encoder": [("--config", "configs/frozen_encoder_fashionmnist.yaml"),
                               ("--model.init_args.encoder.init_args.checkpoint", clf), *bar, *evaluation],
            "attack": [("--config", "configs/attack_fashionmnist.yaml"),
                       ("--model.init_args.encoder.init_args.checkpoint", clf), *bar, *evaluation],
            "diffusion": [("--config", "configs/diffusion_fashionmnist.yaml"),  # on the benchmark's ID classes
                          ("--data", f"configs/data/{job.benchmark}.yaml"), ("--data.init_args.train_transforms", "[]"),
                          ("--data.init_args.batch_size", "64"),
                          ("--trainer.callbacks.init_args.output_dir", f"{d}/samples"), *bar],
            "diffguard": [("--config", "configs/diffguard_fashionmnist.yaml"), ("--data", f"{d}/data.yaml"),
                          ("--model.init_args.classifier", clf),
                          ("--model.init_args.diffusion", _ckpt(out / job.benchmark / "diffusion")),
                          ("--model.init_args.preset", "cfg_latent"), ("--model.init_args.steps", "25"),
                          ("--model.init_args.combine_val_images", "200"),
                          ("--model.init_args.guidance", "classifier_free"),
                          ("--trainer.callbacks.init_args.output_dir", str(d)), *bar, *evaluation],
        }[job.method]  # fmt: skip
        assert method == expected, job.name
    dg = next(j for j in jobs if j.method == "diffguard" and j.benchmark == "fashionmnist_openset")
    assert dg.upstream == ("fashionmnist_openset/classifier/seed0", "fashionmnist_openset/diffusion")
    dg.directory.mkdir(parents=True)
    write_limited_data(dg)
    limited = yaml.safe_load((dg.directory / "data.yaml").read_text())["init_args"]
    assert limited["test_limit"] == 300 and [s["limit"] for s in limited["ood_sets"]] == [100] * 7


def test_quickstart_and_reference_grids_train_the_same_diffusion_models(tmp_path):
    """Either grid's diffusion run can be linked into the other's output folder: same arguments, on the
    benchmark's ID classes only, less logging."""

    def diffusion(name: str) -> dict[str, list[tuple[str, str]]]:
        jobs = [j for j in _grid(name, tmp_path / name) if j.method == "diffusion"]
        out = {}
        for j in jobs:
            got = [(k, v.replace(str(j.directory), "{dir}")) for k, v in pairs(_fill(j))]
            out[j.benchmark] = sorted(p for p in got if not p[0].startswith("--trainer.logger"))
        return out

    quickstart, reference = diffusion("quickstart_seeds.yaml"), diffusion("reference.yaml")
    assert set(quickstart) == set(BENCHES) and quickstart == reference
    assert ("--data", "configs/data/fashionmnist_openset.yaml") in quickstart["fashionmnist_openset"]


@pytest.mark.parametrize(
    "methods, benchmarks, seeds, count",
    [(["heatmap"], None, None, 12), (["diffguard"], None, None, 6), (["classifier"], None, None, 6),
     (["heatmap", "diffguard"], ["fashionmnist_openset"], [0], 4), (None, None, [2], 4)],
)  # fmt: skip
def test_selecting_runs_keeps_what_they_need(tmp_path, methods, benchmarks, seeds, count):
    from lightning_ood.grid.spec import select

    assert len(select(_grid("quickstart_seeds.yaml", tmp_path), methods, benchmarks, seeds)) == count
    with pytest.raises(ValueError, match="--seeds \\[7\\]: not in the grid"):
        select(_grid("quickstart_seeds.yaml", tmp_path), seeds=[7])


@pytest.mark.parametrize("name", ["reference.yaml", "ssod_sweep.yaml", "quickstart_seeds.yaml"])
def test_shipped_grids_name_existing_configs(tmp_path, name, monkeypatch):
    from lightning_ood.grid.launch import missing_configs

    monkeypatch.chdir(ROOT)
    for job in _grid(name, tmp_path):
        missing = [m for m in missing_configs(list(job.args)) if str(job.directory) not in m]
        assert not missing, job.name
        if job.limited_data:
            assert Path(job.limited_data["config"]).is_file()
