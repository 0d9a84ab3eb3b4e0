"""Combining several rewards: normalised weighted sums and RankDPO's vote aggregation.

Vote aggregation (Karthik et al., "Scalable Ranked Preference Optimization for T2I", ICCV 2025,
Alg. 1): for each reward l and each ordered pair (i, j), i != j, within one prompt's k images,
image i gets a vote when ``R_l(x_i) > R_l(x_j)`` (ties give no vote). Then
``phi_i = C_i / (n * (k - 1))`` in [0, 1], and the rank sorts phi descending (rank 1 = best).
Because it counts wins, reward scales cancel. With weights ``w_l`` (diffalign's extension; the
paper weighs every reward equally) a win under reward l counts ``w_l`` votes and
``phi_i = sum_l w_l C_{l,i} / (sum_l w_l * (k - 1))``, still in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor


def check_vote_weights(weights: Sequence[float] | None, n_rewards: int) -> list[float]:
    """One weight per reward (default 1 each), none negative, not all zero; one-line error otherwise."""
    if not weights:
        return [1.0] * n_rewards
    if len(weights) != n_rewards:
        raise ValueError(
            f"reward_weights: {len(weights)} weight(s) for {n_rewards} reward(s); give one per reward"
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"reward_weights {list(weights)}: weights must be >= 0 and not all zero")
    return [float(w) for w in weights]


def vote_phi(scores: Mapping[str, Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """``scores[name]``: ``[G, k]`` (G prompt groups of k images) -> phi ``[G, k]``; ``weights``: one
    per reward in ``scores``' order (default: equal)."""
    mats = list(scores.values())
    if not mats:
        raise ValueError("vote_phi needs at least one reward")
    w = check_vote_weights(weights, len(mats))
    G, k = mats[0].shape
    if k < 2:
        raise ValueError("vote_phi needs k >= 2 images per prompt")
    wins = torch.zeros(G, k, dtype=torch.float64)
    for wl, s in zip(w, mats):
        s = s.double()
        wins += wl * (s[:, :, None] > s[:, None, :]).sum(-1)  # i beats j, strictly
    return (wins / (sum(w) * (k - 1))).float()


def ranks_from_phi(phi: Tensor) -> Tensor:
    """Rank 1 = highest phi; ties keep the earlier index first (stable)."""
    order = torch.sort(-phi, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ar = torch.arange(1, phi.shape[-1] + 1).expand_as(order)
    return ranks.scatter_(-1, order, ar)


def normalise(scores: Tensor, mode: Literal["none", "global", "group"]) -> Tensor:
    """z-score ``[G, k]`` scores over everything (``global``) or within each prompt group (``group``)."""
    s = scores.double()
    if mode == "none":
        return s.float()
    if mode == "global":
        return ((s - s.mean()) / s.std().clamp_min(1e-12)).float()
    return ((s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-12)).float()


def weighted_sum(
    scores: Mapping[str, Tensor],
    weights: Mapping[str, float] | None = None,
    mode: Literal["none", "global", "group"] = "group",
) -> Tensor:
    names: Sequence[str] = list(scores)
    w = {n: 1.0 for n in names} if weights is None else weights
    missing = [n for n in names if n not in w]
    if missing:
        raise ValueError(f"weights missing for reward(s) {missing}; given: {sorted(w)}")
    return sum(w[n] * normalise(scores[n], mode) for n in names)  # type: ignore[return-value]
