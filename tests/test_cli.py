"""End to end through the CLI: train then test, evaluate a checkpoint (cached fit), W&B offline, config files."""

from pathlib import Path

import pytest
from cli_helpers import FAST, TINY, eval_callback, read_wandb_offline_run
from cli_helpers import csv_logger as _csv_logger

from lightning_ood.callbacks.results import read_results
from lightning_ood.cli import OODCLI, evaluate, train
from lightning_ood.metrics import METRIC_KEYS


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run shared by the tests below."""
    root = tmp_path_factory.mktemp("train")
    cli = train([*TINY, *FAST, *_csv_logger(root), "--trainer.max_epochs=2"])
    return cli, root


def test_train_writes_results_for_every_set_and_detector(trained):
    cli, _ = trained
    cb = eval_callback(cli)
    out = cb.output_path
    rows = read_results(out / "ood_results.json")[1]
    detectors = set(cli.model.detectors)
    assert {"msp", "max_logit", "energy", "mahalanobis", "knn", "vim"} <= detectors
    sets = {(r["detector"], r["set"]) for r in rows}
    assert sets == {(d, s) for d in detectors for s in ("faces", "gaussian", "near", "far", "all")}
    row = next(r for r in rows if r["detector"] == "msp" and r["set"] == "gaussian")
    assert row["n_id"] == 101 and row["n_ood"] == 37 and row["group"] == "far"
    assert row["method"] == "classifier" and row["backbone"] == "test_resnet" and row["dataset"] == "digits"
    assert all(0.0 <= row[k] <= 1.0 for k in METRIC_KEYS)
    assert (out / "ood_results.csv").is_file() and (out / "ood_results.md").is_file()
    assert (out / "config.yaml").is_file()
    logged = cli.trainer.callback_metrics
    assert (
        "test/id/acc" in logged
        and "test/gaussian/msp/auroc" in logged
        and "test/far/knn/fpr95_idpos" in logged
    )
    assert float(logged["test/gaussian/msp/auroc"]) == pytest.approx(row["auroc"], abs=1e-6)


def test_evaluate_matches_and_reuses_cached_detector_fit(trained, tmp_path):
    cli, _ = trained
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    cache = Path(f"{ckpt}.detectors.pt")
    assert cache.is_file(), "the test after fit caches the fitted detector statistics beside the checkpoint"
    stamp = cache.stat().st_mtime_ns
    # the run's saved config.yaml is a valid evaluate.py config
    saved = eval_callback(cli).output_path / "config.yaml"
    ev = evaluate(
        ["--config", str(saved), *_csv_logger(tmp_path), f"--ckpt_path={ckpt}", "--seed_everything=5"]
    )
    assert cache.stat().st_mtime_ns == stamp  # nothing refitted, nothing rewritten
    run = read_results(eval_callback(ev).output_path / "ood_results.json")[0]
    assert run["seed"] == 0 and run["ckpt_path"] == str(Path(ckpt).resolve())  # the seed it was trained with
    a = {(r["detector"], r["set"]): r for r in eval_callback(cli).rows}
    b = {(r["detector"], r["set"]): r for r in eval_callback(ev).rows}
    assert a.keys() == b.keys()
    for key in a:
        for metric in METRIC_KEYS:
            assert b[key][metric] == pytest.approx(a[key][metric], abs=1e-9), (key, metric)


def test_evaluate_with_other_detectors_than_trained(trained, tmp_path):
    cli, _ = trained
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    dets = (
        '[{"class_path": "lightning_ood.detectors.Mahalanobis", "init_args": {"covariance": "per_class", '
        '"name": "maha_class"}}, {"class_path": "lightning_ood.detectors.KNN", "init_args": {"k": 5}}]'
    )
    ev = evaluate(
        [
            *TINY,
            *FAST,
            *_csv_logger(tmp_path),
            f"--ckpt_path={ckpt}",
            f"--model.init_args.detectors={dets}",
            "--ood_eval.bootstrap=200",
        ]
    )
    rows = eval_callback(ev).rows
    assert {r["detector"] for r in rows} == {"maha_class", "knn"}
    # bootstrap intervals in every row, in the files and in the logged metrics
    out = eval_callback(ev).output_path
    assert read_results(out / "ood_results.json")[1] == rows
    assert "auroc_lo,auroc_hi,fpr95_idpos_lo" in (out / "ood_results.csv").read_text().splitlines()[0]
    for row in rows:
        for key in ("auroc", "fpr95_idpos", "fpr95_oodpos"):
            assert 0.0 <= row[f"{key}_lo"] <= row[f"{key}_hi"] <= 1.0, (row["set"], key)
    assert "test/all/knn/auroc_hi" in ev.trainer.callback_metrics


def test_wandb_offline_run_holds_metrics_and_run_facts(tmp_path):
    wandb_args = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.group=tests"]
    fast = [*TINY, *FAST, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", *wandb_args]
    cli = train([*fast, "--seed_everything=7", "--data.init_args.seed=3"])
    logger = cli.trainer.logger
    assert type(logger).__name__ == "WandbLogger" and logger._offline
    run = logger.experiment
    assert run.config["config"]["data"]["init_args"]["image_size"] == 16
    assert "test/gaussian/msp/auroc" in run.summary.keys()  # noqa: SIM118 (Summary has no __contains__)
    out = eval_callback(cli).output_path
    assert out == tmp_path / "lightning-ood" / run.id and (out / "ood_results.json").is_file()
    run.finish()
    # what the offline run holds: the datamodule's split seed (3) did not overwrite the training seed (7)
    facts, config = read_wandb_offline_run(
        next(tmp_path.glob(f"wandb/offline-run-*-{run.id}/run-{run.id}.wandb"))
    )
    assert facts == {"name": "classifier-test_resnet-digits-s7", "job_type": "train", "group": "tests"}
    assert {k: config[k] for k in ("method", "backbone", "dataset", "seed", "data_seed")} == {
        "method": "classifier",
        "backbone": "test_resnet",
        "dataset": "digits",
        "seed": 7,
        "data_seed": 3,
    }


def test_wandb_job_type_per_entry_and_score_logs_only_when_asked(tmp_path):
    args = [*TINY, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert OODCLI(entry="score", args=[*args, "--images=x"]).trainer.loggers == []
    for entry, extra, name in (
        ("score", ["--images=x", "--log_run=true"], "classifier-test_resnet-digits-s0"),
        ("evaluate", ["--trainer.logger.init_args.name=mine"], "mine"),  # the user's name wins
    ):
        cli = OODCLI(entry=entry, args=[*args, *extra])
        cli.name_wandb_runs()  # what evaluate() / score() do before the run starts
        init = cli.trainer.logger._wandb_init  # wandb.init's arguments, held until the run starts
        assert init["job_type"] == entry and init["name"] == name


def test_checkpoint_of_another_model_is_refused_naming_the_setting(trained, tmp_path):
    cli, _ = trained
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    other = [
        *TINY,
        *FAST,
        *_csv_logger(tmp_path),
        f"--ckpt_path={ckpt}",
        "--model.init_args.backbone=resnet10t",
    ]
    with pytest.raises(ValueError, match=r"backbone: checkpoint 'test_resnet', config 'resnet10t'") as err:
        evaluate(other)
    assert "\n" not in str(err.value)


def test_bad_config_key_is_named(capsys):
    with pytest.raises(SystemExit):
        OODCLI(args=[*TINY, "--model.init_args.no_such_option=1"])
    assert "no_such_option" in capsys.readouterr().err


def test_ood_set_on_the_command_line_needs_no_group():
    sets = "--data.init_args.ood_sets=[{name: x, source: gaussian, options: {size: 16, channels: 1}}]"
    cli = OODCLI(args=[*TINY, "--trainer.logger=false", sets])
    assert cli.datamodule.test_set_groups == {"x": "far"}


def test_bad_ood_set_on_the_command_line_names_the_set():
    sets = "--data.init_args.ood_sets=[{name: x, source: gaussian, group: middle}]"
    with pytest.raises(ValueError) as err:
        OODCLI(args=[*TINY, "--trainer.logger=false", sets])
    assert str(err.value) == "OOD set 'x'.group: must be one of ['near', 'far'], got 'middle'"  # one line


def test_adding_a_detector_fits_only_the_new_one_in_one_pass(trained, tmp_path, monkeypatch):
    import lightning_ood.methods.detector_fitting as fitting

    cli, _ = trained
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    passes: list[list[str]] = []
    real = fitting.fit_detectors

    def spy(detectors, batches, describe, **kwargs):
        passes.append([d.name for d in detectors])
        return real(detectors, batches, describe, **kwargs)

    monkeypatch.setattr(fitting, "fit_detectors", spy)
    dets = (
        '[{"class_path": "lightning_ood.detectors.Mahalanobis"}, {"class_path": "lightning_ood.detectors.RMD"}, '
        '{"class_path": "lightning_ood.detectors.KNN", "init_args": {"k": 5, "name": "knn5"}}]'
    )
    args = [
        *TINY,
        *FAST,
        *_csv_logger(tmp_path),
        f"--ckpt_path={ckpt}",
        f"--model.init_args.detectors={dets}",
    ]
    evaluate(args)
    assert passes == [["knn5"]]  # Mahalanobis and RMD come from the cache of the first evaluation
    evaluate(args)
    assert passes == [["knn5"]]  # now cached too: no pass at all
