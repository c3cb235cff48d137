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
from collections.abc import Callable
from pathlib import Path

import torch
from detector_costs_rows import (  # benchmarks/detector_costs_rows.py (run as a script from the repo root)
    aurocs,
    detector_inputs,
    fit_timed,
    map_and_pass_rows,
    opt_in_rows,
    product_precision_rows,
    recommended_rows,
    run_network,
    score_timed,
    state_mb,
)
from lightning.pytorch.cli import LightningArgumentParser

from lightning_ood.contract import unshared
from lightning_ood.data import OODDataModule
from lightning_ood.detectors import KNN, MSP
from lightning_ood.detectors.defaults import default_detectors
from lightning_ood.frozen import load_method


def _datamodule(path: str, overrides: list[str]) -> OODDataModule:
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(OODDataModule, "data", subclass_mode=True)
    dm = parser.instantiate_classes(parser.parse_args(["--data", path, *overrides])).data
    dm.setup("test")
    return dm


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
    fit_outputs, fit_forward = run_network(model, dm.fit_dataloader())
    sets, test_forward = {}, 0.0
    for name, loader in zip(dm.test_set_names, dm.test_dataloader(), strict=True):
        sets[name], seconds = run_network(model, loader)
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
            fit_s, fit_mb = fit_timed(det, model, fit_outputs) if det.needs_fit else (0.0, 0.0)
            _, score_s, score_mb = score_timed([det], model, sets)
            score_times[det.name] = score_s
            lines.append(
                f"| {det.name} | {fit_s:.2f} | {fit_mb:.0f} | {state_mb(det):.1f} | {1e3 * score_s * per10k:.0f} "
                f"| {score_mb:.0f} |"
            )
    # every default detector together (shared products) vs MSP alone, from the same outputs
    msp = MSP()
    _, msp_s, _ = score_timed([msp], model, sets)
    exact_scores, all_s, _ = score_timed(dets, model, sets)
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
    exact_auroc = aurocs(exact_scores["knn"])
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
    _, rest_s, _ = score_timed([d for d in dets if d.name != "knn"], model, sets)
    but_knn = (
        f"Every default detector but KNN (shared products): forward + {rest_s:.2f} s of scores = "
        f"{(test_forward + rest_s) / (test_forward + msp_s):.3f}x MSP alone."
    )
    for label, make in options:
        knn = make()
        fit_timed(knn, model, fit_outputs)
        knn(detector_inputs(model, *sets["id"][0][:2]))  # build a faiss index outside the timed pass
        scores, knn_s, _ = score_timed([knn], model, sets)
        if label == "index=faiss_flat":
            flat_s = knn_s
        ratio = (test_forward + rest_s + knn_s) / (test_forward + msp_s)
        delta = max(abs(a - exact_auroc[s]) for s, a in aurocs(scores["knn"]).items())
        recall = float(((torch.cat(list(scores["knn"].values())) - exact_knn).abs() <= 1e-5).float().mean())
        lines.append(f"| {label} | {ratio:.3f} | {knn_s:.2f} | {100 * delta:.2f} | {recall:.3f} |")
    lines += ["", but_knn]
    lines += recommended_rows(args.recommended, dets, model, fit_outputs, sets, test_forward, msp_s)
    lines += product_precision_rows(dets, exact_scores, model, sets)
    if flat_s is not None:
        lines += [
            "",
            f"Exact search speed relative to faiss's exact flat index: {flat_s / score_times['knn']:.2f} "
            f"(faiss flat {flat_s:.2f} s, ours {score_times['knn']:.2f} s for {n_test:,} queries; > 1: ours faster).",
        ]
    print("\n".join(lines), flush=True)  # the default-set results first: the sections below take a while
    extra = opt_in_rows(model, fit_outputs, sets, per10k)
    extra += map_and_pass_rows(model, dm, args.map_fit_batches, args.map_test_batches)
    print("\n".join(extra), flush=True)
    lines += extra
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
