"""The online training loop (objectives of kind ``online``: ``spo``, ``online_dpo``). One function.

    setup: validate -> accelerator -> objective -> adapter + LoRA -> reference snapshot
           -> optimizer / LR schedule -> scorer (SPM or reward ensemble) -> resume
    for each optimizer step:
        prompts (seeded by the step) -> sample with the current policy (no grad) -> preference pairs
        -> policy terms with grad, reference terms with the snapshot swapped in (inference mode)
        -> objective -> backward -> clip -> optimizer step -> (refresh reference) -> log -> checkpoint

The reference is a snapshot of the LoRA weights (at start: LoRA-off, since LoRA starts as the
identity), swapped into the live model for its forward passes; ``online_dpo`` refreshes it every
``ref_refresh_every`` steps and it travels in every checkpoint. Every random draw derives from
(seed, step, rank), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._quiet import quiet_libraries
from ..config import Config, ConfigError, to_dict, validate
from ..data.pairs import sample_seed
from ..models.loading import FAMILY_MODALITY, load_adapter, resolve_family
from .checkpoint import checkpoint_step, load_checkpoint, resume_point, save_checkpoint
from .guards import BadStepGuard
from .loop import (
    DTYPES,
    add_lora,
    exporter,
    flat_hparams,
    group_errors,
    lora_base_dtype,
    make_optimizer,
    memory_options,
    noised_inputs,
    swap_weights,
)
from .provenance import record_config, truncate_metrics
from .tracking import init_tracking, log_samples, log_with


def _with_micro(cond: dict[str, Tensor], micro: Tensor) -> dict[str, Tensor]:
    return {**cond, "__micro__": micro}


def _model_fn(adapter: Any, model: torch.nn.Module):
    """Sampler calling convention over the adapter: conditioning dicts carry their micro ids."""

    def fn(x: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
        cond = {k: v for k, v in c.items() if k != "__micro__"}
        return adapter.predict(x, t, cond, c["__micro__"], model=model).float()

    return fn


def _repeat(c: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    return {k: torch.cat([v] * n) for k, v in c.items()}


# ----------------------------------------------------------------------------- SPO


def spo_pairs(
    obj: Any,
    adapter: Any,
    model: torch.nn.Module,
    spm: Any,
    prompts: list[str],
    cond: dict,
    uncond: dict,
    latent_shape: tuple[int, ...],
    gen: torch.Generator,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Sample with the step-wise resampler; returns the kept pairs ``{x_t, w, l, t, t_prev, b}`` and
    one unkept pair (trained with weight 0 when nothing was kept, so every DDP rank still runs a
    forward and backward and the gradient all-reduce stays in step).

    Segments as the official ``multi_sample_pipeline(_sdxl).py``: from the shared x_t draw k candidates
    (the branch step), let each run ``num_inner_step`` more stochastic DDIM steps on its own, judge
    the candidates' predicted x0 at the segment's last timestep, and turn every transition of the
    segment into a (best, worst) pair with that label; an inner transition starts from each
    candidate's own latent, so its pair also carries the loser's ``x_t_l``. The trajectory continues
    from a uniformly random candidate. With ``num_inner_step = 0`` this is ``stepwise_resample``
    step by step (same draws, same pairs)."""
    from ..samplers.base import guided, randn_like
    from ..samplers.ddim import NoiseSchedule, ddim_step, ddim_timesteps

    sched = NoiseSchedule.from_scheduler(adapter.noise_scheduler)
    ts = ddim_timesteps(adapter.pipe.scheduler.config, obj.sample_steps)
    fn = _model_fn(adapter, model)
    B, k, g = len(prompts), obj.samples_per_step, obj.guidance_scale
    device = adapter.device
    x = randn_like(torch.empty(B, *latent_shape, device=device), gen)

    def scorer(cands: Tensor, t_prev: int) -> Tensor:
        # predicted x0 of every candidate at its own timestep, decoded and judged by the SPM at t_prev
        if t_prev < 0:
            x0 = cands
        else:
            pred = guided(
                fn, cands, torch.tensor(t_prev, device=device), (_repeat(uncond, k), _repeat(cond, k)), g
            )
            x0 = sched.eps_x0(pred, cands, sched.abar(t_prev))[1]
        imgs = adapter.decode_latents(x0)
        return spm(imgs.cpu(), prompts * k, t=max(t_prev, 0)).scores.to(device)

    pairs: list[dict[str, Any]] = []
    fallback: dict[str, Any] | None = None
    ar = torch.arange(B, device=device)
    i = 0
    while i < len(ts):
        t, t_prev = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        i += 1
        if i <= obj.divert_start_step:
            pred = guided(fn, x, torch.tensor(t, device=device), (uncond, cond), g)
            x = ddim_step(pred, x, t, t_prev, sched, obj.eta, randn_like(x, gen))[0]
            continue
        # the branch step: k candidates for x_{t_prev} from the shared x_t (one guided prediction)
        pred = guided(fn, x, torch.tensor(t, device=device), (uncond, cond), g)
        cands = torch.stack(
            [ddim_step(pred, x, t, t_prev, sched, obj.eta, randn_like(x, gen))[0] for _ in range(k)]
        )  # [k,B,...]
        segment = [(None, cands, t, t_prev)]  # (x_t [k,B,...] or None = the shared x, x_prev, t, t_prev)
        for _ in range(obj.num_inner_step):  # inner steps: every candidate continues on its own
            if i >= len(ts):
                break
            t, t_prev = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
            i += 1
            flat = cands.flatten(0, 1)  # [k*B,...], candidate-major like the conditioning below
            pred = guided(fn, flat, torch.tensor(t, device=device), (_repeat(uncond, k), _repeat(cond, k)), g)
            nxt = ddim_step(pred, flat, t, t_prev, sched, obj.eta, randn_like(flat, gen))[0].view_as(cands)
            segment.append((cands, nxt, t, t_prev))
            cands = nxt
        scores = scorer(cands.flatten(0, 1), t_prev).view(k, B)  # judged at the segment's end
        bi, wi = scores.argmax(0), scores.argmin(0)  # [B]
        s = torch.stack([scores.max(0).values, scores.min(0).values]).softmax(0)  # [2, B]
        keep = (s[0] - s[1] > obj.threshold).nonzero().flatten().tolist()
        for xs, xp, tt, tp in segment:
            for b in keep + ([] if fallback is not None else [None]):
                bb = 0 if b is None else b
                p = {"x_t": x[bb] if xs is None else xs[bi[bb], bb], "w": xp[bi[bb], bb], "l": xp[wi[bb], bb]}
                p.update(t=tt, t_prev=tp, b=bb)
                if xs is not None:
                    p["x_t_l"] = xs[wi[bb], bb]
                if b is None:
                    fallback = p
                else:
                    pairs.append(p)
        choice = torch.randint(0, k, (B,), generator=gen).to(device)
        x = cands[choice, ar]
    return pairs, fallback


