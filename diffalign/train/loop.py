"""The training loop: one explicit function for every objective, read it top to bottom.

    setup: validate config -> accelerator -> objective -> data (dataset source) -> adapter
           -> (reference pre-pass) -> LoRA -> reference -> (rollout source) -> optimizer / LR
           schedule / EMA -> resume (weights, optimizer, reference snapshot, source state)
    for each optimizer step:
        for each micro-batch of the source (``source.micro_batches``):
            batch <- source (a dataset source reads pairs and noises them; a rollout source samples
                     a round with the current policy when one starts, scores it with rewards)
            reference terms (inference mode) -> policy terms (``source.terms``: errors [B,k],
            log-probs, velocities, as ``objective.terms`` declares) -> objective -> backward
        clip -> optimizer step -> LR step -> EMA -> source.after_step -> (reference refresh)
        -> log -> checkpoint (atomic; includes what the source needs to resume exactly)

Variation comes from what the loop is fed (``train.sources``, ``train.rollout``) and from the
objective's declared capabilities (``objectives.base.Objective``), never from its name. Every random
draw is derived from (seed, stream position) (``diffalign.data.sampler``), which is what makes
gradient accumulation, multi-process runs and resumes reproduce a single-process run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._quiet import quiet_libraries
from ..config import Config, ConfigError, to_dict, validate
from ..data.cache import AUTO, CachedPairs, auto_cache, images_dataset
from ..data.sampler import StepPlan
from ..models.base import Adapter
from ..models.loading import load_adapter
from . import engines
from .checkpoint import checkpoint_step, load_checkpoint, resume_point, save_checkpoint
from .guards import BadStepGuard
from .provenance import RunLock, record_config, truncate_metrics
from .reference import Reference, fingerprint, reference_weights, resolve_mode, swap_weights
from .sources import DatasetSource
from .stability import (
    AutoBeta,
    DivergenceMonitor,
    cap_margins,
    check_supports_beta,
    gradient_factor,
    with_beta_scale,
)
from .tracking import init_tracking, log_samples, log_with

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.inference_mode()
def precompute_reference(
    source: DatasetSource,
    objective: Any,
    adapter: Adapter,
    first: int,
    last: int,
    accelerator: Any,
    show: bool = True,
) -> dict[tuple[int, int], Tensor]:
    """Reference errors ``[B,k]`` for every (step, micro-batch) of this rank in ``[first, last)``:
    the same pairs, noise and t the training steps will draw (all derive from data positions), and
    the same weights, dtype and (eval) mode as the live reference (``reference_weights``), so the
    loss is bit-identical to the one with a live reference model. CPU tensors, a few bytes per pair."""
    from tqdm.auto import tqdm

    if objective.noises_inputs:
        raise ConfigError(
            "train.precompute_reference: this objective builds its inputs with the current model "
            "(inversion); its reference errors cannot be computed ahead"
        )
    table = {}
    steps = tqdm(range(first, last), desc="reference pre-pass", unit="step", disable=not show)
    # the live reference computes with weights in the mixed-precision dtype (LoRA base or frozen copy)
    with reference_weights(adapter.denoiser, DTYPES[accelerator.mixed_precision]) as ref_model:
        batches = source.batches(first, last, ref_model)
        for step in steps:
            for micro_i in range(source.micro_batches):
                batch = next(batches)
                with accelerator.autocast():
                    table[(step, micro_i)] = source.terms(ref_model, batch).float().cpu()
    return table


# ----------------------------------------------------------------------------- setup helpers


def make_optimizer(cfg: Config, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay
        )
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay
        )
    from transformers.optimization import Adafactor

    # the official SDXL recipe's settings
    return Adafactor(
        params,
        lr=lr,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
        clip_threshold=1.0,
        weight_decay=t.weight_decay,
    )


def add_lora(denoiser: torch.nn.Module, cfg: Config) -> None:
    from peft import LoraConfig

    lc = cfg.lora
    denoiser.requires_grad_(False)
    config = LoraConfig(
        r=lc.rank,
        lora_alpha=lc.alpha if lc.alpha is not None else lc.rank,
        lora_dropout=lc.dropout,
        init_lora_weights="gaussian" if lc.init == "gaussian" else True,
        target_modules=list(lc.target_modules),
    )
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(config)
    else:  # denoisers without diffusers' peft mixin (UNet3DConditionModel): plain peft injection
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, denoiser)
        denoiser.peft_config = {"default": config}  # where add_adapter keeps it, for the exporter
    names = [n for n, p in denoiser.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError(
            f"lora.target_modules {lc.target_modules} matched no layer of the {type(denoiser).__name__}"
        )


def lora_base_dtype(denoiser: torch.nn.Module, weight_dtype: torch.dtype) -> None:
    """Low-precision frozen base, fp32 adapters (mixed-precision LoRA)."""
    if weight_dtype != torch.float32:
        denoiser.to(weight_dtype)
        for p in denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()


def memory_options(denoiser: torch.nn.Module, cfg: Config) -> None:
    t = cfg.train
    if t.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if t.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if t.attention == "xformers":
        denoiser.enable_xformers_memory_efficient_attention()


def exporter(adapter: Adapter, lora: bool):
    """A function writing the current denoiser weights in diffusers format to a folder."""

    def export(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        den = adapter.denoiser
        if lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            if has_lora_loader(adapter.pipe):
                layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(den))
                type(adapter.pipe).save_lora_weights(
                    str(folder), **{f"{adapter.denoiser_name}_lora_layers": layers}, safe_serialization=True
                )
            else:
                # pipelines without diffusers' LoRA loader (AudioLDM, text-to-video):
                # peft state dict + config
                from safetensors.torch import save_file

                save_file(
                    {k: v.contiguous() for k, v in get_peft_model_state_dict(den).items()},
                    folder / "lora.safetensors",
                )
                cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in _peft_config(den).items()}
                (folder / "lora_config.json").write_text(json.dumps(cfg, default=str))
        else:
            den.save_pretrained(str(folder / adapter.denoiser_name), safe_serialization=True)

    return export


def exporter_from(export, denoiser: torch.nn.Module, weights: dict[str, Tensor], lora: bool):
    """``export`` writing consolidated ``weights`` (gathered from a sharded run; main process) instead
    of the live, sharded module: the denoiser's ``state_dict`` returns them for the duration, so
    diffusers and peft write exactly the files a DDP run writes (split into files as they split)."""

    def run(folder: Path) -> None:
        if lora:  # the adapters alone (peft picks the lora_ keys); the frozen base is not exported
            full = dict(weights)
        else:  # every parameter is trainable; buffers are never sharded
            full = {k: weights.get(k, v) for k, v in denoiser.state_dict().items()}
            if any(engines.is_dtensor(v) for v in full.values()):
                raise RuntimeError("export: a sharded tensor outside the trainable set was not gathered")
        denoiser.state_dict = lambda *a, **k: full  # type: ignore[method-assign]
        try:
            export(folder)
        finally:
            del denoiser.state_dict  # the class's method again

    return run


def has_lora_loader(pipe: Any) -> bool:
    """diffusers can save and load this pipeline's denoiser LoRA itself."""
    den = getattr(pipe, "transformer", None) or pipe.unet
    return hasattr(type(pipe), "save_lora_weights") and hasattr(den, "load_lora_adapter")


