"""DiffGuard's execution options for the diffusion network: channels_last (the same scores) and bf16 autocast
(close scores, within bounds derived below), each keeping batched scores equal to one-by-one scores; and the
speed benchmark's reference-style loop (the same scores, the reference code's network calls)."""

from __future__ import annotations

import pytest
import torch
from diffusion_helpers import SIZE, tiny_denoiser, tiny_diffguard

#: bf16 keeps 8 significant bits: unit roundoff u = 2^-8.
BF16_U = 2.0**-8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("diffguard_execution")


def images(n: int = 5, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def scores_of(dg, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return dg.native_scores(dg.forward_outputs(x), x)


def one_by_one(dg, x: torch.Tensor) -> dict[str, torch.Tensor]:
    single = [scores_of(dg, x[i : i + 1]) for i in range(len(x))]
    return {k: torch.cat([s[k] for s in single]) for k in single[0]}


@pytest.mark.parametrize("guidance", ["classifier_free", "classifier"])
def test_channels_last_gives_the_same_scores(root, guidance):
    x = images()
    reference = tiny_diffguard(root, guidance=guidance)
    plain = scores_of(reference, x)
    nhwc = tiny_diffguard(root, guidance=guidance, channels_last=True)
    conv, plain_conv = (m.diffusion.unet.down_blocks[0].resnets[0].conv1 for m in (nhwc, reference))
    assert conv.weight.shape[1] > 1  # with one input channel both memory orders coincide
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain_conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    hook = conv.register_forward_hook(
        lambda m, args, out: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    fast = scores_of(nhwc, x)
    hook.remove()
    assert seen and all(seen)  # the network really ran in NHWC order
    for name, value in plain.items():
        # the same arithmetic in another memory order: only the summation order of the convolutions changes
        torch.testing.assert_close(fast[name], value, rtol=1e-5, atol=1e-5, msg=name)
    for name, value in one_by_one(nhwc, x).items():
        torch.testing.assert_close(fast[name], value, rtol=1e-3, atol=1e-6, msg=name)


def test_bf16_runs_the_network_alone_in_bf16_and_its_noise_within_the_rounding_bound():
    den = tiny_denoiser()
    x, labels = (
        torch.randn(16, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3)),
        torch.arange(16) % 4,
    )
    dtypes = []
    den.unet.conv_out.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    for t in (5, 50, 99):
        tt = torch.full((16,), t)
        with torch.no_grad():
            exact = den.set_execution("32-true").noise(x, tt, labels)
            rounded = den.set_execution("bf16-mixed").noise(x, tt, labels)
        assert rounded.dtype == torch.float32  # the DDIM arithmetic around the network stays in float32
        relative = float((rounded - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())
        # Autocast rounds the inputs and weights of every convolution and linear layer to bf16 (float32
        # accumulation): each rounding is a relative error of at most u. The tiny UNet has about 25 such layers
        # in a row, so about 50 rounded operands; independent errors add in quadrature, sqrt(50) u ~ 7 u. Bound:
        # 8 u = 2^-5 (measured: 3.3 u).
        assert 0 < relative < 8 * BF16_U, t
    assert dtypes == [torch.float32, torch.bfloat16] * 3
    with pytest.raises(ValueError, match="precision must be one of"):
        den.set_execution("bf16")


def test_bf16_scores_stay_close_to_float32(root):
    x = images(8, seed=4)
    exact = scores_of(tiny_diffguard(root), x)
    bf16 = tiny_diffguard(root, diffusion_precision="bf16-mixed")
    rounded = scores_of(bf16, x)
    batch_one = one_by_one(bf16, x)
    for name, value in exact.items():
        spread = float(value.std())
        # Classifier-free guidance with w = 10 multiplies the network's rounding error (< 8 u, test above) by
        # |(1 - w) + w| in quadrature ~ 13.5, then DDIM carries it through inversion and regeneration: the
        # regenerations move by about 2 % of the pixel range (measured). A detector only needs the order of the
        # images, so the bound is a quarter of the spread of the scores across these images (measured: <= 11 %).
        assert float((rounded[name] - value).abs().max()) < 0.25 * spread, name
        # one image at a time, bf16 kernels may round differently: the same bound as for the precision change
        assert float((batch_one[name] - rounded[name]).abs().max()) < 0.25 * spread, name


@pytest.mark.parametrize("guidance", ["classifier_free", "classifier"])
def test_the_benchmarks_reference_loop_computes_the_same_scores_with_the_reference_codes_calls(
    root, guidance, monkeypatch
):
    # benchmarks/diffguard_speed.py times DiffGuard against this loop: it must compute the same scores, with the
    # reference code's calls per image (docs/diffguard.md): classifier-free 4 S evaluations in 3 S calls (batch
    # 1, 2, 1 per step); classifier guidance 4 S in 3 S (inversion; guided + reference as a pair; the guidance
    # function's second evaluation of the guided image, with autograd recording)
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from diffguard_reference_loop import reference_style_scores

    dg = tiny_diffguard(root, guidance=guidance, reference="unconditional")  # the pattern with uncond_aux
    steps = len(dg.timesteps) - 1
    calls = []
    original = dg.diffusion.predict_noise

    def spy(x, t, labels):
        calls.append((len(x), torch.is_grad_enabled() and x.requires_grad))
        return original(x, t, labels)

    dg.diffusion.predict_noise = spy
    x = images(3, seed=5)
    batched = scores_of(dg, x)
    calls.clear()
    with torch.no_grad():
        looped = [reference_style_scores(dg, x[i : i + 1]) for i in range(len(x))]
    per_image = calls[: len(calls) // len(x)]
    assert len(calls) == 3 * steps * len(x) and sum(n for n, _ in calls) == 4 * steps * len(x)
    recorded = [c for c in per_image if c[1]]
    assert len(recorded) == (
        steps if guidance == "classifier" else 0
    )  # autograd on: the reference's recompute
    for name, value in batched.items():
        torch.testing.assert_close(
            torch.cat([s[name] for s in looped]), value, rtol=1e-3, atol=1e-6, msg=name
        )


def test_the_speed_benchmark_runs_the_loops_at_their_own_thread_count(root, monkeypatch):
    # --loop-threads: the loops run at their own torch thread count, the batched runs at the caller's, and the
    # caller's count is restored afterwards
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from diffguard_speed import measure

    batched, loop = tiny_diffguard(root), tiny_diffguard(root)
    seen = {"batched": set(), "loop": set()}
    for key, method in (("batched", batched), ("loop", loop)):
        original = method.diffusion.predict_noise

        def spy(x, t, labels, key=key, original=original):
            seen[key].add(torch.get_num_threads())
            return original(x, t, labels)

        method.diffusion.predict_noise = spy
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = images(3, seed=7)
        out = measure(batched, loop, x, x[:2], repeats=2, device=torch.device("cpu"), loop_threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == {"batched": {2}, "loop": {1}}
    assert out["ref"][0] > 0 and out["ours"][0] > 0 and out["batched_s"] > 0
    for name, value in out["batched_scores"].items():
        torch.testing.assert_close(out["ref_scores"][name], value[:2], rtol=1e-3, atol=1e-6, msg=name)


def test_the_merged_call_pattern_benchmark_makes_the_same_evaluations_but_one_shared(monkeypatch):
    # benchmarks/diffusion_network_options.py compares two call patterns of a classifier-free round trip: both
    # must evaluate the network on the same images (4 S B evaluations; merged shares the first step's eps_null:
    # one B fewer), in 3 S calls against 2 S
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import diffusion_network_options as options

    sizes = []
    monkeypatch.setattr(options, "call", lambda net, batch, dtype: sizes.append(batch))
    steps, b = 4, 5
    options.round_trip(None, b, steps, None, merged=False)
    assert sizes == [b] * steps + [2 * b, b] * steps
    sizes.clear()
    options.round_trip(None, b, steps, None, merged=True)
    assert sizes == [b] * steps + [2 * b] + [3 * b] * (steps - 1)
    assert sum(sizes) == 4 * steps * b - b
