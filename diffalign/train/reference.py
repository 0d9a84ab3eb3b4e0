"""The reference model, three ways (plus none):

- ``lora_off``: the same network with its LoRA adapters disabled (diffusers DPO ports). No second
  copy in memory; the reference is exactly the base weights, which resume reloads from the path.
- ``copy``: a frozen copy of the denoiser for full fine-tuning (Salesforce ``ref_unet``).
- ``none``: reference-free objectives (SFT, MaPO); no forward, no memory.

Reference forwards run under ``torch.inference_mode``; the result is cloned into a normal tensor
so it can enter the loss next to policy tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

ReferenceMode = Literal["lora_off", "copy", "none"]


def resolve_mode(requested: str, lora_rank: int, needs_reference: bool) -> ReferenceMode:
    if not needs_reference:
        return "none"
    if requested == "auto":
        return "lora_off" if lora_rank > 0 else "copy"
    if requested == "none":
        raise ValueError("train.reference: 'none' but the objective needs a reference model")
    return requested  # type: ignore[return-value]


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Toggle every peft LoRA layer (what diffusers' ``disable_adapters`` does, also for models
    without diffusers' peft mixin, e.g. ``UNet3DConditionModel``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    set_adapters_enabled(model, False)
    try:
        yield
    finally:
        set_adapters_enabled(model, True)


class Reference:
    def __init__(self, mode: ReferenceMode, denoiser: nn.Module, dtype: torch.dtype | None = None) -> None:
        self.mode = mode
        self.model: nn.Module | None = None
        if mode == "copy":
            self.model = copy.deepcopy(denoiser).requires_grad_(False).eval()
            if dtype is not None:
                self.model.to(dtype)
        self._policy = denoiser

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Yields the module to call for reference predictions."""
        if self.mode == "copy":
            assert self.model is not None
            yield self.model
        elif self.mode == "lora_off":
            with adapters_disabled(self._policy):
                yield self._policy
        else:
            raise RuntimeError("no reference model in this run")

    def base_parameters(self) -> Iterator[torch.Tensor]:
        """The weights the reference computes with (for the resume fingerprint)."""
        if self.mode == "copy":
            assert self.model is not None
            yield from self.model.parameters()
        elif self.mode == "lora_off":
            for n, p in self._policy.named_parameters():
                if "lora_" not in n:
                    yield p


@torch.no_grad()
def fingerprint(params: Iterator[torch.Tensor]) -> list[float]:
    """Cheap order-sensitive summary of a set of weights: [count, sum, sum of squares, weighted sum]."""
    n, s, s2, w = 0, 0.0, 0.0, 0.0
    for i, p in enumerate(params):
        q = p.detach().double()
        n += q.numel()
        s += float(q.sum())
        s2 += float((q * q).sum())
        w += (i + 1) * float(q.mean()) if q.numel() else 0.0
    return [float(n), s, s2, w]
