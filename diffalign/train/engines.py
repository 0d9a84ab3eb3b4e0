"""Which distributed engine runs a training launch, and FSDP2 sharding of the denoiser.

The engine is what the launch asked for (``accelerate launch --config_file configs/accelerate/...``
sets ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``), never a silent fallback: the loop
prints one start-up line naming it, refuses what it cannot honour, and records it in every
checkpoint's ``state.json`` together with how a live trainable parameter is laid out.

    single    one process
    ddp       accelerate's DistributedDataParallel (gloo on CPU, NCCL on GPUs)
    fsdp2     torch's ``fully_shard`` applied by diffalign itself, the same code on CPU (gloo) and on
              GPUs: accelerate turns an FSDP config into plain DDP when it runs on CPUs
              (``Accelerator(cpu=True)``), so the accelerator is kept in its DDP mode and never
              prepares (wraps) the denoiser
    deepspeed accelerate's DeepSpeed integration (GPUs only: accelerate ignores DeepSpeed on CPU)

FSDP2 wraps per family: each block of the denoiser's block lists (``WRAP_UNITS``: UNet
down/mid/up blocks, transformer blocks) is one unit whose parameters are all-gathered for its forward
and its gradients reduce-scattered after its backward, then the root takes the rest (embeddings,
norms, projections). LoRA is injected before sharding, so the adapters are sharded too. Parameters
become ``DTensor``s sharded on dim 0 over the processes; checkpoints and exports are consolidated
(full tensors, the same files as under DDP), so a run can resume under another engine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError

EngineName = Literal["single", "ddp", "fsdp2", "deepspeed"]

# the block lists whose elements become FSDP units, per family (found by attribute on the denoiser)
UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks")
WRAP_UNITS: dict[str, tuple[str, ...]] = {
    "sd": UNET_BLOCKS,
    "sdxl": UNET_BLOCKS,
    "animatediff": UNET_BLOCKS,
    "text2video": UNET_BLOCKS,
    "audioldm": UNET_BLOCKS,
    "sd3": ("transformer_blocks",),
    "flux": ("transformer_blocks", "single_transformer_blocks"),
    "wan": ("blocks",),
    "qwenimage": ("transformer_blocks",),
}


@dataclass(frozen=True)
class Engine:
    name: EngineName
    world: int
    reshard_after_forward: bool = True  # fsdp2: free the gathered block after its forward (ZeRO-3)

    @property
    def shards(self) -> bool:
        return self.name == "fsdp2"


def engine_from_launch(env: Mapping[str, str] = os.environ) -> Engine:
    """The engine the launch asked for (the environment ``accelerate launch`` sets from its config)."""
    world = int(env.get("WORLD_SIZE", "1"))
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = env.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(
                f"accelerate config fsdp_config.fsdp_version: {version}; diffalign runs FSDP2 only, "
                "set fsdp_version: 2 (configs/accelerate/fsdp.yaml)"
            )
        if world < 2:
            raise ConfigError(
                "accelerate config: FSDP with num_processes 1 has nothing to shard; launch 2 or more "
                "processes, or train without --config_file"
            )
        reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0")
        return Engine("fsdp2", world, reshard)
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if not torch.cuda.is_available():
            # accelerate ignores DeepSpeed when it runs on CPUs and would train plain DDP instead
            raise ConfigError(
                "accelerate config distributed_type: DEEPSPEED needs CUDA GPUs; on CPUs launch with "
                "configs/accelerate/fsdp_cpu2.yaml (FSDP2) or configs/accelerate/cpu2.yaml (DDP)"
            )
        return Engine("deepspeed", world)
    return Engine("ddp" if world > 1 else "single", world)


@contextmanager
def accelerator_env(engine: Engine) -> Iterator[None]:
    """While the ``Accelerator`` is built under fsdp2: hide the FSDP request from accelerate, which
    would prepare the model with its own FSDP on GPUs (and ignore it on CPUs); diffalign shards."""
    if not engine.shards:
        yield
        return
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def check_accelerator(engine: Engine, accelerator: Any) -> None:
    """What accelerate built must be what the engine needs (no silent DDP under an FSDP config)."""
    kind = accelerator.distributed_type.value
    want = {"single": ("NO",), "deepspeed": ("DEEPSPEED",)}.get(engine.name, ("MULTI_CPU", "MULTI_GPU"))
    if kind not in want:
        raise RuntimeError(f"engine {engine.name}: accelerate set up {kind}, expected one of {want}")


def deepspeed_setup(accelerator: Any, batch_size: int, dtype: torch.dtype) -> None:
    """What accelerate leaves to its caller under DeepSpeed. (1) The micro-batch: accelerate fills
    DeepSpeed's ``train_micro_batch_size_per_gpu: auto`` from a DataLoader passed to ``prepare`` and
    raises without one; diffalign prepares none (it batches itself), so it is ``train.batch_size``
    (DeepSpeed uses it for its batch bookkeeping; accumulation is 1). (2) Autocast: accelerate keeps
    ``accelerator.autocast()`` a no-op under DeepSpeed, which casts the parameters to bf16/fp16
    itself but not the inputs (fp32 latents and text embeddings) nor anything run outside its engine
    (the LoRA-off reference calls the inner denoiser), so it autocasts to ``dtype`` as on one GPU."""
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    if dtype != torch.float32:
        device = accelerator.device.type
        accelerator.autocast = lambda autocast_handler=None: torch.autocast(device, dtype=dtype)


def startup_line(engine: Engine, accelerator: Any, units: int = 0) -> str:
    """The one line saying which engine trains (printed by the main process)."""
    device = accelerator.device.type
    if engine.name == "fsdp2":
        mp = accelerator.mixed_precision
        precision = "fp32" if mp == "no" else f"{mp} compute, fp32 gradient reduction and master weights"
        return (
            f"engine: fsdp2 (torch fully_shard, {engine.world} processes on {device}, {units} block units "
            f"+ root, reshard_after_forward={engine.reshard_after_forward}, {precision})"
        )
    if engine.name == "ddp":
        return f"engine: ddp ({engine.world} processes on {device}, {accelerator.distributed_type.value})"
    if engine.name == "deepspeed":
        return f"engine: deepspeed ({engine.world} processes on {device})"
    return f"engine: single process on {device}"


def check_fsdp_config(cfg: Any) -> None:
    """Settings that run a forward on the main process alone would hang the other processes at the
    first all-gather under fsdp2; they fail before any model loads."""
    t = cfg.train
    for key, bad in (
        ("train.sample_prompts", bool(t.sample_prompts)),
        ("train.guard_every", bool(t.guard_every)),
    ):
        if bad:
            raise ConfigError(
                f"{key}: runs the denoiser on the main process only, which FSDP2 cannot shard; "
                "remove it under the FSDP launch config (or train with DDP)"
            )


# ----------------------------------------------------------------------------- FSDP2 wrapping


def wrap_units(denoiser: nn.Module, family: str) -> list[nn.Module]:
    """The modules that become FSDP units: each block of the family's block lists."""
    names = WRAP_UNITS.get(family)
    if names is None:
        raise ConfigError(f"FSDP2: no wrap policy for family {family!r}; known: {', '.join(WRAP_UNITS)}")
    units: list[nn.Module] = []
    for name in names:
        block = getattr(denoiser, name, None)
        if isinstance(block, nn.ModuleList):
            units += list(block)
        elif isinstance(block, nn.Module):
            units.append(block)
    if not units:
        raise ConfigError(
            f"FSDP2: {type(denoiser).__name__} has none of {names} (family {family!r}); nothing to wrap"
        )
    return units


