"""SPO's rollout source: the step-wise resampler and the transition log-probs it trains on.

Step-aware Preference Optimization (Liang et al., CVPR 2025; RockeyCoss/SPO@27a8642
``spo/custom_diffusers/multi_sample_pipeline(_sdxl).py``). Each round samples ``train.batch_size``
prompts with DDIM, branches into ``samples_per_step`` candidates at every step after
``divert_start_step``, judges them with the step-aware preference model and keeps (best, worst)
transitions as pairs; the loop trains them with the SPO loss on their transition log-probs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..config import Config, ConfigError
from ..models.base import Adapter
from .reference import eval_mode
from .rollout import RolloutSource, model_fn, repeat


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
    fn = model_fn(adapter, model)
    B, k, g = len(prompts), obj.samples_per_step, obj.guidance_scale
    device = adapter.device
    x = randn_like(torch.empty(B, *latent_shape, device=device), gen)

    def scorer(cands: Tensor, t_prev: int) -> Tensor:
        # predicted x0 of every candidate at its own timestep, decoded and judged by the SPM at t_prev
        if t_prev < 0:
            x0 = cands
        else:
            pred = guided(
                fn, cands, torch.tensor(t_prev, device=device), (repeat(uncond, k), repeat(cond, k)), g
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
            pred = guided(fn, flat, torch.tensor(t, device=device), (repeat(uncond, k), repeat(cond, k)), g)
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
    fn = model_fn(adapter, model)
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


class StepwiseRollouts(RolloutSource):
    """SPO: one round (``train.batch_size`` prompts) per micro-batch; the kept pairs are the batch.
    A round that keeps no pair trains one unkept pair with weight 0, so every process still runs a
    forward and backward and DDP's gradient all-reduce stays in step."""

    def __init__(self, objective: Any, adapter: Adapter, cfg: Config, accelerator: Any) -> None:
        from ..rewards.step_aware import StepAwarePM

        super().__init__(objective, adapter, cfg, accelerator)
        if not objective.spm:
            raise ConfigError(
                "objective.spm: spo needs a step-aware preference model "
                "(diffalign train-spm) or a CLIP folder"
            )
        if adapter.prediction_type != "epsilon":
            raise ConfigError(
                "spo samples with DDIM and needs an epsilon-prediction "
                f"model; this one predicts {adapter.prediction_type}"
            )
        self.spm = StepAwarePM(objective.spm, device=self.device)
        self.micro_batches = self.grad_accum

    def batches(self, first_step: int, last_step: int, model: torch.nn.Module) -> Iterator[dict[str, Any]]:
        for step in range(first_step, last_step):
            for micro_i in range(self.micro_batches):
                r = step * self.micro_batches + micro_i
                prompts = self.round_prompts(r)
                cond, uncond = self.encode(prompts)
                gen = self.generators(r, 1)[0]
                with torch.no_grad(), eval_mode(model), self.accelerator.autocast():
                    pairs, fallback = spo_pairs(
                        self.obj, self.adapter, model, self.spm, prompts, cond, uncond, self.latent_shape, gen
                    )
                self.log("pairs", float(len(pairs)))
                weight = 1.0
                if not pairs and fallback is not None:
                    pairs, weight = [fallback], 0.0
                yield {
                    "seed": gen.initial_seed(),
                    "skipped": 0,
                    "loss_weight": weight,
                    "pairs": pairs,
                    "cond": cond,
                    "uncond": uncond,
                }

    def terms(self, model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
        return spo_logps(self.obj, self.adapter, model, batch["pairs"], batch["cond"], batch["uncond"])
