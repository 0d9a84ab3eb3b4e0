"""The over-optimisation guard: is the run still improving, or only its training reward?

Online RL users of every peer repository report reward hacking (backgrounds blanked under an OCR
reward, textures and grids under PickScore, detail collapse) and ask how to tell. Every
``train.guard_every`` steps (and before the first and after the last) this guard samples a fixed
held-out prompt set (``train.guard_prompts``, ``train.guard_images`` images each, the same seeds
every time) with the current weights through the real pipeline, and logs:

- ``guard/gold``: the mean of the gold scorers (``train.guard_gold``; another reward model, or the
  exact judge in the toy worlds), ``guard/gold/<name>`` each;
- ``guard/proxy``: the training reward on the same images (rollout objectives);
- ``guard/diversity``: the mean pairwise RMS pixel distance between a prompt's images (collapse
  drives it to 0);
- ``guard/pixel_mean``, ``guard/pixel_std`` and ``guard/drift``: pixel statistics and how far they
  moved from the first evaluation (blank or saturated images move them).

It warns (once) when gold has fallen below its best while the proxy rose past its value at that
best, and keeps the best-gold weights: ``<output_dir>/best_gold/`` holds their export (what
``load_trained_pipeline`` loads from a checkpoint's ``export/``) and ``best_gold.json`` says which
step it is. Sampling uses a forked RNG in eval mode, so a run with the guard trains exactly as one
without it (tested).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from .tracking import SAMPLE_SEED

GOLD_TOLERANCE = 0.02
"""Gold must fall by more than this (absolute) below its best before the guard warns."""


class OverOptGuard:
    def __init__(self, cfg: Config, adapter: Any, proxy: dict[str, Any], device: torch.device) -> None:
        from ..rewards import load_rewards
        from ..synpic import read_prompts

        t = cfg.train
        self.cfg, self.adapter, self.proxy = cfg, adapter, proxy
        self.every, self.k = t.guard_every, t.guard_images
        self.prompts = read_prompts(t.guard_prompts)
        self.gold = load_rewards([s.strip() for s in t.guard_gold.split(",") if s.strip()], device)
        self.run_dir = Path(t.output_dir)
        self.history: list[dict[str, float]] = []
        self.warned = False

    def due(self, step: int, last: bool) -> bool:
        return self.every > 0 and (step % self.every == 0 or last)

    @torch.no_grad()
    def evaluate(self, step: int, autocast: Callable[[], Any]) -> dict[str, float]:
        """Sample and score the guard prompts with the current weights; returns the ``guard/*`` logs."""
        from ..models.generate import generate_media
        from ..models.loading import pipeline_call_defaults

        t, pipe = self.cfg.train, self.adapter.pipe
        pipe.set_progress_bar_config(disable=True)
        den = self.adapter.denoiser
        was_training = den.training
        den.eval()
        n = len(self.prompts)
        seeds = [SAMPLE_SEED + 1000 + i for i in range(n * self.k)]
        try:
            with torch.random.fork_rng(devices=[]), autocast():
                media = generate_media(
                    pipe,
                    self.prompts,
                    self.k,
                    seeds,
                    t.sample_steps,
                    t.sample_guidance,
                    **pipeline_call_defaults(self.cfg.model.path),
                )
        finally:
            den.train(was_training)
        imgs = torch.from_numpy(np.stack(media)).permute(0, 3, 1, 2).float() / 255  # [n*k,3,H,W]
        texts = [p for p in self.prompts for _ in range(self.k)]
        logs: dict[str, float] = {"step": float(step)}
        golds = {name: float(r(imgs, texts).scores.float().mean()) for name, r in self.gold.items()}
        logs["guard/gold"] = float(np.mean(list(golds.values())))
        logs.update({f"guard/gold/{name}": v for name, v in golds.items()})
        if self.proxy:
            proxies = [float(r(imgs, texts).scores.float().mean()) for r in self.proxy.values()]
            logs["guard/proxy"] = sum(proxies)  # the training reward: the sum of its rewards
        per_prompt = imgs.reshape(n, self.k, -1)  # [n, k, 3*H*W]
        if self.k > 1:
            d = torch.cdist(per_prompt, per_prompt) / per_prompt.shape[-1] ** 0.5  # RMS distances [n,k,k]
            logs["guard/diversity"] = float(d.sum() / (n * self.k * (self.k - 1)))
        logs["guard/pixel_mean"] = float(imgs.mean())
        logs["guard/pixel_std"] = float(imgs.std())
        first = self.history[0] if self.history else logs
        logs["guard/drift"] = abs(logs["guard/pixel_mean"] - first["guard/pixel_mean"]) + abs(
            logs["guard/pixel_std"] - first["guard/pixel_std"]
        )
        self.history.append(logs)
        return {k: v for k, v in logs.items() if k != "step"}

    def best(self) -> dict[str, float]:
        return max(self.history, key=lambda r: r["guard/gold"])

    def check(self, step: int) -> str | None:
        """The warning when gold fell while the proxy rose (once per run), else None."""
        now, best = self.history[-1], self.best()
        if self.warned or "guard/proxy" not in now or now is best:
            return None
        fell = now["guard/gold"] < best["guard/gold"] - GOLD_TOLERANCE
        if fell and now["guard/proxy"] > best["guard/proxy"]:
            self.warned = True
            return (
                f"warning: step {step}: possible over-optimisation: the gold score fell from "
                f"{best['guard/gold']:.3f} (step {int(best['step'])}) to {now['guard/gold']:.3f} while "
                f"the training reward rose from {best['guard/proxy']:.3f} to {now['guard/proxy']:.3f}; "
                f"the best-gold weights are kept in {self.run_dir / 'best_gold'}"
            )
        return None

    def keep_best(self, export: Callable[[Path], None]) -> None:
        """After an evaluation: if it is the best gold so far, export the weights to ``best_gold/``
        (written next to it, then renamed: a crash leaves the previous best intact)."""
        now = self.history[-1]
        if now is not self.best():
            return
        final = self.run_dir / "best_gold"
        tmp = self.run_dir / "best_gold.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        export(tmp)
        old = self.run_dir / "best_gold.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        from ..files import write_json_atomic

        write_json_atomic(self.run_dir / "best_gold.json", {"step": int(now["step"]), **now})

    def state(self) -> list[dict[str, float]]:
        return list(self.history)

    def restore(self, history: list[dict[str, float]], warned: bool) -> None:
        self.history, self.warned = list(history), warned


def guard_plot(metrics_file: Path, out: Path) -> Path | None:
    """Proxy vs gold (and diversity) over the run's guard evaluations, as a PNG; None without any."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "guard/gold" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["guard/gold"] for r in rows], "o-", label="gold")
    if "guard/proxy" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["guard/proxy"] for r in rows], "s--", color="tab:orange", label="proxy (training)")
        ax2.set_ylabel("proxy")
        ax2.legend(loc="lower right")
    ax.set_xlabel("step")
    ax.set_ylabel("gold")
    ax.legend(loc="upper left")
    ax.set_title("over-optimisation guard")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