def shard(
    module: nn.Module,
    family: str,
    device: torch.device,
    world: int,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool = True,
) -> int:
    """``fully_shard`` every block unit, then the root, in place; returns the number of units.

    ``param_dtype`` (mixed precision): parameters are all-gathered and computed in it, gradients are
    reduce-scattered in fp32 and the sharded master weights stay as they were (fp32 LoRA or full
    weights; a LoRA's frozen base is already in the low dtype). Call after LoRA injection and before
    the optimizer is built: the module's parameters are replaced by new ``DTensor`` parameters with
    the same names."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype is not None else None
    )
    units = wrap_units(module, family)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # FSDP fixes each unit's gradient dtypes (reduce in fp32, hand fp32 gradients to the fp32 master
    # weights) from the parameters that require gradients when its root initialises, lazily, at the
    # first forward. With the LoRA-off reference that forward runs with the adapters disabled, which
    # peft does by clearing their requires_grad: FSDP then saw no trainable parameter, reduce-scattered
    # in bf16 and gave bf16 gradients to fp32 parameters (an error under mixed precision with
    # train.grad_accum=1). The root initialises here instead, while the trainable parameters require
    # gradients (torch's private FSDPState._lazy_init; the first forward then skips it).
    fully_shard.state(module)._lazy_init()
    # A first forward under torch.inference_mode (the reference, rollouts) would allocate the
    # gathered parameters as inference tensors, which no later training forward may write into; one
    # gather outside it allocates them as normal tensors for the rest of the run.
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.unshard()
                m.reshard()
    return len(units)


@contextmanager
def gradient_sync(model: nn.Module, accelerator: Any, engine: Engine, sync: bool) -> Iterator[None]:
    """Gradient accumulation: reduce gradients over the processes only on the step's last micro-batch
    (DDP's ``no_sync``; FSDP2 keeps unsharded gradients locally until the synced backward)."""
    if engine.shards:
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]
        yield
        return
    with nullcontext() if sync else accelerator.no_sync(model):
        yield


