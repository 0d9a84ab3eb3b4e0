"""Where the training loop's micro-batches come from: one interface, two kinds of source.

    source.micro_batches                      # micro-batches per optimizer step (this process)
    source.batches(first_step, last_step, model) -> Iterator[batch]   # loop order, lazily
    source.terms(model, batch) -> per-sample terms (objective.terms), policy or reference
    source.step_metrics() -> dict[str, Tensor]    # what the step's batches measured (rewards, ...)
    source.after_step(step, trainable)            # e.g. DiffusionNFT's old-policy update
    source.state_dict() / load_state_dict(...)    # what an exact resume needs (rollout buffers)

- ``DatasetSource`` (this file): pairs / ranked sets from files along a ``StepPlan``; the terms are
  denoising errors ``[B, k]`` on shared noise and timesteps (or on the objective's own noised inputs,
  InPO/SmPO's inversion).
- rollout sources (``train.rollout``, ``train.spo_rollout``): groups sampled by the current policy
  and scored by rewards, every round of ``updates_per_rollout`` optimizer steps.

A batch is a dict; every source sets ``seed`` (the micro-batch's position seed, which also seeds the
global RNG for dropout), ``skipped`` (data rows skipped, counted) and ``loss_weight`` (1, or 0 for a
batch that must still run a backward so DDP stays in step, e.g. an SPO round without a kept pair).
The objective reads the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from ..config import ConfigError
from ..data.pairs import collate
from ..data.sampler import StepPlan
from ..models.base import Adapter, per_sample_error


class Source(Protocol):
    micro_batches: int
    rewards: dict[str, Any]
    """The training reward models (rollout sources; empty for datasets): the guard's proxy."""

    def batches(
        self, first_step: int, last_step: int, model: torch.nn.Module
    ) -> Iterator[dict[str, Any]]: ...

    def terms(self, model: torch.nn.Module, batch: dict[str, Any]) -> Tensor | dict[str, Tensor]: ...

    def step_metrics(self) -> dict[str, Tensor]: ...

    def after_step(self, step: int, trainable: dict[str, Tensor]) -> None: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def close(self) -> None:
        """Release what the source started (a reward process); the loop calls it on every exit."""
        ...


# ----------------------------------------------------------------------------- shared pieces