def spo_logps(
    obj: Any, adapter: Any, model: torch.nn.Module, pairs: list[dict[str, Any]], cond: dict, uncond: dict
) -> Tensor:
    """Transition log-probs ``[P, 2]`` (winner, loser) under ``model``'s CFG prediction."""
    from ..samplers.base import guided
    from ..samplers.ddim import NoiseSchedule, ddim_transition_log_prob

    sched = NoiseSchedule.from_scheduler(adapter.noise_scheduler)
    fn = _model_fn(adapter, model)
    by_t: dict[tuple[int, int, bool], list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by_t[(p["t"], p["t_prev"], "x_t_l" in p)].append(i)
    rows = []
    for (t, t_prev, own_l), idx in by_t.items():
        b = torch.tensor([pairs[i]["b"] for i in idx])
        x_t = torch.stack([pairs[i]["x_t"] for i in idx])
        c = {kk: v[b] for kk, v in cond.items()}
        u = {kk: v[b] for kk, v in uncond.items()}
        pred = guided(fn, x_t, torch.tensor(t, device=x_t.device), (u, c), obj.guidance_scale)
        lw = ddim_transition_log_prob(
            pred, x_t, torch.stack([pairs[i]["w"] for i in idx]), t, t_prev, sched, obj.eta
        )
        x_l, pred_l = x_t, pred
        if own_l:  # an inner transition (num_inner_step > 0): the loser steps from its own latent
            x_l = torch.stack([pairs[i]["x_t_l"] for i in idx])
            pred_l = guided(fn, x_l, torch.tensor(t, device=x_t.device), (u, c), obj.guidance_scale)
        ll = ddim_transition_log_prob(
            pred_l, x_l, torch.stack([pairs[i]["l"] for i in idx]), t, t_prev, sched, obj.eta
        )
        rows.append((idx, torch.stack([lw, ll], dim=1)))
    order = [i for idx, _ in rows for i in idx]
    stacked = torch.cat([r for _, r in rows])
    return stacked[torch.argsort(torch.tensor(order))]  # back to the pairs' order


# ----------------------------------------------------------------------------- online DPO


def group_pairs(
    obj: Any,
    adapter: Any,
    model: torch.nn.Module,
    rewards: dict,
    prompts: list[str],
    cond: dict,
    uncond: dict,
    latent_shape: tuple[int, ...],
    gen: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``group_size`` samples per prompt from the current policy -> (best, worst) clean latents
    ``[B, 2, ...]`` and phi ``[B, G]``. Flow models sample with the Flow-GRPO SDE (``noise_level``),
    DDPM-family models with DDIM (``eta``) on the pipeline's noise schedule."""
    from ..rewards.ensemble import vote_phi
    from ..samplers.base import randn_like

    B, G = len(prompts), obj.group_size
    x_T = randn_like(torch.empty(B * G, *latent_shape, device=adapter.device), gen)
    rep = {k: v.repeat_interleave(G, 0) for k, v in cond.items()}  # prompt-major: b*G + j
    urep = {k: v.repeat_interleave(G, 0) for k, v in uncond.items()}
    fn = _model_fn(adapter, model)
    if adapter.prediction_type == "flow_matching":
        from diffusers import FlowMatchEulerDiscreteScheduler

        from ..samplers.flow import flow_sample

        sch = FlowMatchEulerDiscreteScheduler.from_config(adapter.pipe.scheduler.config)
        sch.set_timesteps(obj.sample_steps)
        x0 = flow_sample(
            fn,
            x_T,
            sch.sigmas,
            (urep, rep),
            obj.guidance_scale,
            obj.noise_level,
            gen,
            num_train_timesteps=adapter.num_train_timesteps,
        ).sample
    else:
        from ..samplers.ddim import NoiseSchedule, ddim_sample, ddim_timesteps

        ts = ddim_timesteps(adapter.pipe.scheduler.config, obj.sample_steps)
        x0 = ddim_sample(
            fn,
            x_T,
            ts,
            (urep, rep),
            NoiseSchedule.from_scheduler(adapter.noise_scheduler),
            obj.guidance_scale,
            obj.eta,
            gen,
        ).sample
    imgs = adapter.decode_latents(x0).cpu()
    texts = [p for p in prompts for _ in range(G)]
    scores = {n: r(imgs, texts).scores.view(B, G) for n, r in rewards.items()}
    phi = vote_phi(scores)  # [B, G]
    ar = torch.arange(B)
    x0 = x0.view(B, G, *latent_shape)
    return torch.stack([x0[ar, phi.argmax(1)], x0[ar, phi.argmin(1)]], dim=1), phi


# ----------------------------------------------------------------------------- the loop


def train_online(cfg: Config, resume: str | None = None, allow_config_change: bool = False) -> dict[str, Any]:  # noqa: C901 (the one flat online training loop, read top to bottom)
    quiet_libraries()
    validate(cfg, check_data=False)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ..objectives import build_objective
    from ..rewards import load_rewards
    from ..synpic import read_prompts

    t = cfg.train
    objective = build_objective(cfg.objective)
    name = cfg.objective.name
    if cfg.lora.rank == 0:
        raise ConfigError(f"objective {name!r} trains LoRA weights online: set lora.rank > 0")
    if name == "spo" and not objective.spm:
        raise ConfigError(
            "objective.spm: spo needs a step-aware preference model (diffalign train-spm) or a CLIP folder"
        )
    if name == "online_dpo" and not objective.rewards:
        raise ConfigError(
            "objective.rewards: online_dpo needs reward specs, e.g. pickscore=PATH,clip_score=PATH"
        )
    unsupported = [
        k
        for k, bad in (
            ("train.grad_accum", t.grad_accum != 1),
            ("train.ema_decay", t.ema_decay > 0),
            ("train.scale_lr", t.scale_lr),
            ("train.compile", t.compile),
            ("train.precompute_reference", t.precompute_reference),
            ("train.auto_beta_target", t.auto_beta_target > 0),
            ("train.margin_cap", t.margin_cap > 0),
            ("data.cache_dir", bool(cfg.data.cache_dir)),
        )
        if bad
    ]
    if unsupported:
        raise ConfigError(
            f"objective {name!r} (online) does not support "
            f"{', '.join(unsupported)}; remove it from the config"
        )
    prompts = read_prompts(cfg.data.path)
    run_dir = Path(t.output_dir)
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        log_with=log_with(cfg),
        project_dir=str(run_dir),
        cpu=not torch.cuda.is_available(),
    )
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    weight_dtype = DTYPES[t.mixed_precision]

    family = resolve_family(cfg.model)  # reads model_index.json only
    if FAMILY_MODALITY[family] != "image":  # groups are scored by image rewards on [B,3,H,W]
        raise ConfigError(
            f"objective {name!r} (online) trains image models (sd, sdxl, sd3); {cfg.model.path} is a "
            f"{FAMILY_MODALITY[family]} model ({family!r})"
        )
    adapter = load_adapter(cfg.model, accelerator.device, weight_dtype)
    if name == "spo" and adapter.prediction_type != "epsilon":
        raise ConfigError(
            "spo samples with DDIM and needs an epsilon-prediction "
            f"model; this one predicts {adapter.prediction_type}"
        )
    denoiser = adapter.denoiser
    from accelerate.utils import set_seed

    set_seed(t.seed)  # LoRA's initial A matrices come from the global RNG
    add_lora(denoiser, cfg)
    lora_base_dtype(denoiser, weight_dtype)
    memory_options(denoiser, cfg)
    trainable = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    reference = {n: p.detach().clone() for n, p in trainable.items()}  # LoRA at init = the base model
    optimizer = make_optimizer(cfg, list(trainable.values()), t.lr)
    lr_sched = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
    )
    device = accelerator.device
    if name == "spo":
        from ..rewards.step_aware import StepAwarePM

        scorer: Any = StepAwarePM(objective.spm, device=device)
    else:
        scorer = load_rewards([s.strip() for s in objective.rewards.split(",") if s.strip()], device)

    start_step = 0
    guard = BadStepGuard(t.max_bad_steps)
    ckpt_path = resume_point(run_dir, resume)
    record_config(
        run_dir, cfg, checkpoint_step(ckpt_path), allow_config_change, write=main, checkpoint=ckpt_path
    )
    if ckpt_path is not None:
        ck = load_checkpoint(ckpt_path)
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(ck["trainable"][n].to(p.dtype))
        if ck["reference"] is not None:
            reference = {n: v.to(device) for n, v in ck["reference"].items()}
        optimizer.load_state_dict(ck["optimizer"])
        lr_sched.load_state_dict(ck["scheduler"])
        start_step = int(ck["state"]["step"])
        if int(ck["state"].get("world_size", world)) != world:
            # sampling seeds derive from (step, process): another process count samples other groups
            raise ConfigError(
                f"--resume: the run used {ck['state']['world_size']} processes, this launch {world}; "
                f"resume with the same number of processes"
            )
        guard.total, guard.in_row = (
            int(ck["state"].get("bad_steps", 0)),
            int(ck["state"].get("bad_in_row", 0)),
        )
        if main:
            print(f"resumed from {ckpt_path} at step {start_step}")

    model, optimizer = accelerator.prepare(denoiser, optimizer)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(run_dir / "metrics.jsonl", start_step)  # rows a killed run wrote past its checkpoint
        init_tracking(accelerator, cfg, flat_hparams(cfg), purge_step=start_step + 1)
    export = exporter(adapter, True)
    res = cfg.data.resolution
    latent_shape = (
        denoiser.config.in_channels,
        res // adapter.pipe.vae_scale_factor,
        res // adapter.pipe.vae_scale_factor,
    )
    metrics_file = run_dir / "metrics.jsonl"
    bar = tqdm(
        total=t.max_steps, initial=start_step, disable=not main, desc=f"train {name} (online)", unit="step"
    )
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(start_step, t.max_steps):
        gen = torch.Generator().manual_seed(sample_seed(t.seed, step * world + rank, domain=3))
        torch.manual_seed(
            sample_seed(t.seed, step * world + rank, domain=5)
        )  # global-RNG users (LoRA dropout)
        idx = torch.randint(0, len(prompts), (t.batch_size,), generator=gen).tolist()
        batch_prompts = [prompts[i] for i in idx]
        with torch.no_grad():
            micro = adapter.default_micro(len(idx), res, res).to(device)
            cond = _with_micro(
                {k: v.to(device) for k, v in adapter.encode_prompts(batch_prompts).items()}, micro
            )
            uncond = _with_micro(
                {k: v.to(device) for k, v in adapter.encode_prompts([""] * len(idx)).items()}, micro
            )
        logs: dict[str, float] = {}
        model.eval()
        with torch.no_grad():
            if name == "spo":
                pairs, fallback = spo_pairs(
                    objective, adapter, model, scorer, batch_prompts, cond, uncond, latent_shape, gen
                )
                logs["pairs"] = float(len(pairs))
                pair_weight = 1.0
                if not pairs and fallback is not None:
                    pairs, pair_weight = [fallback], 0.0
            else:
                x0, phi = group_pairs(
                    objective, adapter, model, scorer, batch_prompts, cond, uncond, latent_shape, gen
                )
                logs["phi_spread"] = float((phi.max(1).values - phi.min(1).values).mean())
        model.train()
        if name != "spo":
            pair_weight = 1.0
        n_pairs = len(pairs) if name == "spo" else x0.shape[0]
        if n_pairs:
            if name != "spo":
                seeds = [
                    sample_seed(t.seed, (step * world + rank) * t.batch_size + i, domain=4)
                    for i in range(n_pairs)
                ]
                x_t, tt, target = noised_inputs(adapter, x0, seeds)
                c2 = {k: v.repeat_interleave(2, 0) for k, v in cond.items() if k != "__micro__"}
                m2 = micro.repeat_interleave(2, 0)
            # reference first: swapping weights in place after the policy forward would corrupt its graph
            swap_weights(trainable, reference)
            try:
                with torch.inference_mode(), accelerator.autocast():
                    if name == "spo":
                        ref = spo_logps(objective, adapter, model, pairs, cond, uncond)
                    else:
                        ref = group_errors(adapter, model, x_t, tt, target, c2, m2, 2)
            finally:
                swap_weights(trainable, reference)
            with accelerator.autocast():
                if name == "spo":
                    policy = spo_logps(objective, adapter, model, pairs, cond, uncond)
                else:
                    policy = group_errors(adapter, model, x_t, tt, target, c2, m2, 2)
            out = objective(policy.float(), ref.clone().float(), {})
            weight = pair_weight if name == "spo" else 1.0
            accelerator.backward(weight * out.loss.mean())
            if weight > 0:
                logs["loss"] = float(out.loss.detach().mean())
                logs.update({k: float(v.float().mean()) for k, v in out.metrics.items()})
        grad_norm = accelerator.clip_grad_norm_(
            list(trainable.values()), t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        )
        # the same numeric guard as the offline loop, on the loss averaged over processes
        local = torch.tensor(logs.get("loss", 0.0), dtype=torch.float32, device=accelerator.device)
        loss = accelerator.reduce(local, "mean").item()
        scaled = accelerator.scaler is not None
        guard.update(step + 1, loss, grad_norm, optimizer, lr_sched, trainable.values(), scaled, main)
        refresh = getattr(objective, "ref_refresh_every", 0)
        if refresh and (step + 1) % refresh == 0:
            reference = {n: p.detach().clone() for n, p in trainable.items()}
            logs["reference_refreshed"] = 1.0
        logs.update(
            grad_norm=float("nan") if grad_norm is None else float(grad_norm),
            lr=lr_sched.get_last_lr()[0],
            **{"train/bad_steps": guard.total},
        )
        last = logs
        if main and ((step + 1) % t.log_every == 0 or step + 1 == t.max_steps):
            accelerator.log(logs, step=step + 1)
            with metrics_file.open("a") as f:
                f.write(json.dumps({"step": step + 1, **logs}) + "\n")
            bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}")
        bar.update(1)
        done = step + 1 == t.max_steps
        if (step + 1) % t.checkpoint_every == 0 or done or t.halt_after_step == step + 1:
            if main:
                state = {
                    "step": step + 1,
                    "world_size": world,
                    "bad_steps": guard.total,
                    "bad_in_row": guard.in_row,
                    "objective": name,
                    "lora": True,
                    "family": adapter.family,
                    "model_path": cfg.model.path,
                    "metrics": logs,
                }
                save_checkpoint(
                    run_dir,
                    step + 1,
                    trainable,
                    optimizer,
                    lr_sched,
                    None,
                    state,
                    export,
                    keep=t.keep_checkpoints,
                    extra={"reference": reference},
                )
                log_samples(accelerator, adapter, cfg, step + 1)
            accelerator.wait_for_everyone()
        if t.halt_after_step == step + 1 and not done:
            bar.close()
            accelerator.end_training()
            return {"halted_at": step + 1, **last}
    bar.close()
    if main:
        summary = {"steps": t.max_steps, "seconds": time.perf_counter() - t0, "config": to_dict(cfg), **last}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"done: {t.max_steps} online steps, checkpoint {run_dir / 'checkpoints'}")
    accelerator.end_training()
    return last
