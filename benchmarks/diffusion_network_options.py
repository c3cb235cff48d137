"""Two ways to run DiffGuard's diffusion network faster that were measured and not adopted (docs/benchmarks.md
section 7): ``torch.compile`` with weight freezing, and one network call per classifier-free regeneration step
(the guided pair and the unconditional reference together, ``3 B`` images) instead of two (``2 B`` then ``B``).

    python benchmarks/diffusion_network_options.py                       # bf16 autocast, batches 64 and 128
    python benchmarks/diffusion_network_options.py --precision 32-true --batches 64

The network is ``configs/model/diffusion_unet_small.yaml``'s architecture with random weights (speed does not
depend on them), called with random labels (the null class included) at a mid-schedule timestep on random
28 px images. Prints the network's time per image, eager and compiled, per batch size, then the network time
of one classifier-free round trip (``--steps`` DDIM steps, ``--images`` images) with each call pattern, eager
and compiled, twice each.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lightning_ood.nets.diffusion import PRECISIONS, class_conditional_unet

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def network(compiled: bool) -> Network:
    torch.manual_seed(0)
    unet = class_conditional_unet(10, 1, 28, (16, 32, 64), 1, (), 8).eval()

    def run(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return unet(x, t, class_labels=y).sample

    if not compiled:
        return run
    import torch._inductor.config as inductor

    inductor.freezing = True  # weights become constants: oneDNN weight prepacking, fused pointwise kernels
    return torch.compile(run, dynamic=False)


def call(net: Network, batch: int, dtype: torch.dtype | None) -> None:
    x, t, y = torch.randn(batch, 1, 28, 28), torch.full((batch,), 500), torch.randint(0, 11, (batch,))
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        net(x, t, y)


def per_image_ms(net: Network, batch: int, dtype: torch.dtype | None, repeats: int) -> tuple[float, float]:
    """(seconds of the first call: compilation for a compiled network, ms per image afterwards)."""
    start = time.perf_counter()
    call(net, batch, dtype)
    first = time.perf_counter() - start
    for _ in range(2):
        call(net, batch, dtype)
    start = time.perf_counter()
    for _ in range(repeats):
        call(net, batch, dtype)
    return first, (time.perf_counter() - start) / repeats / batch * 1e3


def round_trip(net: Network, images: int, steps: int, dtype: torch.dtype | None, merged: bool) -> None:
    """The network calls of one classifier-free DiffGuard round trip with the unconditional reference: the
    inversion (``B`` per step), then per regeneration step the guided pair and the reference (first step:
    they share ``eps_null`` at the same latent, so ``2 B``)."""
    for _ in range(steps):
        call(net, images, dtype)
    if merged:
        call(net, 2 * images, dtype)
        for _ in range(steps - 1):
            call(net, 3 * images, dtype)
    else:
        for _ in range(steps):
            call(net, 2 * images, dtype)
            call(net, images, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="bf16-mixed", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--images", type=int, default=64, help="images of the round trip")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per batch size")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = PRECISIONS[args.precision]
    print(f"{args.precision}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    nets = {"eager": network(False), "compiled (freezing)": network(True)}
    with torch.inference_mode():
        for batch in args.batches:
            for name, net in nets.items():
                first, ms = per_image_ms(net, batch, dtype, args.repeats)
                print(f"network alone, batch {batch}, {name}: {ms:.3f} ms / image (first call {first:.1f} s)")
        for name, net in nets.items():
            round_trip(net, args.images, args.steps, dtype, merged=True)  # compiles the round trip's shapes
            for merged in (False, True, False, True):
                start = time.perf_counter()
                round_trip(net, args.images, args.steps, dtype, merged)
                ms = (time.perf_counter() - start) / args.images * 1e3
                pattern = "one call per step (3B)" if merged else "two calls per step (2B + B)"
                print(f"round trip, {name}, {pattern}: {ms:.2f} ms / image of network time")


if __name__ == "__main__":
    main()