def _peft_config(model: torch.nn.Module) -> dict[str, Any]:
    return {k: v for k, v in model.peft_config["default"].to_dict().items() if k in LORA_CONFIG_KEYS}


LORA_CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout", "init_lora_weights")


class EMA:
    """Exponential moving average of the trainable parameters (fp32 shadow)."""

    def __init__(self, params: dict[str, Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, Tensor]) -> None:
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def swap(self, params: dict[str, Tensor]) -> None:
        """Exchange live weights and shadow (call twice to undo)."""
        swap_weights(params, self.shadow)  # fp32 shadow: the live dtype is restored on the way in


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, resume: str | None = None, allow_config_change: bool = False) -> dict[str, Any]:
    """Train according to ``cfg``. ``resume``: ``latest`` or a checkpoint folder;
    ``allow_config_change``: accept (and record) settings that differ from the resumed run's.
    Returns final metrics. The run folder is locked while this runs (``provenance.RunLock``)."""
    quiet_libraries()
    validate(cfg)  # everything that can fail without weights fails here (a prompts file for rollouts)
    # one writer per run folder: the main process of this launch holds the lock (RANK: accelerate launch)
    lock = RunLock(Path(cfg.train.output_dir)).acquire() if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        # what the run starts and must stop on every exit (the source's reward process)
        with contextlib.ExitStack() as cleanup:
            return _train(cfg, resume, allow_config_change, cleanup)
    finally:
        engines.release_process_group()  # after _train's frame (the prepared model) is gone
        if lock is not None:
            lock.release()


