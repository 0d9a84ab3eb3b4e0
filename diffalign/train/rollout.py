"""Rollout sources: training groups sampled by the current policy and scored by rewards.

Every round (``updates_per_rollout`` optimizer steps; 1 for online DPO and SPO) each process draws
its share of ``train.batch_size x processes`` prompts (one global draw per round, so N processes
sample exactly the groups one process would), samples ``group_size`` images per prompt with the
current weights (eval mode, no gradients, under the same autocast as training), scores them and
turns the round into micro-batches for the loop:

- ``PairRollouts`` (terms ``errors``, online DPO): best and worst of each group as a pair, trained
  with shared noise and timestep like a dataset pair.
- ``GRPORollouts`` (terms ``sde_steps``, Flow-GRPO / GRPO): trajectories of a stochastic sampler
  (Flow-GRPO's SDE for flow models, DDIM with eta > 0 for epsilon / v models), their per-step
  log-probs and group-relative advantages; one micro-batch = a chunk of samples at one trained step.
- ``NFTRollouts`` (terms ``velocities``, DiffusionNFT): clean samples of the old policy (ODE), the
  reward mapped to an optimality weight, forward-process points with the old policy's velocity.
- ``spo_rollout.StepwiseRollouts`` (terms ``transition_log_probs``): SPO's step-wise resampler.

Random draws derive from (seed, round, global sample index), never from the process or the order
of work, so a resumed run and an N-process run reproduce a single uninterrupted process. What a
resume cannot regenerate (a round's buffer when the run stopped inside it, DiffusionNFT's old
policy) travels in the checkpoint (``state_dict``).

Rewards score in the training process, or (``train.reward_process``) in a child process the source
starts and owns (``rewards.process``; stopped by ``close()`` or when the source is garbage-collected),
with bit-identical scores.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..config import Config, ConfigError
from ..data.pairs import sample_seed
from ..models.base import Adapter
from .reference import eval_mode, swap_weights
from .sources import error_terms, noised_inputs

# seed domains (data.pairs.sample_seed): independent streams of one run
PROMPTS, NOISE, PAIR_NOISE, STEPS, TRAIN_NOISE = 3, 6, 4, 7, 8


def with_micro(cond: dict[str, Tensor], micro: Tensor) -> dict[str, Tensor]:
    """Conditioning dicts for samplers carry their SDXL micro ids along (sliced with them)."""
    return {**cond, "__micro__": micro}


def model_fn(adapter: Adapter, model: torch.nn.Module):
    """Sampler calling convention over the adapter (``samplers.base``): conditioning dicts carry
    their micro ids."""

    def fn(x: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
        cond = {k: v for k, v in c.items() if k != "__micro__"}
        return adapter.predict(x, t, cond, c["__micro__"], model=model).float()

    return fn


def take(c: dict[str, Tensor], idx: Tensor | slice) -> dict[str, Tensor]:
    return {k: v[idx] for k, v in c.items()}


def repeat(c: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    return {k: torch.cat([v] * n) for k, v in c.items()}


class RolloutSource:
    """Shared plumbing: prompts, conditioning, per-sample generators, rewards, metrics."""

    def __init__(self, objective: Any, adapter: Adapter, cfg: Config, accelerator: Any) -> None:
        from ..synpic import read_prompts

        t = cfg.train
        self.obj, self.adapter, self.accelerator = objective, adapter, accelerator
        self.prompts = read_prompts(cfg.data.path)
        self.seed, self.batch_size, self.grad_accum = t.seed, t.batch_size, t.grad_accum
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.res = cfg.data.resolution
        f = adapter.pipe.vae_scale_factor
        self.latent_shape = (adapter.latent_channels, self.res // f, self.res // f)
        self.device = accelerator.device
        self._metrics: dict[str, list[Tensor]] = {}
        self.rewards: dict[str, Any] = {}  # the training reward (set by each source that has one)
        self.buffer: dict[str, Any] | None = None  # the current round (sources with rounds)
        self.reward_process: Any = None  # rewards.process.RewardProcess (train.reward_process)
        self._reward_process, self._reward_timeout = t.reward_process, t.reward_timeout

    def load_rewards(self, specs: str, name: str) -> dict[str, Any]:
        """The objective's rewards ``{name: reward}``: loaded here, or (``train.reward_process``) in a
        child process this source owns, as ``RemoteReward`` proxies called the same way."""
        parsed = parse_reward_specs(specs, name)
        if not self._reward_process:
            from ..rewards import load_rewards

            return load_rewards(parsed, self.device)
        from ..rewards.process import RewardProcess

        self.reward_process = RewardProcess(parsed, self.device, timeout=self._reward_timeout)
        return self.reward_process.rewards

    def close(self) -> None:
        """Stop the reward process, if any (garbage collection of the source does it too)."""
        if self.reward_process is not None:
            self.reward_process.close()

    # -- per round ---------------------------------------------------------------------
    def round_prompts(self, r: int) -> list[str]:
        """This process's prompts of round ``r`` (a slice of one global draw)."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, r, domain=PROMPTS))
        idx = torch.randint(0, len(self.prompts), (self.batch_size * self.world,), generator=g)
        mine = idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return [self.prompts[i] for i in mine.tolist()]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(cond, uncond) for ``prompts``, each with its micro ids."""
        micro = self.adapter.default_micro(len(prompts), self.res, self.res).to(self.device)
        enc = self.adapter.encode_prompts
        cond = {k: v.to(self.device) for k, v in enc(prompts).items()}
        uncond = {k: v.to(self.device) for k, v in enc([""] * len(prompts)).items()}
        return with_micro(cond, micro), with_micro(uncond, micro)

    def generators(self, r: int, n: int, domain: int = NOISE) -> list[torch.Generator]:
        """One generator per sample of this process in round ``r`` (global sample indices)."""
        first = (r * self.world + self.rank) * n
        return [
            torch.Generator().manual_seed(sample_seed(self.seed, first + i, domain=domain)) for i in range(n)
        ]

    @torch.no_grad()
    def score(self, rewards: dict[str, Any], x0: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Rewards ``{name: [N]}`` of clean latents ``x0 [N,...]`` (decoded here; a reward process
        gets the decoded images in one request)."""
        from ..rewards.process import score_rewards

        imgs = self.adapter.decode_latents(x0).cpu()
        return score_rewards(rewards, imgs, prompts)

    def round_split(self, name: str) -> tuple[int, int]:
        """(samples per round, samples per micro-batch): ``batch_size x group_size`` samples split
        into ``updates_per_rollout`` optimizer steps of ``grad_accum`` equal chunks."""
        obj = self.obj
        n = self.batch_size * obj.group_size
        chunk, rem = divmod(n, obj.updates_per_rollout * self.grad_accum)
        if rem or chunk == 0:
            raise ConfigError(
                f"{name}: train.batch_size x objective.group_size = {n} samples per round must split into "
                f"objective.updates_per_rollout ({obj.updates_per_rollout}) x train.grad_accum "
                f"({self.grad_accum}) equal micro-batches"
            )
        return n, chunk

    def rollout(self, r: int, model: torch.nn.Module) -> None:
        """Sample, score and store round ``r`` in ``self.buffer`` (sources that train in rounds)."""
        raise NotImplementedError

    def round_buffer(self, step: int, model: torch.nn.Module) -> tuple[dict[str, Any], int, int]:
        """The buffer of the round that optimizer step ``step`` trains on (sampled now when the step
        starts a round), the round and the step's index inside it."""
        r, u = divmod(step, self.obj.updates_per_rollout)
        if self.buffer is None or int(self.buffer["round"]) != r:
            if u != 0:  # only a resume can start mid-round, and the checkpoint carries the buffer
                raise RuntimeError(f"step {step + 1}: the rollout buffer of round {r} is missing")
            self.rollout(r, model)
        assert self.buffer is not None
        return self.buffer, r, u

    def log(self, name: str, value: Tensor | float) -> None:
        self._metrics.setdefault(name, []).append(torch.as_tensor(value, dtype=torch.float32).reshape(-1))

    def step_metrics(self) -> dict[str, Tensor]:
        out = {n: torch.cat(v) for n, v in self._metrics.items()}
        self._metrics = {}
        return out

    def after_step(self, step: int, trainable: dict[str, Tensor]) -> None:
        pass

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