def any_process(flag: bool, accelerator: Any) -> bool:
    """True on every process when it is True on any: decisions taken from a process's own clock
    (``train.max_minutes``) must be the same on all of them, or the ranks that go on wait for the one
    that stopped in their next collective, for ever. One 1-element all-reduce; none in one process."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "max").item())


def end_trackers(accelerator: Any) -> None:
    """What ``accelerator.end_training`` does at the end of a run except destroying the process group
    (:func:`release_process_group` does that once the run's models are gone)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def release_process_group() -> None:
    """Destroy the launch's process group (if any) after the run's objects are freed.

    ``accelerator.end_training`` destroys it while the prepared DDP/FSDP model still references it;
    the model's later deallocation then runs the gloo group's destructor *with the GIL held* (the
    DDP reducer's binding does not release it), and that destructor joins the group's worker threads,
    one of which may still be freeing a finished collective's tensors, which takes the GIL: a hang at
    exit (seen in a 2-process run on a loaded machine: the rank printed nothing more, its main thread
    in ``~ProcessGroupGloo`` from ``~Reducer``; pytorch/pytorch#56297). Collected first (prepared
    models sit in reference cycles), the registry holds the group's last reference, and dropping
    that one releases the GIL before the destructor runs."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def clip_grad_norm(params: list[Tensor], max_norm: float) -> Tensor:
    """Global gradient norm over the shards (and clipping to ``max_norm``) for DTensor parameters."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if is_dtensor(norm) else norm


# ----------------------------------------------------------------------------- consolidation


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole tensor (an all-gather for a sharded one: every process must call it)."""
    return t.full_tensor() if is_dtensor(t) else t


def full_tensors(tensors: Iterable[Tensor]) -> Iterator[Tensor]:
    """One gathered tensor at a time (peak memory: one parameter), e.g. for fingerprints."""
    for t in tensors:
        yield full(t.detach())


def consolidated(tensors: Mapping[str, Tensor], main: bool) -> dict[str, Tensor] | None:
    """Full CPU copies of sharded tensors on the main process (None elsewhere); every process calls
    it in the same order. Gathered one tensor at a time, so only the main process ever holds the
    whole set (on CPU)."""
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        whole = full(t.detach())
        if main:
            out[name] = whole.cpu()
    return out if main else None


def per_rank_state(state: Mapping[str, Tensor], main: bool, world: int) -> dict[str, Tensor] | None:
    """A process-local state from every process, on the main one as ``rank<r>.<key>`` (None
    elsewhere): a rollout source's round buffer holds each process's own samples, so one process's
    copy cannot resume the others. Sharded entries (DTensors, e.g. DiffusionNFT's old policy under
    fsdp2) are gathered whole first. Every process calls it, with the same keys in the same order."""
    local = {k: full(v.detach()).cpu() for k, v in state.items()}
    if world == 1:
        return {f"rank0.{k}": v for k, v in local.items()} if main else None
    import torch.distributed as dist

    everyone: list[Any] | None = [None] * world if main else None
    dist.gather_object(local, everyone, dst=0)  # pickled CPU tensors: gloo and NCCL alike
    if not main:
        return None
    return {f"rank{r}.{k}": v for r, part in enumerate(everyone or []) for k, v in part.items()}


def rank_state(state: Mapping[str, Tensor], rank: int, world: int, where: str) -> dict[str, Tensor]:
    """This process's part of a ``per_rank_state`` checkpoint entry. A checkpoint written before
    per-process states (plain keys) holds the main process's state only: usable by a one-process run
    (a rollout run resumes only with the process count it was written with)."""
    if state and not any(re.match(r"rank\d+\.", k) for k in state):
        if world > 1:
            raise ConfigError(
                f"--resume: {where} holds only the main process's rollout state (written by an older "
                f"diffalign), so {world} processes cannot resume it exactly; start the run again in a new "
                f"train.output_dir"
            )
        return dict(state)
    prefix = f"rank{rank}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def consolidated_optimizer(optimizer: torch.optim.Optimizer, main: bool) -> dict[str, Any] | None:
    """The optimizer's ``state_dict`` with every sharded state tensor (Adam moments) gathered: the
    same file as a DDP run's."""
    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        row = {}
        for key, value in sd["state"][idx].items():
            whole = full(value) if isinstance(value, Tensor) else value
            row[key] = whole.cpu() if isinstance(whole, Tensor) else whole
        state[idx] = row
    return {"state": state, "param_groups": sd["param_groups"]} if main else None


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` laid out as ``like`` (its local shard when ``like`` is a DTensor; no communication:
    every process read the same checkpoint)."""
    if not is_dtensor(like) or is_dtensor(whole):
        return whole.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        whole.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None
    )


def sharded_state(state: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's full tensors laid out like the parameters they belong to: a key that is a
    parameter's name, or ends with ``.`` + one (a rollout source's ``old.<name>``), with its shape."""
    out = {}
    for key, value in state.items():
        name = key if key in params else next((n for n in params if key.endswith("." + n)), None)
        like = params.get(name) if name is not None else None
        fits = like is not None and tuple(value.shape) == tuple(like.shape)
        out[key] = shard_like(value, like) if fits else value  # type: ignore[arg-type]
    return out


def load_optimizer(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a consolidated optimizer state into an optimizer over sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, row in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: shard_like(v, p) if isinstance(v, Tensor) and tuple(v.shape) == tuple(p.shape) else v
            for k, v in row.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def describe(params: Mapping[str, Tensor]) -> dict[str, Any]:
    """How the live trainable parameters are laid out (recorded in ``state.json``): type, placement,
    and local vs global element counts; a test that FSDP really shards reads this."""
    first = next(iter(params.values()), None)
    local = sum((p.to_local() if is_dtensor(p) else p).numel() for p in params.values())
    out: dict[str, Any] = {
        "type": type(first).__name__ if first is not None else "none",
        "local_numel": local,
        "numel": sum(p.numel() for p in params.values()),
    }
    if first is not None and is_dtensor(first):
        out["placements"] = [str(x) for x in first.placements]  # type: ignore[union-attr]
    return out