def load_dataset(
    cfg: Config, objective: Any, world: int, main: bool, barrier: Callable[[], None] = lambda: None
) -> tuple[Any, StepPlan, int]:
    """The dataset source's rows and step plan (before the model: bad data fails fast and cheaply).
    ``data.cache_dir: auto`` is resolved here (``data.cache.auto_cache``; ``barrier``: every process
    of the launch waits while the main one builds)."""
    t = cfg.train
    if cfg.data.cache_dir == AUTO:
        dataset = images_dataset(cfg.data, verbose=main)
        rows_read = t.max_steps * t.batch_size * t.grad_accum * world  # what the step plan draws
        needs = "reward scores" if objective.needs_scores else ""  # what a cache does not hold
        needs = "a caption per image" if objective.per_image_captions else needs
        cached, how = auto_cache(cfg, dataset, rows_read, needs, main, barrier)
        dataset = cached if cached is not None else dataset
        if main:
            print(f"latent cache (data.cache_dir=auto): {how}")
    elif cfg.data.cache_dir:
        dataset = CachedPairs(cfg.data, cfg.model)
    else:
        dataset = images_dataset(cfg.data, verbose=main)
    k = 1 if objective.winner_only else dataset.k
    if objective.needs_scores and not getattr(dataset, "has_scores", False):
        raise ConfigError(
            f"objective {cfg.objective.name!r} needs per-image reward scores: set data.score_column "
            "(e.g. pickscore for score_0.pickscore/score_1.pickscore written by `diffalign label`; "
            "not available with data.cache_dir) and match objective.score_range to the scores' scale"
        )
    if objective.kind == "preference" and k != 2:
        raise ConfigError(
            f"objective {cfg.objective.name!r} trains on pairs but the data has {k} images per prompt; "
            f"use objective.name=rankdpo or export the ranked set to pairs"
        )
    return dataset, StepPlan(len(dataset), t.seed, t.batch_size, t.grad_accum, world), k


def check_rollout_config(cfg: Config, objective: Any) -> None:
    """Settings a rollout source cannot honour fail before any model loads."""
    from ..models.loading import FAMILY_MODALITY, resolve_family

    t, name = cfg.train, cfg.objective.name
    unsupported = [
        key
        for key, bad in (
            ("train.precompute_reference", t.precompute_reference),  # the samples do not exist yet
            ("data.cache_dir", bool(cfg.data.cache_dir) and cfg.data.cache_dir != AUTO),  # auto: no data
        )
        if bad
    ]
    if unsupported:
        raise ConfigError(
            f"objective {name!r} samples its training groups online and does not support "
            f"{', '.join(unsupported)}; remove it from the config"
        )
    family = resolve_family(cfg.model)  # reads model_index.json only
    if FAMILY_MODALITY[family] != "image":  # groups are scored by image rewards on [B,3,H,W]
        raise ConfigError(
            f"objective {name!r} (online) trains image models (sd, sdxl, sd3, flux, qwenimage); "
            f"{cfg.model.path} is a {FAMILY_MODALITY[family]} model ({family!r})"
        )


def build_rollout_source(
    cfg: Config, objective: Any, adapter: Adapter, accelerator: Any, trainable: dict[str, Tensor]
) -> Any:
    """The rollout source for the objective's declared terms."""
    from .rollout import GRPORollouts, NFTRollouts, PairRollouts
    from .spo_rollout import StepwiseRollouts

    if objective.terms == "errors":
        return PairRollouts(objective, adapter, cfg, accelerator)
    if objective.terms == "transition_log_probs":
        return StepwiseRollouts(objective, adapter, cfg, accelerator)
    if objective.terms == "sde_steps":
        return GRPORollouts(objective, adapter, cfg, accelerator)
    return NFTRollouts(objective, adapter, cfg, accelerator, trainable)


