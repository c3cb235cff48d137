"""Detector search: every candidate re-fitted and scored on ID val vs aux outliers, checked against an
independent fit; a candidate that changes nothing scores identically; test sets are never read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import FAST, TINY, csv_logger, eval_callback
from lightning.pytorch.cli import LightningArgumentParser

from lightning_ood.callbacks.results import read_results
from lightning_ood.cli import train
from lightning_ood.contract import DetectorInputs
from lightning_ood.data import OODDataModule
from lightning_ood.detectors import KNN, MSP, ReAct
from lightning_ood.detectors.defaults import default_detectors
from lightning_ood.detectors.search import build_candidate, expand_grid, search_detectors
from lightning_ood.methods import Classifier
from lightning_ood.metrics import ood_metrics


class _Poison:
    """Stands in for a test set's images: any read fails the test."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        raise AssertionError("the detector search read a test set")


@pytest.fixture(scope="module")
def setup():
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(OODDataModule, "data", subclass_mode=True)
    dm = parser.instantiate_classes(parser.parse_args(["--data", "configs/data/digits_tiny.yaml"])).data
    dm.setup("test")
    torch.manual_seed(0)
    model = Classifier(backbone="test_resnet", num_classes=dm.num_classes, in_chans=dm.channels)
    model.init_detectors([KNN(k=1), ReAct(percentile=90.0), MSP()])
    model.eval()
    dm.aux_eval_dataloader()  # building the aux set checks it is disjoint from the test sets (a data check)
    for ds in dm._test_sets.values():
        ds.images = _Poison(len(ds.images))
    return dm, model


def _features(model, loader):
    feats, logits = [], []
    with torch.no_grad():
        for images, _ in loader:
            out = model.forward_outputs(images)
            feats.append(out.features)
            logits.append(out.logits)
    return torch.cat(feats), torch.cat(logits)


def _inputs(features, model):
    return DetectorInputs(logits=model.head(features), features=features, head=model.head)


def _search(dm, model, grids):
    return search_detectors(
        dict(model.detectors),
        grids,
        fit_batches=dm.fit_dataloader(),
        val_batches=dm.val_dataloader(),
        outlier_batches=dm.aux_eval_dataloader(),
        describe=model._describe,
        configure=dm,
    )


def test_every_candidate_is_refitted_and_scored_like_an_independent_fit(setup):
    dm, model = setup
    chosen, record = _search(dm, model, {"react": {"percentile": [50.0, 99.0]}, "knn": {"k": [1, 4]}})
    train_f, _ = _features(model, dm.fit_dataloader())
    val_f, _ = _features(model, dm.val_dataloader())
    aux_f, _ = _features(model, dm.aux_eval_dataloader())
    labels = torch.cat([torch.zeros(len(val_f)), torch.ones(len(aux_f))])
    thresholds = []
    for name, make, key in (("react", ReAct, "percentile"), ("knn", KNN, "k")):
        for entry in record["detectors"][name]["grid"]:
            det = make(**entry["params"]).fit(features=train_f, head=model.head)
            scores = torch.cat([det(_inputs(val_f, model)), det(_inputs(aux_f, model))])
            ref = ood_metrics(scores, labels)
            for metric in ("auroc", "fpr95_idpos", "fpr95_oodpos"):
                assert entry[metric] == pytest.approx(ref[metric], abs=1e-9), (name, entry["params"], metric)
            if name == "react":
                thresholds.append(float(det.threshold_))
        best = max(record["detectors"][name]["grid"], key=lambda e: e["auroc"])
        assert record["detectors"][name]["chosen"] == best["params"]
        assert getattr(chosen[name], key) == best["params"][key] and chosen[name].fitted
    assert thresholds[0] < thresholds[1]  # each percentile re-fitted its own threshold
    assert record["n_id"] == len(val_f) and record["n_ood"] == len(aux_f)


def test_a_candidate_that_changes_nothing_scores_identically(setup):
    dm, model = setup
    _, record = _search(dm, model, {"knn": {"chunk_size": [3, 8192]}})
    first, second = record["detectors"]["knn"]["grid"]
    assert {k: v for k, v in first.items() if k != "params"} == {
        k: v for k, v in second.items() if k != "params"
    }
    assert record["detectors"]["knn"]["chosen"] == {"chunk_size": 3}  # ties keep the first


def test_bad_grids_are_named(setup):
    dm, model = setup
    with pytest.raises(ValueError, match=r"names \['odin'\], which the model does not have"):
        _search(dm, model, {"odin": {"temperature": [1.0]}})
    with pytest.raises(ValueError, match=r"has no hyperparameter \['kk'\]"):
        build_candidate(KNN(), {"kk": 3})
    with pytest.raises(ValueError, match="must be a non-empty list"):
        expand_grid({"k": []})
    assert expand_grid({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]


def test_search_through_the_cli_records_the_grid_and_uses_the_choice(tmp_path):
    grid = '{"knn": {"k": [1, 3]}, "react": {"percentile": [80, 95]}}'
    cli = train(
        [*TINY, *FAST, *csv_logger(tmp_path), "--trainer.max_epochs=1", f"--detector_search.grid={grid}"]
    )
    out = eval_callback(cli).output_path
    record = json.loads((out / "detector_search.json").read_text())
    assert read_results(out / "ood_results.json")[0]["detector_search"] == record
    assert cli.model.detectors["knn"].k == record["detectors"]["knn"]["chosen"]["k"]
    assert cli.model.detectors["react"].percentile == record["detectors"]["react"]["chosen"]["percentile"]
    assert len(record["detectors"]["knn"]["grid"]) == 2


def test_shipped_grids_name_default_detectors_and_their_hyperparameters():
    grid = yaml.safe_load(Path("configs/detector_search/default.yaml").read_text())["grid"]
    defaults = {d.name: d for d in default_detectors(frozenset({"logits", "features", "head"}))}
    for name, values in grid.items():
        for params in expand_grid(values):
            assert build_candidate(defaults[name], params).name == name