def noised_inputs(adapter: Adapter, x0: Tensor, seeds: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """x0 ``[B,k,C,h,w]`` -> (x_t ``[B*k,...]``, t ``[B*k]``, target ``[B*k,...]``).

    Noise and timestep are drawn once per group from the group's own generator and shared by its
    k images (winner and loser see the same eps and t, as in every reference implementation)."""
    B, k = x0.shape[:2]
    noise, ts = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        ts.append(adapter.sample_timestep(g))
        noise.append(torch.randn(x0.shape[2:], generator=g))
    eps = torch.stack(noise).to(x0.device, x0.dtype)[:, None].expand_as(x0).flatten(0, 1)  # [B*k,C,h,w]
    t = torch.stack(ts).to(x0.device).repeat_interleave(k)  # [B*k]
    x0f = x0.flatten(0, 1)
    return adapter.add_noise(x0f, eps, t), t, adapter.target(x0f, eps, t)


def group_errors(
    adapter: Adapter,
    model: torch.nn.Module,
    x_t: Tensor,
    t: Tensor,
    target: Tensor,
    cond: dict[str, Tensor],
    micro: Tensor | None,
    k: int,
) -> Tensor:
    """One fused forward over all B*k images; returns per-sample errors ``[B, k]``."""
    pred = adapter.predict(x_t, t, cond, micro, model=model)
    return per_sample_error(pred, target).view(-1, k)


def error_terms(adapter: Adapter, model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
    """Denoising errors ``[B, k]`` of a prepared batch (``x_t``, ``t``, ``target``, ``cond``, ``micro``
    flattened b-major over its k images)."""
    return group_errors(
        adapter, model, batch["x_t"], batch["t"], batch["target"], batch["cond"], batch["micro"], batch["k"]
    )


def prepare_batch(
    adapter: Adapter, batch: dict[str, Any], k: int, device: torch.device, per_image_captions: bool = False
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Latents ``[B,k,C,h,w]``, text conditioning per image ``[B*k,...]``, micro ids ``[B*k,6]``.

    One caption per group is encoded once and repeated for its k images; with
    ``per_image_captions`` (DCPO) every image gets its own caption from ``batch['captions']``."""
    if "latents" in batch:  # from `diffalign cache`
        x0 = batch["latents"][:, :k].to(device)
    else:
        pix = batch["pixels"][:, :k]  # [B,k,3,R,R]
        x0 = adapter.encode_chunked(pix.flatten(0, 1).to(device)).unflatten(0, pix.shape[:2])
    if per_image_captions:
        if "captions" not in batch:
            raise ConfigError("this objective needs per-image captions: data columns caption_0 and caption_1")
        cond = adapter.encode_prompts(
            [c for caps in batch["captions"] for c in caps[:k]]
        )  # b-major: [B*k,...]
    else:
        cond = batch["cond"] if "latents" in batch else adapter.encode_prompts(batch["caption"])
        cond = {n: v.to(device).repeat_interleave(k, 0) for n, v in cond.items()}
    micro = batch["micro"].to(device).repeat_interleave(k, 0)
    return x0, cond, micro


def batch_stream(
    dataset: Any, plan: StepPlan, first: int, last: int, rank: int, num_workers: int = 0
) -> Iterator[dict]:
    """This rank's collated micro-batches for steps ``[first, last)`` in loop order (step-major, then
    micro-batch). ``num_workers`` > 0 decodes and augments them in DataLoader worker processes, ahead
    of the loop; the batches are the same either way (every key carries its own seed)."""
    if num_workers <= 0:
        return (collate([dataset[key] for key in keys]) for keys in plan.batches(first, last, rank))
    from torch.utils.data import DataLoader

    # its own generator: starting workers draws a base seed, which from the global RNG would shift
    # whatever is initialised from it afterwards (LoRA weights after the reference pre-pass)
    return iter(
        DataLoader(
            dataset,
            batch_sampler=list(plan.batches(first, last, rank)),
            num_workers=num_workers,
            collate_fn=collate,
            prefetch_factor=2,
            generator=torch.Generator().manual_seed(0),
        )
    )


# ----------------------------------------------------------------------------- the dataset source


class DatasetSource:
    """Pairs or ranked sets from files (``data.*``), ``grad_accum`` micro-batches per step."""

    def __init__(
        self,
        dataset: Any,
        plan: StepPlan,
        objective: Any,
        adapter: Adapter,
        k: int,
        rank: int,
        device: torch.device,
        num_workers: int = 0,
    ) -> None:
        self.dataset, self.plan, self.objective, self.adapter = dataset, plan, objective, adapter
        self.k, self.rank, self.device, self.num_workers = k, rank, device, num_workers
        self.micro_batches = plan.A  # grad_accum
        self.rewards: dict[str, Any] = {}

    def batches(self, first_step: int, last_step: int, model: torch.nn.Module) -> Iterator[dict[str, Any]]:
        """Collated rows -> latents, conditioning and the noised inputs, one micro-batch at a time
        (lazily: InPO/SmPO invert with the model as it is when the micro-batch is reached)."""
        obj, k = self.objective, self.k
        for raw in batch_stream(self.dataset, self.plan, first_step, last_step, self.rank, self.num_workers):
            x0, cond, micro = prepare_batch(
                self.adapter, raw, k, self.device, per_image_captions=obj.per_image_captions
            )
            if obj.noises_inputs:  # InPO/SmPO: inversion with the current model
                x_t, t, target = obj.noised_inputs(self.adapter, model, x0, cond, micro, raw["seed"])
            else:
                x_t, t, target = noised_inputs(self.adapter, x0, raw["seed"])
            yield {
                **raw,
                "seed": raw["seed"][0],
                "skipped": sum(raw["skipped"]),
                "loss_weight": 1.0,
                "k": k,
                "x_t": x_t,
                "t": t,
                "target": target,
                "cond": cond,
                "micro": micro,
            }

    def terms(self, model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
        return error_terms(self.adapter, model, batch)

    def step_metrics(self) -> dict[str, Tensor]:
        return {}

    def after_step(self, step: int, trainable: dict[str, Tensor]) -> None:
        pass

    def state_dict(self) -> dict[str, Tensor]:
        return {}  # every batch derives from (seed, position): nothing to keep

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass

    def close(self) -> None:
        pass  # nothing started
