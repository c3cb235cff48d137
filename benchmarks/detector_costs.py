"""What each detector costs on the offline benchmark, and what every default detector costs against MSP alone.

One run, one checkpoint, one machine state:

1. The network's forward pass over ID train (the fit set) and over every test set, timed; its outputs are kept.
2. Per detector, alone (no sharing): **fit** s on the kept ID-train outputs (``update`` per batch +
   ``finalize``), **score** ms per 10k test images, and the peak extra resident memory of fit and score.
3. **Every default detector together** from the same outputs, with the per-batch shared products, against
   MSP alone: ``(forward + all scores) / (forward + MSP)``, with exact KNN and with each KNN option.
4. **KNN options**: a seeded bank subset and faiss indexes (flat exact, IVF, HNSW): score speed, AUROC
   change against exact KNN per OOD set (percentage points) and recall (share of test images whose k-th
   similarity equals the exact one to 1e-5); and exact search's speed relative to faiss's exact flat index.
5. **The target**: every default detector with KNN as recommended (``--recommended``, HNSW ``M:efSearch``)
   scored together in one pass, against MSP alone.
6. **Precision of the products**: the moment detectors' scores with float32 products (float32 features, the
   default) against float64 products (the same features as float64): score and AUROC changes, and time.

7. **Opt-in detectors** that read the same outputs (logits, features, head): each alone, as in 2.
8. **Feature-map and multi-pass detectors** (RankFeat, Gram, multi-layer Mahalanobis; ODIN, Mahalanobis with
   input preprocessing): fitted on the first ``--map-fit-batches`` ID-train batches (their fit runs the
   network with its feature maps, so it is a pass of its own here), then timed with the network on the first
   ``--map-test-batches`` batches of every test set: the forward pass without and with the feature maps, and
   each detector's scoring (for ODIN and Mahalanobis with preprocessing including their own passes).

Fit passes are one-off (cached beside a checkpoint), so the ratios compare test-time work.

    python benchmarks/detector_costs.py --ckpt results/fashionmnist/seed0/checkpoints/best-epoch=001.ckpt \
        --data configs/data/fashionmnist.yaml --ivf 256:16 1024:2 1024:4 --hnsw 32:128 16:16 32:32
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser
from memory import rss_mb, settle  # benchmarks/memory.py (run as a script from the repo root)

from lightning_ood.contract import DetectorInputs, unshared
from lightning_ood.data import OODDataModule
from lightning_ood.detectors import (
    GMM,
    KNN,
    MSP,
    ODIN,
    VRA,
    Detector,
    Gram,
    Mahalanobis,
    MahalanobisPreprocessed,
    MultiLayerMahalanobis,
    NNGuide,
    OpenMax,
    RankFeat,
    WeightedEnergy,
    WeiPer,
    WeiPerKLD,
)
from lightning_ood.detectors.defaults import default_detectors
from lightning_ood.detectors.gaussian_stats import MomentDetector
from lightning_ood.frozen import load_method
from lightning_ood.metrics import ood_metrics

Outputs = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (logits, features, targets) per batch


def _datamodule(path: str, overrides: list[str]) -> OODDataModule:
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(OODDataModule, "data", subclass_mode=True)
    dm = parser.instantiate_classes(parser.parse_args(["--data", path, *overrides])).data
    dm.setup("test")
    return dm


def _forward(model, loader) -> tuple[Outputs, float]:
    outputs: Outputs = []
    start = time.perf_counter()
    with torch.inference_mode():
        for images, targets in loader:
            out = model.forward_outputs(images)
            outputs.append((out.logits.float(), out.features.float(), targets))
    return outputs, time.perf_counter() - start


def _inputs(model, logits, features) -> DetectorInputs:
    return DetectorInputs(logits=logits, features=features, head=model.head)


def _fit(det: Detector, model, fit_outputs: Outputs) -> tuple[float, float]:
    base = settle()
    start = time.perf_counter()
    det.reset()
    with torch.no_grad():
        for logits, features, targets in fit_outputs:
            det.update(_inputs(model, logits, features), targets)
        det.finalize()
    return time.perf_counter() - start, rss_mb("VmHWM") - base


def _score(
    dets: list[Detector], model, sets: dict[str, Outputs], per_detector: dict[str, float] | None = None
) -> tuple[dict[str, dict[str, torch.Tensor]], float, float]:
    """Scores of ``dets`` on every set, the wall time and the peak extra memory (one inputs object per batch).

    Each detector first scores one batch untimed (first-call allocations and kernel selection).
    ``per_detector`` (optional) receives each detector's own seconds within the pass (a shared product counts
    for the detector that computes it first)."""
    logits, features, _ = next(iter(sets.values()))[0]
    with torch.no_grad():
        for det in dets:
            det(_inputs(model, logits, features))
    base = settle()
    start = time.perf_counter()
    scores: dict[str, dict[str, list]] = {d.name: {s: [] for s in sets} for d in dets}
    with torch.no_grad():
        for name, outputs in sets.items():
            for logits, features, _ in outputs:
                batch = _inputs(model, logits, features)
                for det in dets:
                    began = time.perf_counter()
                    scores[det.name][name].append(det(batch))
                    if per_detector is not None:
                        per_detector[det.name] = per_detector.get(det.name, 0.0) + time.perf_counter() - began
    seconds = time.perf_counter() - start
    return (
        {d: {s: torch.cat(v) for s, v in per.items()} for d, per in scores.items()},
        seconds,
        rss_mb("VmHWM") - base,
    )


def _state_mb(det: Detector) -> float:
    return sum(b.numel() * b.element_size() for b in det.buffers()) / 2**20


def _aurocs(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    ids = scores["id"]
    return {
        name: ood_metrics(torch.cat([ids, s]), torch.cat([torch.zeros(len(ids)), torch.ones(len(s))]))[
            "auroc"
        ]
        for name, s in scores.items()
        if name != "id"
    }


def _recommended(
    setting: str,
    dets: list[Detector],
    model,
    fit_outputs: Outputs,
    sets: dict[str, Outputs],
    forward: float,
    msp_s: float,
) -> list[str]:
    """Every default detector with KNN as the docs recommend (HNSW ``M:efSearch``), scored together in one
    pass with the shared products: the issue's target ratio."""
    m, ef = (int(v) for v in setting.split(":"))
    knn = KNN(index="faiss_hnsw", hnsw_m=m, ef_search=ef)
    _fit(knn, model, fit_outputs)
    knn(_inputs(model, *sets["id"][0][:2]))  # build the index outside the timed pass
    shares: dict[str, float] = {}
    _, all_s, _ = _score([*(d for d in dets if d.name != "knn"), knn], model, sets, shares)
    ratio = (forward + all_s) / (forward + msp_s)
    ranked = sorted(shares.items(), key=lambda item: -item[1])
    return [
        "",
        f'**Every default detector with `KNN(index="faiss_hnsw", hnsw_m={m}, ef_search={ef})`, scored together '
        f"in one pass: forward {forward:.2f} s + {all_s:.2f} s of scores = {ratio:.3f}x MSP alone** "
        f"(target <= 1.15: {'met' if ratio <= 1.15 else 'not met'}).",
        "",
        "Each detector's own time in that pass (shared products count where first computed): "
        + ", ".join(f"{name} {1e3 * sec:.0f} ms" for name, sec in ranked)
        + ".",
    ]


