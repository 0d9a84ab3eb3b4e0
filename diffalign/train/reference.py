"""The reference model, four ways (plus none):

- ``snapshot``: a copy of the trainable weights, swapped into the live network for its forwards and
  refreshed every ``objective.ref_refresh_every`` optimizer steps (online DPO); saved in every
  checkpoint, so a resumed run keeps the same reference.
- ``lora_off``: the same network with its LoRA adapters disabled (diffusers DPO ports). No second
  copy in memory; the reference is exactly the base weights, which resume reloads from the path.
- ``copy``: a frozen copy of the denoiser for full fine-tuning (Salesforce ``ref_unet``).
- ``none``: reference-free objectives (SFT, MaPO); no forward, no memory.

Reference forwards run under ``torch.inference_mode`` and in eval mode; the result is cloned into
a normal tensor so it can enter the loss next to policy tensors.

A reference is a fixed function of its inputs, so the ``lora_off`` forward switches the (training)
policy network to eval mode for its duration, like the ``copy`` model, which is always in eval mode,
and the precomputed reference (``train.precompute_reference``, see ``reference_weights``). In train
mode it differed from both: ModelScope's ``UNet3DConditionModel`` (text2video) has ``Dropout(0.1)``
in its temporal convolutions, so the reference was noisy; and diffusers' ``ResnetBlock2D`` makes its
input contiguous before the 1x1 ``conv_shortcut`` only when ``training`` (diffusers issue #12975),
and a convolution rounds differently over channels-last and contiguous tensors (~1e-7 on CPU): the
VAE's latents are channels-last-strided, and where no attention block (whose output is contiguous)
comes first, as in SDXL's and AudioLDM's first down block, they reach a shortcut in that layout.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

ReferenceMode = Literal["lora_off", "copy", "snapshot", "none"]


def resolve_mode(
    requested: str, lora_rank: int, needs_reference: bool, refresh_every: int = 0
) -> ReferenceMode:
    if not needs_reference:
        return "none"
    if refresh_every > 0:  # a moving reference: a snapshot of the trained weights
        return "snapshot"
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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the duration; each one's own flag is restored afterwards (a
    policy in train mode stays in train mode, whatever submodules were in eval stay in eval)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextmanager
def reference_weights(denoiser: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """The freshly loaded (fp32) denoiser computing exactly as the live reference of the same run
    will: in eval mode, with its floating-point weights and buffers cast to ``dtype``, the mixed-
    precision weight dtype (the live reference is the base after ``lora_base_dtype`` with LoRA
    disabled, or the ``copy`` cast to ``dtype``; autocast rounds matmul inputs the same either way,
    but ops that autocast keeps in fp32, e.g. the norms, use the weights as stored, so fp32 weights
    give errors ~1e-3 away from bf16 ones). The fp32 tensors are kept aside (peak memory 1.5x the
    fp32 denoiser with bf16/fp16) and put back unchanged afterwards, so the policy starts from them."""
    saved: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    if dtype != torch.float32:
        for m in denoiser.modules():
            saved += [(m, n, True, p.data) for n, p in m._parameters.items() if p is not None]
            saved += [(m, n, False, b) for n, b in m._buffers.items() if b is not None]
        denoiser.to(dtype)  # what lora_base_dtype / Reference(copy) do: floating-point tensors only
    try:
        with eval_mode(denoiser):
            yield denoiser
    finally:
        for m, n, is_param, t in saved:
            if is_param:
                m._parameters[n].data = t  # type: ignore[union-attr]
            else:
                m._buffers[n] = t


@torch.no_grad()
def swap_weights(live: dict[str, torch.Tensor], store: dict[str, torch.Tensor]) -> None:
    """Exchange live parameters with a stored set in place; call twice to undo."""
    for n, p in live.items():
        current = p.detach().clone()
        p.copy_(store[n].to(p.dtype))
        store[n] = current.to(store[n].dtype)


class Reference:
    def __init__(
        self,
        mode: ReferenceMode,
        denoiser: nn.Module,
        dtype: torch.dtype | None = None,
        trainable: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.mode = mode
        self.model: nn.Module | None = None
        self.snapshot: dict[str, torch.Tensor] = {}
        self._trainable = trainable or {}
        if mode == "copy":
            self.model = copy.deepcopy(denoiser).requires_grad_(False).eval()
            if dtype is not None:
                self.model.to(dtype)
        if mode == "snapshot":
            self.refresh()
        self._policy = denoiser

    def refresh(self) -> None:
        """``snapshot``: the reference becomes the current trained weights."""
        self.snapshot = {n: p.detach().clone() for n, p in self._trainable.items()}

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Yields the module to call for reference predictions."""
        if self.mode == "copy":
            assert self.model is not None
            yield self.model
        elif self.mode == "snapshot":
            # swapped in before the policy's forward of the same micro-batch (the loop computes the
            # reference first): swapping after it would modify tensors its graph saved
            swap_weights(self._trainable, self.snapshot)
            try:
                with eval_mode(self._policy):
                    yield self._policy
            finally:
                swap_weights(self._trainable, self.snapshot)
        elif self.mode == "lora_off":
            # eval mode: the reference is a fixed function (no dropout) and computes exactly like the
            # frozen copy and the precomputed reference (see the module docstring)
            with adapters_disabled(self._policy), eval_mode(self._policy):
                yield self._policy
        else:
            raise RuntimeError("no reference model in this run")

    def base_parameters(self) -> Iterator[torch.Tensor]:
        """The weights the reference computes with (for the resume fingerprint)."""
        if self.mode == "copy":
            assert self.model is not None
            yield from self.model.parameters()
        elif self.mode in ("lora_off", "snapshot"):  # snapshot: the frozen base under the trained set
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