def parse_reward_specs(specs: str, name: str) -> list[str]:
    """``objective.rewards`` (comma-separated ``name=path``) -> the specs ``load_rewards`` takes."""
    parsed = [s.strip() for s in specs.split(",") if s.strip()]
    if not parsed:
        raise ConfigError(
            f"objective.rewards: {name} needs reward specs, e.g. pickscore=PATH,clip_score=PATH"
        )
    return parsed


def total_reward(scores: dict[str, Tensor]) -> Tensor:
    """The training reward: one reward's raw score, or the plain sum of several (flow_grpo's
    multi-reward with unit weights)."""
    return torch.stack(list(scores.values())).sum(0)


def flow_grid(adapter: Adapter, steps: int, latent_shape: tuple[int, ...]) -> list[float]:
    """The sigmas the family's pipeline steps through for these latents in ``steps`` steps, ending at
    0 (SD3: the static shift; FLUX / Qwen-Image: the resolution-dependent mu)."""
    h, w = latent_shape[-2:]
    return [float(s) for s in adapter.sampling_sigmas(steps, h, w)]


# ----------------------------------------------------------------------------- online DPO


@torch.no_grad()
def group_pairs(
    obj: Any,
    adapter: Adapter,
    model: torch.nn.Module,
    rewards: dict[str, Any],
    prompts: list[str],
    cond: dict,
    uncond: dict,
    latent_shape: tuple[int, ...],
    gens: torch.Generator | list[torch.Generator],
) -> tuple[Tensor, Tensor, Tensor]:
    """``group_size`` samples per prompt -> (best, worst) clean latents ``[B, 2, ...]``, phi
    ``[B, G]`` and the summed raw rewards ``[B*G]``. Flow models sample with the Flow-GRPO SDE
    (``noise_level``), DDPM-family models with DDIM (``eta``) on the pipeline's noise schedule."""
    from ..rewards.ensemble import vote_phi
    from ..samplers.base import randn_like

    B, G = len(prompts), obj.group_size
    device = adapter.device
    x_T = randn_like(torch.empty(B * G, *latent_shape, device=device), gens)
    rep = {k: v.repeat_interleave(G, 0) for k, v in cond.items()}  # prompt-major: b*G + j
    urep = {k: v.repeat_interleave(G, 0) for k, v in uncond.items()}
    fn = model_fn(adapter, model)
    if adapter.prediction_type == "flow_matching":
        from ..samplers.flow import flow_sample

        x0 = flow_sample(
            fn,
            x_T,
            flow_grid(adapter, obj.sample_steps, latent_shape),
            (urep, rep),
            obj.guidance_scale,
            obj.noise_level,
            gens,
            num_train_timesteps=adapter.num_train_timesteps,
        ).sample
    else:
        from ..samplers import ddim

        ts = ddim.ddim_timesteps(adapter.pipe.scheduler.config, obj.sample_steps)
        sched = ddim.NoiseSchedule.from_scheduler(adapter.noise_scheduler)
        x0 = ddim.ddim_sample(fn, x_T, ts, (urep, rep), sched, obj.guidance_scale, obj.eta, gens).sample
    from ..rewards.process import score_rewards

    imgs = adapter.decode_latents(x0).cpu()
    texts = [p for p in prompts for _ in range(G)]
    scores = {n: v.view(B, G) for n, v in score_rewards(rewards, imgs, texts).items()}
    phi = vote_phi(scores)  # [B, G]
    ar = torch.arange(B)
    x0 = x0.view(B, G, *latent_shape)
    pairs = torch.stack([x0[ar, phi.argmax(1)], x0[ar, phi.argmin(1)]], dim=1)
    return pairs, phi, total_reward({n: v.flatten() for n, v in scores.items()})


