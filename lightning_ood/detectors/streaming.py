"""Small shared pieces of the detectors added in issue 22: float64 running sums reduced across ranks, and the
head / feature accessors of the detectors that recompute logits from (modified) penultimate features."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import DetectorInputs, all_reduce_max, all_reduce_sum
from lightning_ood.precision import at_least_float32, compute_dtype

_F64 = torch.float64
_MAX_DIMS = 4


class RunningSums:
    """Named float64 tensors summed over the fit batches of one rank, then over all ranks by :meth:`reduce`.

    Memory is the size of the sums, whatever the number of samples. A rank that saw no fit batch still takes
    part in :meth:`reduce` (the ranks first agree on every shape), so a DDP fit equals the one-process fit.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor) -> None:
        """Add ``value`` (any shape, fixed per name) to the sum ``name``, in float64."""
        value = value.detach().to(_F64)
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()

    def reduce(self, names: tuple[str, ...], *, device: torch.device, who: str) -> dict[str, Tensor]:
        """The sums over all ranks (a collective every rank must enter). Raises when no rank added ``names``."""
        info = []
        for name in names:
            shape = tuple(self.sums[name].shape) if name in self.sums else None
            if shape is not None and len(shape) > _MAX_DIMS:
                raise ValueError(f"RunningSums holds at most {_MAX_DIMS}-d tensors, got {shape} for {name!r}")
            info.append(
                [len(shape), *shape, *[0] * (_MAX_DIMS - len(shape))] if shape is not None else [-1] * 5
            )
        where = next(iter(self.sums.values())).device if self.sums else device
        agreed = all_reduce_max(torch.tensor(info, dtype=torch.long, device=where)).tolist()
        if any(row[0] < 0 for row in agreed):
            raise RuntimeError(
                f"detector {who!r}: no ID training batch on any rank (finalize() without update()); fit it on a "
                "non-empty ID training set"
            )
        shapes = [tuple(row[1 : 1 + row[0]]) for row in agreed]
        flat = torch.cat(
            [
                self.sums[n].reshape(-1)
                if n in self.sums
                else torch.zeros(s, dtype=_F64, device=where).reshape(-1)
                for n, s in zip(names, shapes, strict=True)
            ]
        )
        flat = all_reduce_sum(flat)
        out, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(torch.Size(shape).numel())
            out[name] = flat[start : start + size].reshape(shape).to(device)
            start += size
        return out

    def clear(self) -> None:
        self.sums = {}


def features_of(batch: DetectorInputs, who: str) -> Tensor:
    """``[B, D]`` features without autograd history, half / bfloat16 promoted to float32."""
    if batch.features is None:
        raise ValueError(f"{who} needs `features`")
    return at_least_float32(batch.features.detach()).flatten(1)


def logits_of(batch: DetectorInputs, who: str) -> Tensor:
    """``[B, C]`` logits without autograd history, half / bfloat16 promoted to float32."""
    if batch.logits is None:
        raise ValueError(f"{who} needs `logits`")
    return at_least_float32(batch.logits.detach())


def head_of(batch: DetectorInputs, who: str) -> nn.Linear:
    if batch.head is None:
        raise ValueError(f"{who} needs `head` (the final nn.Linear mapping features to logits)")
    return batch.head


def head_weights(batch: DetectorInputs, like: Tensor, who: str) -> tuple[Tensor, Tensor | None]:
    """The head's ``W`` ``[C, D]`` and ``b`` ``[C]`` (or ``None``), detached, in the wider of ``like``'s and
    their dtype (at least float32)."""
    head = head_of(batch, who)
    dtype = compute_dtype(like, head.weight)
    bias = None if head.bias is None else head.bias.detach().to(device=like.device, dtype=dtype)
    return head.weight.detach().to(device=like.device, dtype=dtype), bias


def linear_logits(batch: DetectorInputs, features: Tensor, who: str) -> Tensor:
    """``[B, C]`` logits ``h W^T + b`` of (modified) ``[B, D]`` features with the batch's head."""
    weight, bias = head_weights(batch, features, who)
    return nn.functional.linear(features.to(weight.dtype), weight, bias)


def energy_of(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``[B]`` free energy ``-T logsumexp(z / T)`` (higher = more OOD) of ``[B, C]`` logits."""
    return -temperature * torch.logsumexp(at_least_float32(logits) / temperature, dim=1)


def check_fraction(who: str, name: str, value: float, *, closed_high: bool = False) -> float:
    high_ok = value <= 1 if closed_high else value < 1
    if not (value >= 0 and high_ok):
        raise ValueError(f"{who} {name} must be in [0, 1{']' if closed_high else ')'}, got {value}")
    return float(value)
