"""``diffalign train-spm``: train SPO's step-aware preference model on preference pairs.

Recipe of RockeyCoss/SPO ``step_aware_preference_model/trainer`` (``criterions/spm_criterion.py``):
for each pair (winner, loser, caption) draw one t uniformly in [0, T), encode both images with the
VAE, noise them with *shared* noise, let the diffusion model predict x0 with CFG, decode, and score
both decoded predictions with the time-conditioned CLIP at t. The loss is PickScore's 2-way
cross-entropy over the pair's two logits (``logit_scale * cos``) against the label (ties drop out
with the pair loader's default). Only the time modules train by default (``train_clip=True``
fine-tunes the whole CLIP as the reference does).

Reports held-out accuracy per timestep bucket before and after, so the step-awareness is visible.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class SPMConfig:
    data: str
    """Pairs (any format ``diffalign train`` reads; winner first after labels)."""
    model: str
    """The diffusion pipeline whose noisy predictions the SPM learns to judge."""
    clip: str
    """Initial CLIP (PickScore in the paper) or an SPM folder to continue."""
    out: str
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-4
    guidance_scale: float = 5.0
    resolution: int = 32
    train_clip: bool = False
    heldout: int = 64
    """Pairs kept out of training for the per-t accuracy report."""
    seed: int = 0


def _x0_images(
    adapter, pixels: torch.Tensor, captions: list[str], t: torch.Tensor, gen: torch.Generator, guidance: float
) -> torch.Tensor:
    """pixels ``[B,2,3,R,R]`` -> decoded CFG x0 predictions ``[2B,3,R,R]`` (winners then losers)
    at t ``[B]``."""
    from diffalign.samplers.base import guided
    from diffalign.samplers.ddim import NoiseSchedule

    B = pixels.shape[0]
    x0 = adapter.encode_images(pixels.flatten(0, 1).to(adapter.device)).unflatten(0, (B, 2))
    noise = torch.randn(x0[:, 0].shape, generator=gen).to(x0)
    sched = NoiseSchedule.from_scheduler(adapter.noise_scheduler)
    micro = adapter.default_micro(2 * B, pixels.shape[-2], pixels.shape[-1]).to(adapter.device)
    cond = {k: v.to(adapter.device) for k, v in adapter.encode_prompts(captions + captions).items()}
    uncond = {k: v.to(adapter.device) for k, v in adapter.encode_prompts([""] * (2 * B)).items()}
    tt = torch.cat([t, t]).to(adapter.device)
    x = torch.cat([x0[:, 0], x0[:, 1]])  # [2B,...] winners then losers, shared noise
    n = torch.cat([noise, noise])
    x_t = adapter.add_noise(x, n, tt)

    def fn(xx, ti, c):
        return adapter.predict(
            xx, ti, {k: v for k, v in c.items() if k != "__m"}, c["__m"], model=adapter.denoiser
        ).float()

    pred = guided(fn, x_t, tt, ({**uncond, "__m": micro}, {**cond, "__m": micro}), guidance)
    a = adapter.noise_scheduler.alphas_cumprod.to(x_t.device)[tt].view(-1, 1, 1, 1).float()
    if sched.prediction_type == "epsilon":
        x0_hat = (x_t - (1 - a).sqrt() * pred) / a.sqrt()
    else:
        x0_hat = a.sqrt() * x_t - (1 - a).sqrt() * pred
    return adapter.decode_latents(x0_hat)


def train_spm(cfg: SPMConfig) -> dict:
    from tqdm.auto import tqdm

    from diffalign._quiet import quiet_libraries
    from diffalign.config import DataConfig, ModelConfig
    from diffalign.data.pairs import PairDataset, collate
    from diffalign.errors import ConfigError
    from diffalign.models.loading import default_device, load_adapter
    from diffalign.rewards.step_aware import StepAwarePM

    quiet_libraries()
    torch.manual_seed(cfg.seed)
    device = default_device()
    ds = PairDataset(DataConfig(path=cfg.data, resolution=cfg.resolution), verbose=True)
    if len(ds) <= cfg.heldout:
        raise ConfigError(f"train-spm: {cfg.data} has {len(ds)} pairs; need more than heldout={cfg.heldout}")
    adapter = load_adapter(ModelConfig(path=cfg.model), device, torch.float32)
    if adapter.prediction_type == "flow_matching":
        raise ConfigError("train-spm: SPO's step-aware model is defined for DDPM-family (epsilon / v) models")
    adapter.denoiser.requires_grad_(False).eval()
    spm = StepAwarePM(cfg.clip, device=device)
    spm.model.requires_grad_(cfg.train_clip)
    params = list(spm.time.parameters()) + (list(spm.model.parameters()) if cfg.train_clip else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    T = adapter.num_train_timesteps
    held = list(range(cfg.heldout))
    train_idx = list(range(cfg.heldout, len(ds)))

    def evaluate() -> dict[str, float]:
        """Held-out pairwise accuracy per t bucket (fixed noise and t per pair)."""
        buckets = {"t<250": [], "250-500": [], "500-750": [], ">=750": []}
        g = torch.Generator().manual_seed(cfg.seed + 1)
        for s in range(0, len(held), cfg.batch_size):
            keys = held[s : s + cfg.batch_size]
            batch = collate([ds[(i, cfg.seed + i)] for i in keys])
            t = torch.randint(0, T, (len(keys),), generator=g)
            with torch.no_grad():
                imgs = _x0_images(adapter, batch["pixels"], batch["caption"], t, g, cfg.guidance_scale)
                lg = spm.logits(imgs, batch["caption"] * 2, torch.cat([t, t]).float()).view(2, -1)
            for ti, ok in zip(t.tolist(), (lg[0] > lg[1]).tolist(), strict=True):
                key = "t<250" if ti < 250 else "250-500" if ti < 500 else "500-750" if ti < 750 else ">=750"
                buckets[key].append(float(ok))
        return {k: sum(v) / len(v) for k, v in buckets.items() if v}

    before = evaluate()
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.steps), desc="train-spm", unit="step")
    for step in bar:
        keys = [train_idx[int(i)] for i in torch.randint(0, len(train_idx), (cfg.batch_size,), generator=gen)]
        batch = collate(
            [ds[(i, cfg.seed * 1_000_003 + step * cfg.batch_size + j)] for j, i in enumerate(keys)]
        )
        t = torch.randint(0, T, (len(keys),), generator=gen)
        with torch.no_grad():
            imgs = _x0_images(adapter, batch["pixels"], batch["caption"], t, gen, cfg.guidance_scale)
        lg = spm.logits(imgs, batch["caption"] * 2, torch.cat([t, t]).float()).view(2, -1).T  # [B, 2]
        loss = F.cross_entropy(
            lg, torch.zeros(len(keys), dtype=torch.long, device=lg.device)
        )  # winner is index 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{(lg[:, 0] > lg[:, 1]).float().mean().item():.2f}")
    after = evaluate()
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    spm.save(tmp)
    report = {"config": asdict(cfg), "heldout_acc_before": before, "heldout_acc_after": after}
    (tmp / "train_spm.json").write_text(json.dumps(report, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"held-out accuracy by t, before: {before}\n                        after:  {after}\nsaved {out}")
    return report