class PairRollouts(RolloutSource):
    """Online DPO: ``group_size`` samples per prompt, best vs worst by the reward vote, as a pair."""

    def __init__(self, objective: Any, adapter: Adapter, cfg: Config, accelerator: Any) -> None:
        super().__init__(objective, adapter, cfg, accelerator)
        self.rewards = self.load_rewards(objective.rewards, "online_dpo")
        self.micro_batches = self.grad_accum

    def batches(self, first_step: int, last_step: int, model: torch.nn.Module) -> Iterator[dict[str, Any]]:
        for step in range(first_step, last_step):
            for micro_i in range(self.micro_batches):
                r = step * self.micro_batches + micro_i  # one round per micro-batch
                prompts = self.round_prompts(r)
                cond, uncond = self.encode(prompts)
                with eval_mode(model), self.accelerator.autocast():
                    x0, phi, reward = group_pairs(
                        self.obj,
                        self.adapter,
                        model,
                        self.rewards,
                        prompts,
                        cond,
                        uncond,
                        self.latent_shape,
                        self.generators(r, len(prompts) * self.obj.group_size),
                    )
                self.log("phi_spread", (phi.max(1).values - phi.min(1).values).mean())
                self.log("reward", reward.mean())
                first = (r * self.world + self.rank) * len(prompts)
                seeds = [sample_seed(self.seed, first + i, domain=PAIR_NOISE) for i in range(len(prompts))]
                x_t, t, target = noised_inputs(self.adapter, x0, seeds)
                yield {
                    "seed": seeds[0],
                    "skipped": 0,
                    "loss_weight": 1.0,
                    "k": 2,
                    "x_t": x_t,
                    "t": t,
                    "target": target,
                    "cond": {k: v.repeat_interleave(2, 0) for k, v in cond.items() if k != "__micro__"},
                    "micro": cond["__micro__"].repeat_interleave(2, 0),
                }

    def terms(self, model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
        return error_terms(self.adapter, model, batch)


# ----------------------------------------------------------------------------- GRPO


def gather_groups(scores: Tensor, accelerator: Any) -> Tensor:
    """Every process's rewards ``[world*B, G]`` (CPU) from this process's ``[B, G]``, process-major:
    the round's groups in global order."""
    return accelerator.gather(scores.to(accelerator.device)).cpu()


def advantages_for(everyone: Tensor, rank: int, world: int, global_std: bool, clip: float) -> Tensor:
    """Group-relative advantages ``[B, G]`` of this process's groups from every process's rewards
    ``[world*B, G]`` (``gather_groups``), the std over all of them when ``global_std``."""
    from ..objectives.grpo import group_advantages

    adv = group_advantages(everyone, global_std=global_std, clip=clip)  # [world*B, G]
    B = everyone.shape[0] // world
    return adv[rank * B : (rank + 1) * B]


ZERO_ADV_REPACK = 0.75
"""``zero_advantage_layout`` repacks kept samples into smaller micro-batches only when they fill at
most this share of one on every process: repacking recomputes their old log-probs in the new
composition (a no-grad forward per sample and trained step, about a third of what training them
costs), so it pays from a quarter of the samples left out, and processes step together, so the
fullest one decides."""


def zero_advantage_layout(keep: Tensor, rank: int, micro: int) -> tuple[Tensor, Tensor]:
    """Which of this process's samples a round trains, and their weights, when the samples of
    zero-spread groups are left out (``drop_zero_advantage``).

    ``keep`` ``[world, n]`` bool: every process's samples in global order, False for the samples of
    zero-spread groups; ``micro`` micro-batches per round (``updates_per_rollout x grad_accum``, n a
    multiple). Returns ``order`` ``[micro*b]``: indices into this process's n samples, ascending,
    trained as ``micro`` consecutive micro-batches of b; and ``weight`` ``[micro*b]`` float32.

    - Repacked when every process's b_p = max(1, ceil(k_p / micro)) (k_p kept samples there) is at
      most ``ZERO_ADV_REPACK`` of the sampled chunk n / micro: here b = b_rank, the kept samples plus
      the first left-out ones as padding (every micro-batch b samples, at least one). Otherwise
      b = n / micro and every sample stays in the chunk it was sampled in (nothing to recompute),
      the left-out ones as padding. The decision is the same on every process, so all of them run
      the same forwards (FSDP gathers weights in each).
    - Padding has weight 0. A kept sample weighs ``world x micro*b / K`` (K kept over all processes):
      with the loop's means over micro-batches and processes the gradient, the loss and every metric
      are the means over the K kept samples, wherever they were trained (``objectives.grpo.
      weigh_samples``), so the selection and its result are the same for any process count. Nothing
      left out: every weight is exactly 1. K = 0: every weight is 0 and the round trains nothing.
    """
    world, n = keep.shape
    mine = keep[rank]  # [n]
    ks = keep.sum(1)  # [world] kept per process
    bs = ((ks + micro - 1) // micro).clamp(min=1)  # [world] micro-batch size if repacked
    k, total = int(ks[rank]), int(ks.sum())
    if int(bs.max()) <= ZERO_ADV_REPACK * (n // micro):
        b = int(bs[rank])
        kept, left_out = mine.nonzero().flatten(), (~mine).nonzero().flatten()
        order = torch.cat([kept, left_out[: micro * b - k]]).sort().values  # [micro*b]
    else:
        order = torch.arange(n)
    w = world * len(order) / total if total else 0.0
    return order, torch.where(mine[order], w, 0.0).float()


class GRPORollouts(RolloutSource):
    """Flow-GRPO (flow models, SDE of ``samplers.flow``) and GRPO for UNets (DDIM, eta > 0).

    A round: ``batch_size`` prompts x ``group_size`` samples per process, sampled in chunks of the
    training micro-batch size (the same batch composition as training, so the first optimizer step's
    ratio is exactly 1; flow_grpo's FAQ gives the same advice), split into ``updates_per_rollout``
    optimizer steps of ``grad_accum`` chunks. Each chunk is trained at every trained step of the
    trajectory, one micro-batch per (chunk, step), in trajectory order (flow_grpo ``train_sd3.py``
    iterates ``j`` over the trained steps the same way).

    Trained steps: the stochastic steps (flow: every step but the last, which lands on sigma 0;
    Flow-GRPO-Fast ``sde_window`` w > 0: w consecutive steps from a start drawn per round in
    ``[window_lo, window_hi - w]``, all others ODE; DDIM: every step with a non-zero std), of which
    ``int(sample_steps * timestep_fraction)`` are kept: the first ones for Flow-GRPO (as
    ``train_sd3.py``; its 0.99 keeps 9 of 10 steps = all stochastic ones), a subset drawn per round
    for GRPO on UNets (DanceGRPO). All samples of a micro-batch share its step (flow_grpo shuffles
    the step order per sample; here the chunk's forward is then one batch).
    """

    def __init__(self, objective: Any, adapter: Adapter, cfg: Config, accelerator: Any) -> None:
        from ..objectives.flow_grpo import FlowGRPO

        super().__init__(objective, adapter, cfg, accelerator)
        obj = objective
        self.flow = isinstance(obj, FlowGRPO)
        name = "flow_grpo" if self.flow else "grpo"
        is_flow_model = adapter.prediction_type == "flow_matching"
        if self.flow and not is_flow_model:
            raise ConfigError(
                f"objective flow_grpo samples flow-matching models; {cfg.model.path} predicts "
                f"{adapter.prediction_type}: use objective.name=grpo (DDIM log-probs)"
            )
        if not self.flow and is_flow_model:
            raise ConfigError(
                f"objective grpo samples epsilon / v-prediction UNets with DDIM; {cfg.model.path} is a "
                "flow-matching model: use objective.name=flow_grpo"
            )
        if not obj.train_cfg and obj.guidance_scale != 1:
            raise ConfigError(
                f"objective.train_cfg=false trains without guidance, so rollouts must sample without it "
                f"too (the ratio compares the two): set objective.guidance_scale=1 (got {obj.guidance_scale})"
            )
        self.rewards = self.load_rewards(obj.rewards, name)
        self.n, self.chunk = self.round_split(name)
        if self.flow:
            self.sigmas = flow_grid(adapter, obj.sample_steps, self.latent_shape)
            self.stochastic_all = list(range(obj.sample_steps - 1))  # the last step lands on sigma 0
        else:
            from ..samplers.ddim import NoiseSchedule, ddim_timesteps

            self.ts = ddim_timesteps(adapter.pipe.scheduler.config, obj.sample_steps)
            self.sched = NoiseSchedule.from_scheduler(adapter.noise_scheduler)
            self.stochastic_all = [
                i for i in range(len(self.ts)) if self._ddim_std(i) > 0
            ]  # the final step into alpha_bar = 1 is deterministic
        self.n_train = max(1, int(obj.sample_steps * obj.timestep_fraction))
        self.micro_batches = self.grad_accum * self.steps_per_round_trained()

    # -- the step grid -----------------------------------------------------------------
    def _ddim_std(self, i: int) -> float:
        t = self.ts[i]
        t_prev = self.ts[i + 1] if i + 1 < len(self.ts) else -1
        a_t, a_prev = self.sched.abar(t), self.sched.abar(t_prev)
        return self.obj.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5

    def steps_per_round_trained(self) -> int:
        w = self.obj.sde_window if self.flow else 0
        return w if w > 0 else min(self.n_train, len(self.stochastic_all))

    def round_steps(self, r: int) -> tuple[list[int], list[int]]:
        """(stochastic steps, trained steps) of round ``r``."""
        obj = self.obj
        g = torch.Generator().manual_seed(sample_seed(self.seed, r, domain=STEPS))
        w = obj.sde_window if self.flow else 0
        if w > 0:  # Flow-GRPO-Fast: one window of SDE steps, all trained
            hi = obj.window_hi or obj.sample_steps - 1
            start = int(torch.randint(obj.window_lo, hi - w + 1, (), generator=g))
            window = list(range(start, start + w))
            return window, window
        stoch = self.stochastic_all
        k = min(self.n_train, len(stoch))
        if k == len(stoch):
            return stoch, stoch
        if self.flow:  # flow_grpo trains the first int(N * fraction) steps, in order
            return stoch, stoch[:k]
        keep = sorted(torch.randperm(len(stoch), generator=g)[:k].tolist())
        return stoch, [stoch[i] for i in keep]

    # -- one stochastic step -----------------------------------------------------------
    def step(
        self, fn: Any, x: Tensor, i: int, cond: Any, scale: float, x_next: Tensor | None, noise: Tensor | None
    ):
        """Step ``i`` from ``x``: with ``x_next`` given, its log-prob under ``fn`` (training);
        otherwise a sample (with ``noise``; ODE when None). Returns (x_next, log_prob, mean, std)."""
        from ..samplers.base import guided

        # training (x_next given) with a detached uncond prediction: its own no-grad forward (saves
        # its backward); sampling: one doubled-batch forward (no gradient either way, and one call of
        # 2B is faster than two of B). Both give the same rows here (the first step's ratio is
        # exactly 1, tested); a BLAS that rounds a row differently by batch size would move that
        # ratio by ~1e-7, far inside any clip range.
        split = self.obj.detach_uncond and x_next is not None
        if self.flow:
            from ..samplers.flow import flow_sde_log_prob

            s, s_next = self.sigmas[i], self.sigmas[i + 1]
            t = torch.tensor(s * self.adapter.num_train_timesteps, device=x.device)
            v = guided(fn, x, t, cond, scale, split).float()
            if noise is None and x_next is None:
                return x + (s_next - s) * v, None, None, None
            if x_next is None:
                from ..samplers.flow import flow_sde_step

                x_next, _, _ = flow_sde_step(v, x, s, s_next, noise, self.obj.noise_level, self.sigmas[1])
            lp, mean, g = flow_sde_log_prob(v, x, x_next, s, s_next, self.obj.noise_level, self.sigmas[1])
            return x_next, lp, mean, g
        from ..samplers.ddim import ddim_step, ddim_transition

        t = self.ts[i]
        t_prev = self.ts[i + 1] if i + 1 < len(self.ts) else -1
        pred = guided(fn, x, torch.tensor(t, device=x.device), cond, scale, split).float()
        eta = self.obj.eta if (noise is not None or x_next is not None) else 0.0
        if x_next is None:
            x_next = ddim_step(pred, x, t, t_prev, self.sched, eta, noise)[0]
            if noise is None:
                return x_next, None, None, None
        lp, mean, std = ddim_transition(pred, x, x_next, t, t_prev, self.sched, eta)
        return x_next, lp, mean, std

    # -- a round -------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, r: int, model: torch.nn.Module) -> None:
        from ..samplers.base import randn_like

        t0 = time.perf_counter()
        obj, G = self.obj, self.obj.group_size
        prompts = self.round_prompts(r)
        cond, uncond = self.encode(prompts)
        cond = {k: v.repeat_interleave(G, 0) for k, v in cond.items()}  # [N,...], prompt-major b*G + j
        uncond = {k: v.repeat_interleave(G, 0) for k, v in uncond.items()}
        stoch, trained = self.round_steps(r)
        gens = self.generators(r, self.n)
        fn = model_fn(self.adapter, model)
        scale = obj.guidance_scale
        xs, nexts, lps, stds, finals = [], [], [], [], []
        n_steps = len(self.sigmas) - 1 if self.flow else len(self.ts)
        with eval_mode(model), self.accelerator.autocast():
            for c0 in range(0, self.n, self.chunk):
                idx = slice(c0, c0 + self.chunk)
                g = gens[idx]
                x = randn_like(torch.empty(self.chunk, *self.latent_shape, device=self.device), g)
                c = (take(uncond, idx), take(cond, idx))
                row_x, row_next, row_lp, row_std = [], [], [], []
                for i in range(n_steps):
                    noise = randn_like(x, g) if i in stoch else None
                    x_next, lp, _, std = self.step(fn, x, i, c, scale, None, noise)
                    if i in trained:
                        row_x.append(x)
                        row_next.append(x_next)
                        row_lp.append(lp)
                        row_std.append(float(std))
                    x = x_next
                xs.append(torch.stack(row_x))  # [T, chunk, C, h, w]
                nexts.append(torch.stack(row_next))
                lps.append(torch.stack(row_lp))  # [T, chunk]
                stds.append(row_std)
                finals.append(x)
        x0 = torch.cat(finals)  # [N, C, h, w]
        t1 = time.perf_counter()
        texts = [p for p in prompts for _ in range(G)]
        scores = self.score(self.rewards, x0, texts)
        self.log("time/sampling_s", t1 - t0)
        self.log("time/scoring_s", time.perf_counter() - t1)
        reward = total_reward(scores)  # [N]
        everyone = gather_groups(reward.view(-1, G), self.accelerator)  # [world*B, G]
        adv = advantages_for(everyone, self.rank, self.world, obj.global_std, obj.adv_clip)
        self.log("reward", reward.mean())
        for n, v in scores.items():
            self.log(f"reward/{n}", v.mean())
        self.log("reward_std_in_group", reward.view(-1, G).std(1).mean())
        from ..objectives.grpo import flat_groups

        keep = ~flat_groups(everyone).repeat_interleave(G).view(self.world, -1)  # [world, N]
        self.log("rollout/zero_adv_frac", 1 - keep.float().mean())  # the same on every process
        buffer = {
            "round": torch.tensor(r),
            "x": torch.cat(xs, 1),  # [T, N, C, h, w]
            "x_next": torch.cat(nexts, 1),
            "old_log_prob": torch.cat(lps, 1).float(),  # [T, N]
            "kl_std": torch.tensor(stds[0], dtype=torch.float32),  # [T] (same grid for every chunk)
            "trained": torch.tensor(trained),
            "advantage": adv.flatten().float(),  # [N]
            **{f"cond.{k}": v for k, v in cond.items()},
            **{f"uncond.{k}": v for k, v in uncond.items()},
        }
        if obj.drop_zero_advantage:
            buffer = self.leave_out_zero_advantage(buffer, keep, model)
        self.buffer = buffer

    def leave_out_zero_advantage(
        self, buffer: dict[str, Tensor], keep: Tensor, model: torch.nn.Module
    ) -> dict[str, Tensor]:
        """The round's buffer reduced to ``zero_advantage_layout``'s samples, with their ``weight``
        ``[N']``. A repacked layout puts samples in micro-batches they were not sampled in, so their
        old log-probs are recomputed there (same weights, mode, autocast and batch as the round's
        first training forward: its ratio stays exactly 1). Counts rounds with nothing kept
        (``rollout/empty_rounds``: they train nothing; the optimizer still steps, with a zero
        gradient, as the loop steps after every micro-batch)."""
        micro = self.obj.updates_per_rollout * self.grad_accum
        order, weight = zero_advantage_layout(keep, self.rank, micro)
        prev = self.buffer.get("empty_rounds", 0) if self.buffer is not None else 0
        out = dict(buffer, weight=weight, empty_rounds=torch.tensor(int(prev) + int(not keep.any())))
        self.log("rollout/empty_rounds", out["empty_rounds"])
        if len(order) == keep.shape[1]:
            return out  # every sample in the chunk it was sampled in (the left-out ones at weight 0)
        for k, v in buffer.items():
            if k in ("x", "x_next", "old_log_prob"):  # [T, N, ...] -> [T, N', ...]
                out[k] = v[:, order]
            elif k == "advantage" or k.startswith(("cond.", "uncond.")):  # [N, ...] -> [N', ...]
                out[k] = v[order]
        if not keep.any():
            return out  # nothing kept anywhere: no log-prob is ever used (the same on every process)
        size = len(order) // micro
        with torch.no_grad(), eval_mode(model), self.accelerator.autocast():
            for m in range(micro):  # every process: micro x trained forwards (in step under FSDP)
                idx = slice(m * size, (m + 1) * size)
                for j, i in enumerate(out["trained"].tolist()):
                    lp = self.terms(model, self.micro_batch(out, idx, j, i))["log_prob"]
                    out["old_log_prob"][j, idx] = lp.float()
        return out

    def micro_batch(self, buf: dict[str, Tensor], idx: slice, j: int, i: int) -> dict[str, Any]:
        """Samples ``idx`` of a round's buffer at its ``j``-th trained step (grid step ``i``)."""
        cond = {k[5:]: v[idx] for k, v in buf.items() if k.startswith("cond.")}
        uncond = {k[7:]: v[idx] for k, v in buf.items() if k.startswith("uncond.")}
        batch = {
            "step_index": i,
            "x": buf["x"][j, idx],
            "x_next": buf["x_next"][j, idx],
            "old_log_prob": buf["old_log_prob"][j, idx],
            "advantage": buf["advantage"][idx],
            "kl_std": buf["kl_std"][j].expand(buf["x"][j, idx].shape[0]),
            "cond": cond,
            "uncond": uncond,
        }
        w = buf.get("weight")
        if w is not None and not bool((w[idx] == 1).all()):  # all-ones weights change nothing
            batch["sample_weight"] = w[idx]
        return batch

    def batches(self, first_step: int, last_step: int, model: torch.nn.Module) -> Iterator[dict[str, Any]]:
        U = self.obj.updates_per_rollout
        for step in range(first_step, last_step):
            buf, r, u = self.round_buffer(step, model)
            size = buf["x"].shape[1] // (U * self.grad_accum)  # fewer when samples were left out
            for a in range(self.grad_accum):
                c0 = (u * self.grad_accum + a) * size
                idx = slice(c0, c0 + size)
                for j, i in enumerate(buf["trained"].tolist()):
                    yield {
                        "seed": sample_seed(self.seed, (step * self.grad_accum + a) * 1000 + j, domain=5),
                        "skipped": 0,
                        "loss_weight": 1.0,
                        **self.micro_batch(buf, idx, j, i),
                    }

    def terms(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        fn = model_fn(self.adapter, model)
        obj = self.obj
        c = (batch["uncond"], batch["cond"]) if obj.train_cfg else batch["cond"]
        scale = obj.guidance_scale if obj.train_cfg else 1.0
        _, lp, mean, _ = self.step(fn, batch["x"], batch["step_index"], c, scale, batch["x_next"], None)
        return {"log_prob": lp, "mean": mean}

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.buffer is None else dict(self.buffer)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.buffer = dict(state) if state else None


# ----------------------------------------------------------------------------- DiffusionNFT


class NFTRollouts(RolloutSource):
    """DiffusionNFT: the old policy samples clean images with the deterministic flow ODE (CFG 1;
    the official rollout uses DPM-Solver-2, which is another ODE solver of the same flow); rewards
    become group-relative advantages and the optimality weight r; training points are forward-process
    noisings of each sample at ``int(sample_steps * timestep_fraction)`` grid sigmas drawn without
    replacement per sample (fresh noise each), each with the old policy's velocity.

    The old policy is a copy of the trained weights, updated after every round as
    ``old <- d * old + (1 - d) * theta`` (``objectives.diffusion_nft.old_policy_decay``)."""

    def __init__(
        self, objective: Any, adapter: Adapter, cfg: Config, accelerator: Any, trainable: dict[str, Tensor]
    ) -> None:
        super().__init__(objective, adapter, cfg, accelerator)
        obj = objective
        if adapter.prediction_type != "flow_matching":
            raise ConfigError(
                f"objective diffusion_nft trains flow-matching models; {cfg.model.path} predicts "
                f"{adapter.prediction_type}: use objective.name=grpo for epsilon / v UNets"
            )
        if obj.guidance_scale != 1:
            raise ConfigError(
                "objective.guidance_scale: diffusion_nft is CFG-free (the official code supports only 1); "
                "set 1"
            )
        self.rewards = self.load_rewards(obj.rewards, "diffusion_nft")
        self.n, self.chunk = self.round_split("diffusion_nft")
        self.sigmas = flow_grid(adapter, obj.sample_steps, self.latent_shape)
        self.n_train = obj.train_steps
        self.micro_batches = self.grad_accum * self.n_train
        self.trainable = trainable
        self.old = {k: v.detach().clone() for k, v in trainable.items()}  # theta_old = theta at start

    @torch.no_grad()
    def rollout(self, r: int, model: torch.nn.Module) -> None:
        from ..objectives.diffusion_nft import nft_optimality
        from ..samplers.base import randn_like
        from ..samplers.flow import flow_sample

        t0 = time.perf_counter()
        obj, G = self.obj, self.obj.group_size
        prompts = self.round_prompts(r)
        cond, _ = self.encode(prompts)
        cond = {k: v.repeat_interleave(G, 0) for k, v in cond.items()}
        gens = self.generators(r, self.n)
        fn = model_fn(self.adapter, model)
        finals = []
        swap_weights(self.trainable, self.old)  # the old policy samples
        try:
            with eval_mode(model), self.accelerator.autocast():
                for c0 in range(0, self.n, self.chunk):
                    idx = slice(c0, c0 + self.chunk)
                    x = randn_like(torch.empty(self.chunk, *self.latent_shape, device=self.device), gens[idx])
                    out = flow_sample(
                        fn,
                        x,
                        self.sigmas,
                        take(cond, idx),
                        1.0,
                        0.0,
                        num_train_timesteps=self.adapter.num_train_timesteps,
                    )
                    finals.append(out.sample.float())
        finally:
            swap_weights(self.trainable, self.old)
        x0 = torch.cat(finals)
        t1 = time.perf_counter()
        scores = self.score(self.rewards, x0, [p for p in prompts for _ in range(G)])
        self.log("time/sampling_s", t1 - t0)
        self.log("time/scoring_s", time.perf_counter() - t1)
        reward = total_reward(scores)
        everyone = gather_groups(reward.view(-1, G), self.accelerator)  # [world*B, G]
        adv = advantages_for(everyone, self.rank, self.world, obj.global_std, obj.adv_clip)
        self.log("reward", reward.mean())
        for n, v in scores.items():
            self.log(f"reward/{n}", v.mean())
        self.buffer = {
            "round": torch.tensor(r),
            "x0": x0,
            "optimality": nft_optimality(adv.flatten().float(), obj.adv_clip),
            **{f"cond.{k}": v for k, v in cond.items()},
        }

    def batches(self, first_step: int, last_step: int, model: torch.nn.Module) -> Iterator[dict[str, Any]]:
        U = self.obj.updates_per_rollout
        grid = torch.tensor(self.sigmas[:-1])  # the sampling grid's sigmas (t = timesteps / 1000)
        for step in range(first_step, last_step):
            buf, r, u = self.round_buffer(step, model)
            cond = {k[5:]: v for k, v in buf.items() if k.startswith("cond.")}
            per_step = self.n // U
            for a in range(self.grad_accum):
                c0 = u * per_step + a * self.chunk
                idx = list(range(c0, c0 + self.chunk))
                first = (r * self.world + self.rank) * self.n
                gens = [
                    torch.Generator().manual_seed(sample_seed(self.seed, first + i, domain=TRAIN_NOISE))
                    for i in idx
                ]
                perms = torch.stack([torch.randperm(len(grid), generator=g)[: self.n_train] for g in gens])
                for j in range(self.n_train):
                    sigma = grid[perms[:, j]].to(self.device)  # [chunk]
                    x0 = buf["x0"][idx]
                    eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0)
                    s = sigma.view(-1, *[1] * (x0.ndim - 1))
                    x_t = (1 - s) * x0 + s * eps  # forward process
                    c = take(cond, idx)
                    batch = {
                        "seed": sample_seed(self.seed, first + idx[0], domain=5) + j,
                        "skipped": 0,
                        "loss_weight": 1.0,
                        "x0": x0,
                        "x_t": x_t,
                        "sigma": sigma,
                        "optimality": buf["optimality"][idx],
                        "cond": c,
                    }
                    swap_weights(self.trainable, self.old)  # v_old: the old policy, no gradient
                    try:
                        with torch.no_grad(), eval_mode(model), self.accelerator.autocast():
                            batch["old_velocity"] = self.terms(model, batch)["velocity"].float()
                    finally:
                        swap_weights(self.trainable, self.old)
                    yield batch

    def terms(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        c = batch["cond"]
        t = batch["sigma"] * self.adapter.num_train_timesteps
        cond = {k: v for k, v in c.items() if k != "__micro__"}
        return {"velocity": self.adapter.predict(batch["x_t"], t, cond, c["__micro__"], model=model).float()}

    def after_step(self, step: int, trainable: dict[str, Tensor]) -> None:
        """After a round's last optimizer step: old <- d * old + (1 - d) * theta."""
        from ..objectives.diffusion_nft import old_policy_decay

        U = self.obj.updates_per_rollout
        if (step + 1) % U:
            return
        d = old_policy_decay((step + 1) // U, self.obj.decay_type)
        with torch.no_grad():
            for n, p in trainable.items():
                self.old[n].mul_(d).add_(p.detach().to(self.old[n].dtype), alpha=1 - d)
        self.log("old_decay", d)

    def state_dict(self) -> dict[str, Tensor]:
        out = {f"old.{k}": v for k, v in self.old.items()}
        if self.buffer is not None:
            out.update({f"buffer.{k}": v for k, v in self.buffer.items()})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:
            return
        self.old = {k[4:]: v.to(self.device) for k, v in state.items() if k.startswith("old.")}
        buf = {k[7:]: v.to(self.device) for k, v in state.items() if k.startswith("buffer.")}
        self.buffer = buf or None