def _opt_in_rows(model, fit_outputs: Outputs, sets: dict[str, Outputs], per10k: float) -> list[str]:
    """Each opt-in detector that reads logits / features / head alone: fit and score as the default table."""
    dets = [
        WeightedEnergy(),
        OpenMax(),
        VRA(),
        NNGuide(),
        GMM(),
        Mahalanobis(covariance="per_class", name="mahalanobis_per_class"),
        WeiPer(),
        WeiPerKLD(),
    ]
    lines = ["", "Opt-in detectors on the same outputs, each alone:", ""]
    lines += [
        "| detector | fit s | fit peak MB | state MB | score ms / 10k | score peak MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    with unshared():
        for det in dets:
            fit_s, fit_mb = _fit(det, model, fit_outputs)
            _, score_s, score_mb = _score([det], model, sets)
            lines.append(
                f"| {det.name} | {fit_s:.2f} | {fit_mb:.0f} | {_state_mb(det):.1f} | {1e3 * score_s * per10k:.0f} "
                f"| {score_mb:.0f} |"
            )
    return lines


def _map_and_pass_rows(model, dm: OODDataModule, fit_batches: int, test_batches: int) -> list[str]:
    """Feature-map and multi-pass detectors, with the network: see item 8 of the module docstring."""
    dets: list[Detector] = [RankFeat(), Gram(), MultiLayerMahalanobis(), ODIN(), MahalanobisPreprocessed()]
    for det in dets:
        det.configure(dm)
        det.reset()

    def batch_inputs(images: torch.Tensor) -> DetectorInputs:
        out = model.net(images, feature_maps=True)
        return DetectorInputs.from_outputs(out, head=model.head, inputs=images, model=model)

    with torch.no_grad():
        for i, (images, targets) in enumerate(dm.fit_dataloader()):
            if i == fit_batches:
                break
            batch = batch_inputs(images)
            for det in dets:
                if det.needs_fit:
                    det.update(batch, targets)
        for det in dets:
            if det.needs_fit:
                det.finalize()
    batches = []
    for loader in dm.test_dataloader():
        for i, (images, _) in enumerate(loader):
            if i == test_batches:
                break
            batches.append(images)
    n = sum(len(b) for b in batches)
    times = {"forward": 0.0, "forward + feature maps": 0.0, **{d.name: 0.0 for d in dets}}
    with torch.inference_mode():  # untimed first calls (allocations, kernel selection)
        model.net(batches[0])
        for det in dets:
            det(batch_inputs(batches[0]))
    with torch.inference_mode():
        for images in batches:
            start = time.perf_counter()
            model.net(images)
            times["forward"] += time.perf_counter() - start
            start = time.perf_counter()
            batch = batch_inputs(images)
            times["forward + feature maps"] += time.perf_counter() - start
            for det in dets:
                start = time.perf_counter()
                det(batch)
                times[det.name] += time.perf_counter() - start
    lines = [
        "",
        f"Feature-map and multi-pass detectors: fitted on {fit_batches} ID-train batches, timed on {n:,} test "
        "images (the first batches of every test set); ms per 10k images:",
        "",
        "| step | ms / 10k | / forward |",
        "|---|---:|---:|",
    ]
    for name, sec in times.items():
        lines.append(f"| {name} | {1e7 * sec / n:.0f} | {sec / times['forward']:.2f} |")
    return lines


def _product_precision(
    dets: list[Detector], scores: dict[str, dict[str, torch.Tensor]], model, sets: dict[str, Outputs]
) -> list[str]:
    """The moment detectors' scores with their [B, D] x [D, K] products in float32 (float32 features, the
    default) against float64 (the same features as float64): the largest score change and the largest AUROC
    change over the OOD sets, and the scoring time of both."""
    moment = [d for d in dets if isinstance(d, MomentDetector)]
    sets64 = {n: [(lg, f.double(), t) for lg, f, t in outs] for n, outs in sets.items()}
    _, time32, _ = _score(moment, model, sets)
    scores64, time64, _ = _score(moment, model, sets64)
    lines = [
        "",
        f"Products in the features' precision: the moment detectors ({', '.join(d.name for d in moment)}) score "
        f"in {time32:.2f} s with float32 features (float32 products) and {time64:.2f} s with the same features "
        "as float64 (float64 products).",
        "",
        "| detector | max score change | score range | max AUROC change (points) |",
        "|---|---:|---:|---:|",
    ]
    for det in moment:
        got, ref = scores[det.name], scores64[det.name]
        a, b = (torch.cat(list(x.values())).double() for x in (got, ref))
        ref_auroc = _aurocs(ref)
        d_auroc = max(abs(x - ref_auroc[s]) for s, x in _aurocs(got).items())
        lines.append(
            f"| {det.name} | {float((a - b).abs().max()):.1e} | {float(b.max() - b.min()):.3g} "
            f"| {100 * d_auroc:.1e} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="a trained Classifier checkpoint")
    parser.add_argument("--data", default="configs/data/fashionmnist.yaml")
    parser.add_argument(
        "--data-override", nargs="*", default=[], help="e.g. --data.init_args.train_limit=2000"
    )
    parser.add_argument("--knn-fractions", nargs="*", type=float, default=[0.01, 0.02, 0.05, 0.1])
    parser.add_argument(
        "--ivf", nargs="*", default=["256:16"], help="faiss IVF settings to try, each nlist:nprobe"
    )
    parser.add_argument(
        "--hnsw", nargs="*", default=["32:128"], help="faiss HNSW settings to try, each M:efSearch"
    )
    parser.add_argument(
        "--recommended", default="16:16", help="the HNSW setting (M:efSearch) the docs recommend for KNN"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--map-fit-batches", type=int, default=20, help="fit batches of the feature-map detectors"
    )
    parser.add_argument("--map-test-batches", type=int, default=2, help="batches per test set for item 8")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dm = _datamodule(args.data, args.data_override)
    model = load_method(args.ckpt).eval()
    fit_outputs, fit_forward = _forward(model, dm.fit_dataloader())
    sets, test_forward = {}, 0.0
    for name, loader in zip(dm.test_set_names, dm.test_dataloader(), strict=True):
        sets[name], seconds = _forward(model, loader)
        test_forward += seconds
    n_test = sum(len(t) for outs in sets.values() for _, _, t in outs)
    n_fit = sum(len(t) for _, _, t in fit_outputs)
    per10k = 1e4 / n_test
    lines = [
        f"Checkpoint `{args.ckpt}`, data `{args.data}`: {n_fit:,} ID-train images (fit), {n_test:,} test images "
        f"in {len(sets)} sets; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}.",
        f"Forward pass: {fit_forward:.1f} s over ID train, {test_forward:.1f} s over the test sets "
        f"({1e3 * test_forward * per10k:.0f} ms per 10k images).",
        "",
        "| detector | fit s | fit peak MB | state MB | score ms / 10k | score peak MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    provides = frozenset({"logits", "features", "head"})
    dets = default_detectors(provides)
    score_times: dict[str, float] = {}
    with unshared():
        for det in dets:
            fit_s, fit_mb = _fit(det, model, fit_outputs) if det.needs_fit else (0.0, 0.0)
            _, score_s, score_mb = _score([det], model, sets)
            score_times[det.name] = score_s
            lines.append(
                f"| {det.name} | {fit_s:.2f} | {fit_mb:.0f} | {_state_mb(det):.1f} | {1e3 * score_s * per10k:.0f} "
                f"| {score_mb:.0f} |"
            )
    # every default detector together (shared products) vs MSP alone, from the same outputs
    msp = MSP()
    _, msp_s, _ = _score([msp], model, sets)
    exact_scores, all_s, _ = _score(dets, model, sets)
    lines += [
        "",
        f"MSP alone: forward {test_forward:.2f} s + score {msp_s:.2f} s. Every default detector together "
        f"(shared products): forward + {all_s:.2f} s of scores.",
        "",
        "| KNN in the default set | all detectors / MSP alone | KNN score s | max AUROC change vs exact (points) "
        "| recall of the k-th neighbour |",
        "|---|---:|---:|---:|---:|",
        f"| exact, whole bank | {(test_forward + all_s) / (test_forward + msp_s):.3f} | {score_times['knn']:.2f} "
        "| 0 | 1 |",
    ]
    exact_auroc = _aurocs(exact_scores["knn"])
    exact_knn = torch.cat(list(exact_scores["knn"].values()))
    options: list[tuple[str, Callable[[], KNN]]] = [
        (f"bank_fraction={f}", lambda f=f: KNN(bank_fraction=f)) for f in args.knn_fractions
    ]
    options.append(("index=faiss_flat", lambda: KNN(index="faiss_flat")))
    for setting in args.ivf:
        nlist, nprobe = (int(v) for v in setting.split(":"))
        options.append(
            (
                f"index=faiss_ivf, nlist={nlist}, nprobe={nprobe}",
                lambda a=nlist, b=nprobe: KNN(index="faiss_ivf", nlist=a, nprobe=b),
            )
        )
    for setting in args.hnsw:
        m, ef = (int(v) for v in setting.split(":"))
        options.append(
            (
                f"index=faiss_hnsw, hnsw_m={m}, ef_search={ef}",
                lambda a=m, b=ef: KNN(index="faiss_hnsw", hnsw_m=a, ef_search=b),
            )
        )
    flat_s = None
    _, rest_s, _ = _score([d for d in dets if d.name != "knn"], model, sets)
    but_knn = (
        f"Every default detector but KNN (shared products): forward + {rest_s:.2f} s of scores = "
        f"{(test_forward + rest_s) / (test_forward + msp_s):.3f}x MSP alone."
    )
    for label, make in options:
        knn = make()
        _fit(knn, model, fit_outputs)
        knn(_inputs(model, *sets["id"][0][:2]))  # build a faiss index outside the timed pass
        scores, knn_s, _ = _score([knn], model, sets)
        if label == "index=faiss_flat":
            flat_s = knn_s
        ratio = (test_forward + rest_s + knn_s) / (test_forward + msp_s)
        delta = max(abs(a - exact_auroc[s]) for s, a in _aurocs(scores["knn"]).items())
        recall = float(((torch.cat(list(scores["knn"].values())) - exact_knn).abs() <= 1e-5).float().mean())
        lines.append(f"| {label} | {ratio:.3f} | {knn_s:.2f} | {100 * delta:.2f} | {recall:.3f} |")
    lines += ["", but_knn]
    lines += _recommended(args.recommended, dets, model, fit_outputs, sets, test_forward, msp_s)
    lines += _product_precision(dets, exact_scores, model, sets)
    if flat_s is not None:
        lines += [
            "",
            f"Exact search speed relative to faiss's exact flat index: {flat_s / score_times['knn']:.2f} "
            f"(faiss flat {flat_s:.2f} s, ours {score_times['knn']:.2f} s for {n_test:,} queries; > 1: ours faster).",
        ]
    print("\n".join(lines), flush=True)  # the default-set results first: the sections below take a while
    extra = _opt_in_rows(model, fit_outputs, sets, per10k)
    extra += _map_and_pass_rows(model, dm, args.map_fit_batches, args.map_test_batches)
    print("\n".join(extra), flush=True)
    lines += extra
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
