"""Seconds to fingerprint a method's weights by content (``lightning_ood.derived_state.module_fingerprint``), paid
once per evaluation start on rank 0 to decide whether fitted statistics, attacked sets, ... are still fresh.

    python benchmarks/fingerprint_cost.py --model resnet50 [--device cpu] [--repeats 3]

Builds the timm model (random weights, no download), prints its parameter count, size in MB and the best wall
time of ``--repeats`` fingerprints (on a GPU the bytes are copied to the host first, included in the time).
"""

from __future__ import annotations

import argparse
import time

import timm

from lightning_ood.derived_state import module_fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = timm.create_model(args.model, pretrained=False).to(args.device)
    tensors = [*model.parameters(), *model.buffers()]
    n_params = sum(p.numel() for p in model.parameters())
    megabytes = sum(t.numel() * t.element_size() for t in tensors) / 1e6
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        digest = module_fingerprint(model)
        best = min(best, time.perf_counter() - start)
    print(
        f"{args.model}: {n_params / 1e6:.1f} M parameters, {megabytes:.0f} MB, fingerprint {best:.3f} s ({digest[:12]})"
    )


if __name__ == "__main__":
    main()