def _train(  # noqa: C901 (the one flat training loop, read top to bottom)
    cfg: Config, resume: str | None, allow_config_change: bool, cleanup: contextlib.ExitStack
) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ..objectives import build_objective

    t = cfg.train
    run_dir = Path(t.output_dir)
    # accelerate keeps one global state per process; a second train() in the same process (tests,
    # notebooks, the demo) may ask for another precision, so start from a clean state (the
    # process-group part, PartialState, is kept)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    engine = engines.engine_from_launch()  # what the launch config asked for; refused, never replaced
    if engine.shards:
        engines.check_fsdp_config(cfg)
    # cpu=True without CUDA lets `accelerate launch --num_processes N` form a gloo group on CPUs
    with engines.accelerator_env(engine):  # fsdp2: accelerate stays in DDP mode, diffalign shards
        accelerator = Accelerator(
            mixed_precision=t.mixed_precision,
            log_with=log_with(cfg),
            project_dir=str(run_dir),
            cpu=not torch.cuda.is_available(),
        )
    engines.check_accelerator(engine, accelerator)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if accelerator.distributed_type.value == "DEEPSPEED" and t.grad_accum > 1:
        # DeepSpeed steps inside backward(); diffalign's own accumulation would double-count
        raise ConfigError(
            "train.grad_accum: must be 1 under DeepSpeed; raise batch_size or use DDP/FSDP for accumulation"
        )
    if accelerator.distributed_type.value == "DEEPSPEED":  # its micro-batch and autocast (see there)
        engines.deepspeed_setup(accelerator, t.batch_size, DTYPES[t.mixed_precision])
    set_seed(t.seed)  # global RNGs (LoRA's initial A matrices, dropout); re-seeded per micro-step below
    objective = build_objective(cfg.objective)
    rollout = objective.source == "rollout"
    auto_beta = AutoBeta(t.auto_beta_target, t.auto_beta_rate) if t.auto_beta_target > 0 else None
    base_beta = check_supports_beta(objective, cfg.objective.name) if auto_beta else 0.0
    guard = BadStepGuard(t.max_bad_steps)
    if t.lr == 0 and main:  # allowed (e.g. to snapshot the initial LoRA), but never by accident
        print("warning: train.lr=0: the trainable weights will not change")
    divergence = DivergenceMonitor(t.divergence_window)
    weight_dtype = DTYPES[t.mixed_precision]
    ckpt_path = resume_point(run_dir, resume)
    resumed_step = checkpoint_step(ckpt_path)
    # every rank checks (same verdict everywhere), the main process writes the record
    record_config(run_dir, cfg, resumed_step, allow_config_change, write=main, checkpoint=ckpt_path)

    # -- data (before the model: bad data fails fast and cheaply)
    if rollout:
        check_rollout_config(cfg, objective)
        global_batch = t.batch_size * t.grad_accum * world  # prompts per optimizer step (or round)
    else:
        dataset, plan, k = load_dataset(cfg, objective, world, main, accelerator.wait_for_everyone)
        global_batch = plan.global_batch

    # -- model
    # LoRA under bf16/fp16: the frozen base arrives on the device in that dtype (lora_base_dtype would
    # cast it there anyway; the same values, without an fp32 copy of the denoiser on the device)
    low_base = weight_dtype if cfg.lora.rank > 0 and weight_dtype != torch.float32 else None
    adapter = load_adapter(cfg.model, accelerator.device, weight_dtype, low_base)
    denoiser = adapter.denoiser
    # before the reference pre-pass and the frozen copy: all three then compute with the same layout
    # (channels-last convolutions round differently from contiguous ones)
    memory_options(denoiser, cfg)
    source: Any = None
    if not rollout:
        source = DatasetSource(
            dataset, plan, objective, adapter, k, rank, accelerator.device, cfg.data.num_workers
        )
    ref_table: dict[tuple[int, int], Any] | None = None
    if t.precompute_reference and objective.needs_reference:
        # before LoRA and before any checkpoint weights: the denoiser holds exactly the reference weights
        ref_table = precompute_reference(
            source, objective, adapter, resumed_step, t.max_steps, accelerator, main
        )
    use_lora = cfg.lora.rank > 0
    if use_lora:
        add_lora(denoiser, cfg)
        lora_base_dtype(denoiser, weight_dtype)
    else:
        denoiser.requires_grad_(True)
    trainable = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    ref_mode = (
        resolve_mode(t.reference, cfg.lora.rank, objective.needs_reference, objective.ref_refresh_every)
        if ref_table is None
        else "none"
    )
    ref = Reference(ref_mode, denoiser, weight_dtype if weight_dtype != torch.float32 else None, trainable)
    units = 0
    if engine.shards:
        # after LoRA (the adapters are sharded too) and the frozen copy (taken of the whole denoiser),
        # before the optimizer: the parameters become new DTensor objects under the same names
        param_dtype = weight_dtype if weight_dtype != torch.float32 else None
        units = engines.shard(
            denoiser, adapter.family, accelerator.device, world, param_dtype, engine.reshard_after_forward
        )
        if ref.model is not None:  # the frozen copy (full fine-tuning): sharded like the policy
            engines.shard(
                ref.model, adapter.family, accelerator.device, world, None, engine.reshard_after_forward
            )
        trainable = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
        if ref.mode == "snapshot":  # its copy must be of the sharded parameters it swaps with
            ref = Reference("snapshot", denoiser, None, trainable)
    if main:
        print(engines.startup_line(engine, accelerator, units))
    denoiser.train()
    if rollout:
        source = build_rollout_source(cfg, objective, adapter, accelerator, trainable)
    cleanup.callback(source.close)
    lr = t.lr * (t.batch_size * t.grad_accum * world if t.scale_lr else 1)
    optimizer = make_optimizer(cfg, list(trainable.values()), lr)
    lr_sched = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
    )
    ema = EMA(trainable, t.ema_decay) if t.ema_decay > 0 else None
    # a fixed reference must stay fixed (checked at every checkpoint); a snapshot moves on purpose
    # (fingerprints of whole tensors: a sharded run gathers them, and matches any other engine)
    ref_print = (
        fingerprint(engines.full_tensors(ref.base_parameters())) if ref.mode in ("lora_off", "copy") else None
    )

    start_step, skipped_total = 0, 0
    if ckpt_path is not None:
        ck = load_checkpoint(ckpt_path)
        st = ck["state"]
        if st["global_batch"] != global_batch:
            raise ConfigError(
                f"--resume: checkpoint used global batch {st['global_batch']}, this run {global_batch} "
                f"(batch_size x grad_accum x processes must match to resume exactly)"
            )
        if int(st.get("world_size", world)) != world and rollout:
            # a round's groups are split over the processes: another count cuts them differently
            raise ConfigError(
                f"--resume: the run used {st['world_size']} processes, this launch {world}; "
                f"resume with the same number of processes"
            )
        if (
            ref_print is not None
            and st.get("reference_fingerprint")
            and not _close(st["reference_fingerprint"], ref_print)
        ):
            raise ConfigError(
                f"--resume: the reference weights at {cfg.model.path} "
                "differ from the ones the run started with"
            )
        missing = set(trainable) - set(ck["trainable"])
        if missing:
            raise ConfigError(
                f"--resume: checkpoint lacks {len(missing)} trainable "
                f"tensors (e.g. {sorted(missing)[0]}); was LoRA/rank changed?"
            )
        # checkpoints hold whole tensors; under fsdp2 each process keeps its shards of them
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(engines.shard_like(ck["trainable"][n].to(p.dtype), p))
        if engine.shards:
            engines.load_optimizer(optimizer, ck["optimizer"])
        else:
            optimizer.load_state_dict(ck["optimizer"])
        lr_sched.load_state_dict(ck["scheduler"])
        if ema is not None and ck["ema"] is not None:
            ema.shadow = engines.sharded_state({n: v.float() for n, v in ck["ema"].items()}, trainable)
        if ref.mode == "snapshot" and ck["reference"] is not None:
            ref.snapshot = engines.sharded_state(ck["reference"], trainable)
        mine = engines.rank_state(ck["source"] or {}, rank, world, str(ckpt_path))  # this process's buffer
        source.load_state_dict(engines.sharded_state(mine, trainable))
        start_step = int(st["step"])
        guard.total, guard.in_row = int(st.get("bad_steps", 0)), int(st.get("bad_in_row", 0))
        divergence.restore(st.get("divergence", {}))
        skipped_total = int(st.get("data_skipped", 0))  # metrics count skips over the whole run
        if auto_beta is not None:
            auto_beta.scale = float(st.get("beta_scale", 1.0))
            objective = with_beta_scale(objective, base_beta, auto_beta.scale)
        if main:
            print(f"resumed from {ckpt_path} at step {start_step}")

    if engine.shards:  # sharded in place above; accelerate (DDP mode) must not wrap it again
        model, optimizer = denoiser, accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(denoiser, optimizer)
    if t.compile:
        model = torch.compile(model)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(run_dir / "metrics.jsonl", start_step)  # rows a killed run wrote past its checkpoint
        init_tracking(accelerator, cfg, flat_hparams(cfg), purge_step=start_step + 1)
    export = exporter(adapter, use_lora)
    overopt = None  # the over-optimisation guard: main process only, outside the DDP forward
    if t.guard_every and main:
        from .overopt import OverOptGuard

        overopt = OverOptGuard(cfg, adapter, source.rewards, accelerator.device)
        if ckpt_path is not None:  # st: the resumed checkpoint's state, read above
            overopt.restore(st.get("guard", []), bool(st.get("guard_warned", False)))
        else:  # the starting point: what gold, proxy and pixel statistics are compared against
            row = overopt.evaluate(0, accelerator.autocast)
            overopt.keep_best(export)
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": 0, **row}) + "\n")

    # -- loop
    metrics_file = run_dir / "metrics.jsonl"
    bar = tqdm(
        total=t.max_steps,
        initial=start_step,
        disable=not main,
        desc=f"train {cfg.objective.name}",
        unit="step",
    )
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    n_micro = source.micro_batches
    batches = source.batches(start_step, t.max_steps, model)  # lazily: a rollout samples when reached
    for step in range(start_step, t.max_steps):
        t_step = time.perf_counter()
        sums: dict[str, list[Tensor]] = defaultdict(list)
        for micro_i in range(n_micro):
            batch = next(batches)
            skipped_total += batch["skipped"]
            torch.manual_seed(batch["seed"])  # any global-RNG use (dropout) is tied to the data position
            sync = micro_i == n_micro - 1
            with engines.gradient_sync(model, accelerator, engine, sync):
                # the reference first: a snapshot reference swaps weights the policy graph would save
                ref_terms = None
                if ref_table is not None:
                    ref_terms = ref_table[(step, micro_i)].to(accelerator.device)
                elif ref.mode != "none":
                    with torch.inference_mode(), ref.active() as ref_model, accelerator.autocast():
                        ref_terms = source.terms(ref_model, batch)
                    ref_terms = _clone(ref_terms)  # leave inference mode: plain constants for the loss
                with accelerator.autocast():
                    policy_terms = source.terms(model, batch)  # [B,k] errors, or a dict of terms
                out = objective(policy_terms, ref_terms, batch)
                loss = cap_margins(out.loss, out.metrics.get("margin"), t.margin_cap).mean()
                # / n_micro: the mean over the step's micro-batches (and, through DDP, over processes)
                accelerator.backward(batch["loss_weight"] * loss / n_micro)
            sums["loss"].append(out.loss.detach() * batch["loss_weight"])
            for name, v in out.metrics.items():
                sums[name].append(v.detach().reshape(-1))
        for name, v in source.step_metrics().items():  # what the step's rollouts measured
            sums[name].append(v.to(accelerator.device))
        # clip_grad_norm_ with an infinite bound only measures the norm (max_grad_norm = 0: no clipping)
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        if engine.shards and accelerator.scaler is None:  # the norm over all shards, as a plain tensor
            grad_norm = engines.clip_grad_norm(list(trainable.values()), max_norm)
        else:
            grad_norm = accelerator.clip_grad_norm_(list(trainable.values()), max_norm)
        # the step's metrics, averaged over micro-batches and processes (the guard reads the loss)
        logs = {
            n: accelerator.reduce(torch.cat(v).float().mean().to(accelerator.device), "mean").item()
            for n, v in sums.items()
        }
        scaled = accelerator.scaler is not None
        bad_step = guard.update(
            step + 1, logs["loss"], grad_norm, optimizer, lr_sched, trainable.values(), scaled, main
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are done: the time below is the step's
        step_seconds = time.perf_counter() - t_step  # data / rollout, forward, backward, optimizer step
        if not bad_step and ema is not None:
            ema.update(trainable)
        source.after_step(step, trainable)
        if objective.ref_refresh_every and (step + 1) % objective.ref_refresh_every == 0:
            ref.refresh()
            logs["reference_refreshed"] = 1.0

        # -- log
        logs.update(
            grad_norm=float("nan") if grad_norm is None else float(grad_norm),
            lr=lr_sched.get_last_lr()[0],
            **{"data/skipped": skipped_total, "train/bad_steps": guard.total, "time/step_s": step_seconds},
        )
        out_of_time = t.max_minutes > 0 and engines.any_process(
            (time.perf_counter() - t0) / 60 >= t.max_minutes, accelerator
        )  # every process stops after the same step
        done = step + 1 == t.max_steps or out_of_time
        if overopt is not None and overopt.due(step + 1, done):
            logs.update(overopt.evaluate(step + 1, accelerator.autocast))
            overopt.keep_best(exp_with_ema(ema, trainable, export))
            if (warning := overopt.check(step + 1)) is not None:
                print(warning)
        if auto_beta is not None and not bad_step:  # the factor of this step's batch, averaged over processes
            if "margin" not in sums:
                raise ConfigError(
                    f"train.auto_beta_target: objective {cfg.objective.name!r} reports no per-pair margin"
                )
            g = accelerator.reduce(
                gradient_factor(torch.cat(sums["margin"])).to(accelerator.device), "mean"
            ).item()
            objective = with_beta_scale(objective, base_beta, auto_beta.update(g))
            logs.update({"stability/grad_factor": g, "stability/beta": base_beta * auto_beta.scale})
        if not bad_step and divergence.update(logs):
            logs["stability/diverging"] = 1.0
            if main and not divergence.warned:
                divergence.warned = True
                print(divergence.warning(step + 1))
        # wall-clock timings go to the tracker and timing.jsonl, never to metrics.jsonl, whose rows
        # a resumed run reproduces exactly
        timing = {n: logs.pop(n) for n in [n for n in logs if n.startswith("time/")]}
        last = logs
        if main and ((step + 1) % t.log_every == 0 or step + 1 == t.max_steps):
            accelerator.log({**logs, **timing}, step=step + 1)
            with metrics_file.open("a") as f:
                f.write(json.dumps({"step": step + 1, **logs}) + "\n")
            with (run_dir / "timing.jsonl").open("a") as f:
                f.write(json.dumps({"step": step + 1, **timing}) + "\n")
            bar.set_postfix(
                loss=f"{logs['loss']:.4f}",
                **({"acc": f"{logs['implicit_acc']:.2f}"} if "implicit_acc" in logs else {}),
                **({"reward": f"{logs['reward']:.3f}"} if "reward" in logs else {}),
            )
        bar.update(1)

        # -- checkpoint
        if (step + 1) % t.checkpoint_every == 0 or done or t.halt_after_step == step + 1:
            in_sync = _ranks_in_sync(accelerator, engines.full_tensors(trainable.values()))
            ref_now = fingerprint(engines.full_tensors(ref.base_parameters())) if ref_print else None
            if ref_print is not None and not _close(ref_now, ref_print):
                raise RuntimeError(
                    "the reference weights changed during training (a frozen parameter received updates)"
                )
            # every process's own rollout buffer (its samples of the round), on the main process
            source_state = engines.per_rank_state(source.state_dict(), main, world)
            whole = None
            if engine.shards:  # every process takes part in gathering; the main process writes
                whole = {
                    "trainable": engines.consolidated(trainable, main),
                    "ema": engines.consolidated(ema.shadow, main) if ema else None,
                    "optimizer": engines.consolidated_optimizer(optimizer, main),
                    "reference": engines.consolidated(ref.snapshot, main) if ref.mode == "snapshot" else None,
                }
            if main:
                state = {
                    "step": step + 1,
                    "global_batch": global_batch,
                    "world_size": world,
                    "engine": engine.name,
                    "parameters": engines.describe(trainable),  # the live layout (DTensor shards or not)
                    "objective": cfg.objective.name,
                    "reference_mode": ref.mode,
                    "reference_fingerprint": ref_print,
                    "reference_unchanged": True,
                    "ranks_in_sync": in_sync,
                    "beta_scale": auto_beta.scale if auto_beta else 1.0,
                    "bad_steps": guard.total,
                    "bad_in_row": guard.in_row,
                    "divergence": divergence.state(),
                    "data_skipped": skipped_total,
                    "lora": use_lora,
                    "family": adapter.family,
                    "model_path": cfg.model.path,
                    "metrics": logs,
                    "guard": overopt.state() if overopt else [],
                    "guard_warned": overopt.warned if overopt else False,
                }
                if whole is None:
                    exp = exp_with_ema(ema, trainable, export)
                    extra = {"source": source_state}
                    if ref.mode == "snapshot":
                        extra["reference"] = ref.snapshot
                    weights, opt_state, ema_w = trainable, optimizer, ema.shadow if ema else None
                else:  # consolidated: the same files as a DDP run's
                    ema_w = whole["ema"]
                    exp = exporter_from(
                        export, denoiser, whole["trainable"] if ema_w is None else ema_w, use_lora
                    )
                    extra = {"source": source_state, "reference": whole["reference"]}
                    weights, opt_state = whole["trainable"], whole["optimizer"]
                save_checkpoint(
                    run_dir,
                    step + 1,
                    weights,
                    opt_state,
                    lr_sched,
                    ema_w,
                    state,
                    exp,
                    keep=t.keep_checkpoints,
                    extra={k: v for k, v in extra.items() if v},
                )
                log_samples(accelerator, adapter, cfg, step + 1)
            accelerator.wait_for_everyone()
        if t.halt_after_step == step + 1 and not done:
            bar.close()
            engines.end_trackers(accelerator)
            return {"halted_at": step + 1, **last}
        if out_of_time:
            if main:
                print(f"train.max_minutes={t.max_minutes:g} reached after step {step + 1}; resume to go on")
            break
    bar.close()
    elapsed = time.perf_counter() - t0
    steps_done = step + 1 if t.max_steps > start_step else start_step
    if main:
        summary = {"steps": steps_done, "seconds": elapsed, "config": to_dict(cfg), **last}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(
            f"done: {steps_done} steps, final loss "
            f"{last.get('loss', float('nan')):.4f}, checkpoint {run_dir / 'checkpoints'}"
        )
    engines.end_trackers(accelerator)
    return last


def _clone(terms: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
    if isinstance(terms, dict):
        return {k: v.clone() for k, v in terms.items()}
    return terms.clone()


def exp_with_ema(ema: EMA | None, trainable: dict[str, Tensor], export):
    """The exporter writing the EMA weights when there is an EMA (swapped in for the export)."""
    if ema is None:
        return export

    def run(folder: Path) -> None:
        ema.swap(trainable)
        try:
            export(folder)
        finally:
            ema.swap(trainable)

    return run


def _close(a: list[float], b: list[float], rtol: float = 1e-9) -> bool:
    return len(a) == len(b) and all(
        abs(x - y) <= rtol * max(1.0, abs(x), abs(y)) for x, y in zip(a, b, strict=True)
    )


def _ranks_in_sync(accelerator: Any, trainable: Iterator[Tensor]) -> bool:
    """All processes must hold identical trainable weights (DDP invariant; under fsdp2: the gathered
    weights, i.e. every process assembles the same model from the shards); checked at checkpoints."""
    if accelerator.num_processes == 1:
        return True
    fp = torch.tensor(fingerprint(trainable), dtype=torch.float64, device=accelerator.device)
    allfp = accelerator.gather(fp[None]).cpu()
    return bool(torch.allclose(allfp, allfp[0:1].expand_as(allfp), rtol=1e-9, atol=0))


def flat_hparams(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sec, vals in to_dict(cfg).items():
        for k, v in vals.items():
            out[f"{sec}.{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out
