"""Reward win rates: model B (e.g. aligned) against model A (e.g. base) on the same prompts.

Diffusion-DPO's automated win rate (arXiv 2311.12908, supp. S7): for each prompt, the fraction of
head-to-head comparisons between a B image and an A image in which B's reward is higher; a tie
counts one half. ``pairing="all"`` compares every B image with every A image of the prompt;
``pairing="seed"`` compares the images made from the same seed only. The per-prompt win rates
are summarised by their mean and median over prompts with percentile-bootstrap CIs (prompts
resampled), next to each model's mean and median reward (Diffusion-DPO selects checkpoints on the
median PickScore) and the paired mean difference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from ...errors import ConfigError

Pairing = Literal["all", "seed"]


def head_to_head(
    a: Sequence[float], b: Sequence[float], pairing: Pairing = "all", tie_eps: float = 0.0
) -> float:
    """Fraction of comparisons in which ``b`` beats ``a`` (ties, |b - a| <= tie_eps, count 1/2)."""
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_.size == 0 or b_.size == 0:
        raise ConfigError("win rate: every prompt needs at least one image of each model")
    if pairing == "all":
        d = b_[:, None] - a_[None, :]
    elif pairing == "seed":
        if a_.shape != b_.shape:
            raise ConfigError(
                "win rate with pairing='seed' needs as many "
                f"images of each model, got {a_.size} and {b_.size}"
            )
        d = b_ - a_
    else:
        raise ConfigError(f"pairing must be 'all' or 'seed', got {pairing!r}")
    wins = (d > tie_eps).sum()
    ties = (np.abs(d) <= tie_eps).sum()
    return float((wins + 0.5 * ties) / d.size)


def per_prompt_win_rates(
    scores_a: Sequence[Sequence[float]],
    scores_b: Sequence[Sequence[float]],
    pairing: Pairing = "all",
    tie_eps: float = 0.0,
) -> np.ndarray:
    """``[P]`` win rate of B over A for each prompt; ``scores_x[p]`` lists prompt p's image rewards."""
    if len(scores_a) != len(scores_b):
        raise ConfigError(f"win rate: {len(scores_a)} prompts for model A but {len(scores_b)} for model B")
    return np.array(
        [head_to_head(a, b, pairing, tie_eps) for a, b in zip(scores_a, scores_b)], dtype=np.float64
    )


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[np.ndarray], float] = np.mean,
    n: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> list[float]:
    """Percentile bootstrap CI of ``stat`` over resampled ``values`` ([lo, hi]; [nan, nan] if empty)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n, v.size))
    stats = np.apply_along_axis(stat, 1, v[idx]) if stat not in (np.mean, np.median) else stat(v[idx], axis=1)
    alpha = (1 - level) / 2
    return [float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))]


def win_rate_summary(
    scores_a: Sequence[Sequence[float]],
    scores_b: Sequence[Sequence[float]],
    pairing: Pairing = "all",
    tie_eps: float = 0.0,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Win rate of B over A (per prompt, then mean/median with CIs) and both models' reward stats.

    Reward means/medians are over images; their CIs resample prompts (images of one prompt stay
    together), as does the CI of the mean per-prompt difference B - A.
    """
    rates = per_prompt_win_rates(scores_a, scores_b, pairing, tie_eps)
    a_all = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores_a])
    b_all = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores_b])
    diffs = np.array([np.mean(b) - np.mean(a) for a, b in zip(scores_a, scores_b)])
    rng = np.random.default_rng(seed)
    p = len(rates)
    idx = rng.integers(0, p, size=(n_boot, p))

    def clustered(scores: Sequence[Sequence[float]], stat: Callable) -> list[float]:
        if len({len(s) for s in scores}) == 1:  # same number of images per prompt: vectorised
            m = np.asarray(scores, dtype=np.float64)  # (P, k)
            vals = stat(m[idx].reshape(n_boot, -1), axis=1)
        else:
            vals = [
                stat(np.concatenate([np.asarray(scores[i], dtype=np.float64) for i in row])) for row in idx
            ]
        return [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]

    out: dict[str, Any] = {
        "n_prompts": int(p),
        "pairing": pairing,
        "win_rate_mean": float(rates.mean()),
        "win_rate_mean_ci95": bootstrap_ci(rates, np.mean, n_boot, seed),
        "win_rate_median": float(np.median(rates)),
        "win_rate_median_ci95": bootstrap_ci(rates, np.median, n_boot, seed),
        "prompts_won": int((rates > 0.5).sum()),
        "prompts_tied": int((rates == 0.5).sum()),
        "prompts_lost": int((rates < 0.5).sum()),
        "a_mean": float(a_all.mean()),
        "a_mean_ci95": clustered(scores_a, np.mean),
        "a_median": float(np.median(a_all)),
        "a_median_ci95": clustered(scores_a, np.median),
        "b_mean": float(b_all.mean()),
        "b_mean_ci95": clustered(scores_b, np.mean),
        "b_median": float(np.median(b_all)),
        "b_median_ci95": clustered(scores_b, np.median),
        "mean_diff": float(diffs.mean()),
        "mean_diff_ci95": bootstrap_ci(diffs, np.mean, n_boot, seed),
    }
    return out


def group_scores(scores: Sequence[float], prompt_index: Sequence[int]) -> list[list[float]]:
    """Flat per-image scores -> per-prompt lists (prompts in order of first appearance of their index)."""
    groups: dict[int, list[float]] = {}
    for s, i in zip(scores, prompt_index, strict=True):
        groups.setdefault(int(i), []).append(float(s))
    return [groups[k] for k in sorted(groups)]


def score_summary(scores: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean and median reward over images with CIs that resample prompts (one model, no comparison)."""
    flat = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(scores), size=(n_boot, len(scores)))
    boots = [np.concatenate([np.asarray(scores[i], dtype=np.float64) for i in row]) for row in idx]
    means, medians = [b.mean() for b in boots], [np.median(b) for b in boots]
    return {
        "n_prompts": len(scores),
        "n_images": int(flat.size),
        "mean": float(flat.mean()),
        "mean_ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        "median": float(np.median(flat)),
        "median_ci95": [float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))],
    }


def win_rates_by_reward(
    scores: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    a: str,
    b: str,
    categories: Sequence[str] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """``scores[reward][model]`` per-prompt lists -> ``{reward: summary}``; with ``categories`` (one
    per prompt) each summary also has ``by_category`` (e.g. PartiPrompts categories, HPSv2 styles)."""
    out: dict[str, Any] = {}
    for reward, per_model in scores.items():
        res = win_rate_summary(per_model[a], per_model[b], **kw)
        if categories is not None and len(set(categories)) > 1:
            res["by_category"] = {}
            for cat in dict.fromkeys(categories):
                sel = [i for i, c in enumerate(categories) if c == cat]
                res["by_category"][cat] = win_rate_summary(
                    [per_model[a][i] for i in sel], [per_model[b][i] for i in sel], **kw
                )
        out[reward] = res
    return out
