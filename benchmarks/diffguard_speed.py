"""DiffGuard throughput: whole batches through inversion and regeneration against a batch-size-1 loop that does per
image what the reference code does per image, on the same models, DDIM steps and images; counts the diffusion
network's evaluations and calls per image.

    python benchmarks/diffguard_speed.py --images 64 --steps 10
    python benchmarks/diffguard_speed.py --guidance classifier --precision bf16-mixed
    python benchmarks/diffguard_speed.py --device cuda --images 256 --precision bf16-mixed
    python benchmarks/diffguard_speed.py --classifier <ckpt> --diffusion <ckpt or pipeline folder>

Three timings of the same scores: ``batched`` (DiffGuard on the whole set, ``--batch`` images per diffusion
pass), ``reference loop`` (``benchmarks/diffguard_reference_loop.py``: one image at a time, the reference code's
pattern of network calls) and ``DiffGuard, batch 1`` (this library's code one image at a time: isolates what
batching alone gains). ``--loop-precision`` / ``--loop-channels-last`` set the loops' execution (default: the
batched one's), so columns can differ only where the row says so; ``--loop-threads`` runs the loops at another
torch thread count than the batched run (one image at a time gains little from many threads).
``--unet-timings`` adds the network's own time per call at batch 1 and 2 and per image at the batched size.

Without checkpoints it builds a random classifier (timm ``resnet10t``, 10 classes) and a random DiffusionModel
with the architecture of ``configs/model/diffusion_unet_small.yaml`` on 28 px grey images: speed does not depend
on the weights. Prints Markdown table rows (docs/benchmarks.md section 7).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffguard_reference_loop import reference_style_scores

from lightning_ood.detectors import Energy
from lightning_ood.frozen import save_method
from lightning_ood.methods import Classifier, DiffGuard, DiffusionModel
from lightning_ood.nets.diffusion import PRECISIONS


def random_models(folder: Path) -> tuple[str, str]:
    torch.manual_seed(0)
    classifier = Classifier(backbone="resnet10t", num_classes=10, in_chans=1)
    diffusion = DiffusionModel(num_classes=10, in_chans=1, sample_size=28, block_out_channels=(16, 32, 64))
    return save_method(classifier, folder / "classifier.ckpt"), save_method(
        diffusion, folder / "diffusion.ckpt"
    )


class CountingDenoiser:
    """Counts the diffusion network's calls and the images passed through it (an image in a batch of B counts
    once; the two branches of classifier-free guidance count twice)."""

    def __init__(self, method: DiffGuard) -> None:
        self.images = self.calls = 0
        inner = method.diffusion.predict_noise

        def counted(x, t, labels):
            self.images += len(x)
            self.calls += 1
            return inner(x, t, labels)

        method.diffusion.predict_noise = counted

    def reset(self) -> None:
        self.images = self.calls = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def unet_timings(method: DiffGuard, sample: torch.Tensor, batch: int, device: torch.device) -> str:
    """The diffusion network alone (unconditional, mid-schedule) on copies of ``sample`` ``[1, ...]`` (the
    diffused space): ms per call at batch 1 and 2, and per image at ``batch``, under the method's settings."""
    den, out = method.diffusion, []
    for size, repeats in ((1, 100), (2, 100), (batch, max(3, 512 // batch))):
        x = sample.expand(size, *sample.shape[1:]).contiguous()
        t = torch.full((size,), den.num_train_timesteps // 2, dtype=torch.long, device=device)
        for _ in range(2):
            den.noise(x, t, None)
        seconds, _ = timed(lambda x=x, t=t, n=repeats: [den.noise(x, t, None) for _ in range(n)], device)
        out.append(seconds / repeats * 1e3)
    return (
        f"{out[0]:.2f} ms / call at batch 1, {out[1]:.2f} ms / call at batch 2, "
        f"{out[2] / batch:.3f} ms / image at batch {batch}"
    )


def measure(
    batched_method: DiffGuard,
    loop_method: DiffGuard,
    images: torch.Tensor,
    loop_images: torch.Tensor,
    repeats: int,
    device: torch.device,
    loop_threads: int | None = None,
) -> dict:
    """The batched run ``repeats`` times (median), the parts of the two loops between them; the loops are
    interleaved image by image, alternating which goes first, so that drifts of the machine's speed hit both
    alike. ``loop_threads``: torch threads while the loops run (``None``: the same as the batched run). Returns
    seconds, the scores, and per loop ``[seconds, evaluations / image, calls / image]``."""
    batched_threads = torch.get_num_threads()
    loop_threads = loop_threads or batched_threads
    counters = {"batched": CountingDenoiser(batched_method), "loop": CountingDenoiser(loop_method)}
    loops = {
        "ref": lambda x: reference_style_scores(loop_method, x),
        "ours": lambda x: loop_method.native_scores(loop_method.forward_outputs(x), x),
    }
    out = {"ref": [0.0, 0.0, 0.0], "ours": [0.0, 0.0, 0.0], "batched_s": []}
    ref_scores = []
    chunks = loop_images.split(-(-len(loop_images) // max(1, repeats - 1))) if repeats > 1 else [loop_images]
    with torch.inference_mode():
        batched_method.native_scores(batched_method.forward_outputs(images[:2]), images[:2])  # warm-up
        torch.set_num_threads(loop_threads)
        for fn in loops.values():
            fn(loop_images[:1])
        for r in range(max(repeats, 1)):
            torch.set_num_threads(batched_threads)
            counters["batched"].reset()
            seconds, scores = timed(
                lambda: batched_method.native_scores(batched_method.forward_outputs(images), images), device
            )
            out["batched_s"].append(seconds)
            out["batched_scores"], out["batched_evals"] = scores, counters["batched"].images / len(images)
            torch.set_num_threads(loop_threads)
            for image in chunks[r] if r < len(chunks) else []:
                keys = ["ref", "ours"] if len(ref_scores) % 2 == 0 else ["ours", "ref"]
                for key in keys:
                    counters["loop"].reset()
                    seconds, scores = timed(lambda key=key, x=image[None]: loops[key](x), device)
                    out[key][0] += seconds
                    out[key][1] += counters["loop"].images / len(loop_images)
                    out[key][2] += counters["loop"].calls / len(loop_images)
                    if key == "ref":
                        ref_scores.append(scores)
    torch.set_num_threads(batched_threads)
    out["batched_s"] = statistics.median(out["batched_s"])
    out["ref_scores"] = {k: torch.cat([s[k] for s in ref_scores]) for k in ref_scores[0]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--classifier", help="a lightning-ood classifier checkpoint (default: random resnet10t)"
    )
    parser.add_argument(
        "--diffusion", help="a DiffusionModel checkpoint or pipeline folder (default: random)"
    )
    parser.add_argument("--images", type=int, default=64, help="images of the batched run")
    parser.add_argument(
        "--loop-images", type=int, default=None, help="images of each loop (default: --images)"
    )
    parser.add_argument("--batch", type=int, default=None, help="images per diffusion pass (default: all)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", default="classifier_free", choices=["classifier_free", "classifier"])
    parser.add_argument("--reference", default="unconditional", choices=["unconditional", "input"])
    parser.add_argument(
        "--grad-cam", action="store_true", help="the Grad-CAM mask (off: as the recorded measurements)"
    )
    parser.add_argument("--precision", default="32-true", choices=list(PRECISIONS))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--loop-precision", default=None, choices=list(PRECISIONS))
    parser.add_argument("--loop-channels-last", default=None, choices=["true", "false"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--loop-threads", type=int, default=None, help="torch threads of the loops (default: --threads)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="batched runs (the median counts), between parts of the loops"
    )
    parser.add_argument("--unet-timings", action="store_true")
    parser.add_argument("--header", action="store_true", help="print the table header first")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loop_precision = args.loop_precision or args.precision
    loop_cl = args.channels_last if args.loop_channels_last is None else args.loop_channels_last == "true"
    with tempfile.TemporaryDirectory() as tmp:
        classifier, diffusion = (
            (args.classifier, args.diffusion) if args.classifier else random_models(Path(tmp))
        )

        def build(precision: str, channels_last: bool) -> DiffGuard:
            return DiffGuard(
                classifier, diffusion, num_classes=10, in_chans=1, steps=args.steps, guidance=args.guidance,
                reference=args.reference, grad_cam=args.grad_cam, input_mean=[0.5], input_std=[0.5],
                detectors=[Energy()],
                combine_with=None, diffusion_batch_size=args.batch, diffusion_precision=precision,
                channels_last=channels_last,
            ).eval().to(device)  # fmt: skip

        batched_method, loop_method = (
            build(args.precision, args.channels_last),
            build(loop_precision, loop_cl),
        )
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(args.images, 1, 28, 28, generator=generator) * 2 - 1).to(device)
    loop_images = images[: args.loop_images or args.images]
    m = measure(batched_method, loop_method, images, loop_images, args.repeats, device, args.loop_threads)
    n_loop = len(loop_images)
    rates = {
        "batched": len(images) / m["batched_s"],
        "ref": n_loop / m["ref"][0],
        "ours": n_loop / m["ours"][0],
    }
    gaps = ", ".join(
        f"{k.removeprefix('diffguard_')} {float((m['ref_scores'][k] - v[:n_loop]).abs().max()):.1e}"
        for k, v in m["batched_scores"].items()
    )
    setting = f"{args.precision}{', channels_last' if args.channels_last else ''}"
    loop_setting = f"{loop_precision}{', channels_last' if loop_cl else ''}"
    if args.header:
        print(
            "| device | guidance | batched: setting, batch | loops: setting | images (batched / loops) "
            "| UNet evals / image (batched / reference loop / ours batch 1) "
            "| UNet calls / image (reference loop) | batched img/s | reference loop img/s | ours batch 1 img/s "
            "| speed-up vs reference loop | vs ours batch 1 |"
        )
        print("|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    if args.loop_threads and device.type == "cpu":
        name += f", loops x{args.loop_threads}"
    print(
        f"| {name} | {args.guidance.replace('_', '-')} | {setting}, {args.batch or len(images)} | {loop_setting} | "
        f"{len(images)} / {n_loop} | {m['batched_evals']:.0f} / {m['ref'][1]:.0f} / {m['ours'][1]:.0f} | "
        f"{m['ref'][2]:.0f} | {rates['batched']:.2f} | {rates['ref']:.2f} | {rates['ours']:.2f} | "
        f"{rates['batched'] / rates['ref']:.1f}x | {rates['batched'] / rates['ours']:.1f}x |"
    )
    print(f"\n{args.steps} DDIM steps; largest |reference loop - batched| per score: {gaps}")
    if args.unet_timings:
        with torch.inference_mode():
            sample = batched_method.diffusion.encode(batched_method.to_unit(images[:1]))
            threads = torch.get_num_threads()
            runs = (
                (setting, batched_method, threads),
                (loop_setting, loop_method, args.loop_threads or threads),
            )
            for label, method, n in runs:
                torch.set_num_threads(n)
                print(
                    f"UNet alone ({label}): {unet_timings(method, sample, args.batch or len(images), device)}"
                )


if __name__ == "__main__":
    main()
