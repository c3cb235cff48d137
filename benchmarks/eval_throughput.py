"""Evaluation throughput of the Lightning test loop vs a plain PyTorch loop, and all detectors vs MSP only.

1. ``loop``: images/s of ``trainer.test`` (with the OODEvaluation callback: score gathering, metrics, result
   files; plots off) against a plain ``for`` loop doing the same forward passes and MSP scoring on the same
   dataloaders. Reported as a ratio (target >= 0.9).
2. ``detectors``: wall time of an evaluation with every default detector vs with MSP only, both from one
   forward pass per image (target ratio <= 1.2); the one-off fit pass over ID train (cached beside a
   checkpoint after its first evaluation) is reported separately.

The network is randomly initialised: throughput does not depend on the weights.

    python benchmarks/eval_throughput.py --mode loop
    python benchmarks/eval_throughput.py --mode detectors \
        --knn '{"index": "faiss_hnsw", "hnsw_m": 16, "ef_search": 16}' \
              '{"index": "faiss_ivf", "nlist": 1024, "nprobe": 4}'
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from lightning_ood.cli import OODCLI
from lightning_ood.detectors import CONSUMABLES, MSP, DetectorInputs
from lightning_ood.detectors.defaults import default_detectors

MSP_ONLY = '--model.init_args.detectors=[{"class_path": "lightning_ood.detectors.MSP"}]'


def defaults_without(name: str) -> str:
    """The default detector list minus one detector, as a ``--model.init_args.detectors`` argument."""
    kept = [d for d in default_detectors(CONSUMABLES) if d.name != name]
    paths = [f'{{"class_path": "{type(d).__module__}.{type(d).__name__}"}}' for d in kept]
    return f"--model.init_args.detectors=[{', '.join(paths)}]"


def defaults_with_knn(knn_init: str) -> str:
    """The default detector list with KNN built from ``knn_init`` (JSON init_args, e.g. an index option)."""
    paths = []
    for d in default_detectors(CONSUMABLES):
        init = f', "init_args": {knn_init}' if d.name == "knn" else ""
        paths.append(f'{{"class_path": "{type(d).__module__}.{type(d).__name__}"{init}}}')
    return f"--model.init_args.detectors=[{', '.join(paths)}]"


def build(args: argparse.Namespace, detectors_arg: str | None, out: str) -> OODCLI:
    cli_args = [
        "--data",
        args.data,
        "--model",
        args.model,
        "--trainer.logger=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--ood_eval.plots=false",
        "--ood_eval.print_table=false",
        f"--ood_eval.output_dir={out}",
        f"--trainer.default_root_dir={out}",
        f"--data.init_args.eval_batch_size={args.batch_size}",
        f"--data.init_args.num_workers={args.num_workers}",
    ]
    if detectors_arg:
        cli_args.append(detectors_arg)
    return OODCLI(entry="evaluate", args=cli_args)


def plain_loop(cli: OODCLI) -> tuple[float, int]:
    """The same forward passes and MSP scores, collected per set, without Lightning."""
    model, msp = cli.model.eval(), MSP()
    loaders = cli.datamodule.test_dataloader()
    start, n = time.perf_counter(), 0
    with torch.inference_mode():
        for loader in loaders:
            scores = []
            for images, _ in loader:
                out = model.forward_outputs(images)
                scores.append(msp(DetectorInputs.from_outputs(out)))
                n += len(images)
            torch.cat(scores)
    return time.perf_counter() - start, n


def lightning_loop(cli: OODCLI) -> float:
    start = time.perf_counter()
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return time.perf_counter() - start


def run_loop(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as out:
        cli = build(args, MSP_ONLY, out)
        cli.datamodule.setup("test")
        plain_loop(cli)  # warm-up (page cache, allocator, thread pools)
        plain, light = [], []
        for _ in range(args.repeats):
            seconds, n = plain_loop(cli)
            plain.append(n / seconds)
            light.append(n / lightning_loop(cli))
    p, lt = statistics.median(plain), statistics.median(light)
    print(
        f"| test images | plain PyTorch (img/s) | Lightning test loop (img/s) | ratio |\n|---|---|---|---|\n"
        f"| {n} | {p:.0f} | {lt:.0f} | {lt / p:.3f} |"
    )


def run_detectors(args: argparse.Namespace) -> None:
    """Per configuration: a first ``trainer.test`` (fits the detectors), then timed repeats on the same model.

    The repeats find the detectors fitted (as a second evaluation of a checkpoint finds them in the cache), so
    they measure scoring; the one-off fit pass is the first run minus the median repeat.
    """
    results = {}
    with tempfile.TemporaryDirectory() as out:
        variants = (
            ("MSP only", MSP_ONLY),
            ("all defaults", None),
            ("all defaults but KNN", defaults_without("knn")),
            *((f"all defaults, KNN {knn}", defaults_with_knn(knn)) for knn in args.knn),
        )
        for label, det_arg in variants:
            cli = build(args, det_arg, out)
            first = lightning_loop(cli)
            again = statistics.median(lightning_loop(cli) for _ in range(args.repeats))
            results[label] = (first, again, len(cli.model.detectors))
    msp = results["MSP only"][1]
    lines = [
        "| detectors | evaluation wall time (s) | ratio to MSP only | one-off fit pass (s) |",
        "|---|---:|---:|---:|",
    ]
    for label, (first, again, n_det) in results.items():
        fit = "-" if label == "MSP only" else f"{first - again:.1f}"
        lines.append(f"| {label} ({n_det}) | {again:.1f} | {again / msp:.2f} | {fit} |")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("loop", "detectors"), default="loop")
    parser.add_argument("--data", default="configs/data/fashionmnist.yaml")
    parser.add_argument("--model", default="configs/model/classifier_resnet10t.yaml")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--knn",
        nargs="*",
        default=[],
        help="extra rows: every default detector with KNN built from these JSON init_args, e.g. "
        '\'{"index": "faiss_hnsw", "hnsw_m": 16, "ef_search": 16}\'',
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (run_loop if args.mode == "loop" else run_detectors)(args)


if __name__ == "__main__":
    main()
