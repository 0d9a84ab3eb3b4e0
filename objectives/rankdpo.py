"""RankDPO (Karthik et al., "Scalable Ranked Preference Optimization for Text-to-Image Generation",
ICCV 2025).

No official code was released; this follows the paper's Eq. 5-7 and Alg. 2 (arXiv 2410.18013v2).

Notation (code -> paper), for k images of one prompt sharing t (and noise, as in the loop):
    s = policy_err - ref_err            ->  s_i = ||eps_i - eps_theta(x^i_t)||^2
                                                  - ||eps_i - eps_ref(x^i_t)||^2
    gain  = 2**phi - 1                  ->  G_i (phi: fraction of pairwise reward wins,
                                            diffalign.rewards.ensemble)
    rank  = fractional rank of phi      ->  tau(i), the true rank from phi (Alg. 2; 1 = best)
    disc  = log(1 + rank)               ->  D(tau(i))
    w_ij  = |G_i-G_j| * |1/D_i - 1/D_j| ->  Delta_ij (LambdaLoss / LiPO weight)
    loss  = sum_{phi_i > phi_j} w_ij * -logsigmoid(-0.5 * beta * (s_i - s_j)) / (k(k-1)/2)

Mapping onto the paper's literal ``L = -sum_{i above j} Delta_ij log sigmoid(-beta_paper (s_i - s_j))``:
    * beta: diffalign keeps Diffusion-DPO's ``-0.5 * beta`` convention, so ``beta_paper = beta / 2``;
      a beta taken from the paper's formula must be **doubled** here.
    * pair averaging: the pair sum is divided by ``k(k-1)/2`` (the number of unordered pairs) so one
      beta and lr transfer across k; the paper sums. Multiply the loss (or the lr) by ``k(k-1)/2`` to
      recover the paper's scale. With k = 2 the loss is ``diffusion_dpo`` times the constant pair
      weight ``|G_1 - G_2| * (1/log 2 - 1/log 3)`` ("DPO with gain", paper App. A.2).
    Natural log for D (the paper writes log).

Ranks come from ``phi`` inside the objective; a ``rank`` column in the batch is ignored, so a ranked
set whose stored ranks contradict its scores still trains in phi's direction. Ties (equal phi) are
explicit and order-independent: tied images share the average of the ranks they span (fractional
ranking, e.g. two images tied for first both get 1.5) for the discount, and a tied pair contributes no
pair term (it has no preferred side). Reordering tied images therefore leaves the loss unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ERRORS, OBJECTIVES, ObjectiveOutput


def fractional_ranks(phi: Tensor) -> Tensor:
    """Rank 1 = highest phi; tied images share the mean of the ranks they span. ``[B,k] -> [B,k]``."""
    above = (phi[:, None, :] > phi[:, :, None]).sum(-1)  # [B,k]: how many images beat i
    tied = (phi[:, None, :] == phi[:, :, None]).sum(-1)  # [B,k]: i and its ties (>= 1)
    return 1.0 + above.to(phi.dtype) + (tied - 1).to(phi.dtype) / 2


def rank_dpo_loss(
    policy_err: Tensor, ref_err: Tensor, phi: Tensor, beta: float, use_gain: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-prompt loss ``[B]``, the weighted pairwise accuracy ``[B]`` and the margin ``[B]`` for
    ``[B, k]`` errors and scores ``phi``.

    ``margin`` is the single-pair DPO logit with the same gradient factor as the set: the m with
    ``sigmoid(-m) = sum_ij w_ij sigmoid(-inside_ij) / sum_ij w_ij`` over the ordered pairs (for k = 2
    exactly the DPO logit ``inside``; 0 for a set without an ordered pair of non-zero weight)."""
    s = policy_err - ref_err  # [B,k]; lower is better for the policy
    gain = (2.0**phi) - 1.0 if use_gain else torch.ones_like(phi)
    inv_d = 1.0 / torch.log1p(fractional_ranks(phi))  # [B,k]: 1 / log(1 + rank)
    above = (phi[:, :, None] > phi[:, None, :]).to(s.dtype)  # [B,k,k]: i strictly preferred to j
    w = (gain[:, :, None] - gain[:, None, :]).abs() * (inv_d[:, :, None] - inv_d[:, None, :]).abs()
    w = w * above  # [B,k,k]: weight of every ordered pair, 0 for ties and for j above i
    inside = -0.5 * beta * (s[:, :, None] - s[:, None, :])  # [B,k,k]
    k = s.shape[1]
    loss = (w * -F.logsigmoid(inside)).sum((1, 2)) / (k * (k - 1) / 2)
    counted = (w > 0).to(s.dtype)
    acc = ((inside > 0).to(s.dtype) * counted).sum((1, 2)) / counted.sum((1, 2)).clamp_min(1)
    with torch.no_grad():  # log-sum-exp form of logit(1 - F), F the weighted mean gradient factor
        logw = torch.where(w > 0, w.log(), torch.full_like(w, float("-inf"))).flatten(1)  # [B,k*k]
        pos = torch.logsumexp(logw + F.logsigmoid(inside).flatten(1), 1)
        neg = torch.logsumexp(logw + F.logsigmoid(-inside).flatten(1), 1)
        margin = torch.where(counted.flatten(1).sum(1) > 0, pos - neg, torch.zeros_like(pos))
    return loss, acc, margin


@OBJECTIVES.register("rankdpo")
@dataclass(frozen=True)
class RankDPO:
    """RankDPO: listwise DPO over k ranked images per prompt with DCG-style pair weights."""

    beta: float = 5000.0
    """Diffusion-DPO's convention (``-0.5 * beta``): twice the beta of the paper's literal formula."""
    use_gain: bool = True

    needs_reference: ClassVar[bool] = True
    kind: ClassVar[str] = "ranked"
    source: ClassVar[str] = "dataset"
    terms: ClassVar[str] = "errors"
    noises_inputs: ClassVar[bool] = False
    ref_refresh_every: ClassVar[int] = 0
    winner_only: ClassVar[bool] = False
    per_image_captions: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    reports_margin: ClassVar[bool] = True
    """``margin``: see ``rank_dpo_loss`` (the equal-gradient-factor DPO logit of the set)."""
    logistic_margin: ClassVar[bool] = True
    """Every pair term is ``-logsigmoid`` of a beta-scaled logit; ``sigmoid(-margin)`` is the set's
    weighted mean gradient factor, which auto-beta steers."""
    reported_metrics: ClassVar[frozenset[str]] = ERRORS | {"implicit_acc", "margin"}
    """``err/*_w``: the image with the highest phi (first on ties), ``err/*_l``: the lowest."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    def __call__(self, policy_err: Tensor, ref_err: Tensor | None, batch: dict[str, Any]) -> ObjectiveOutput:
        assert ref_err is not None
        B, k = policy_err.shape
        if "phi" in batch:  # ranks are derived from phi; a stored ``rank`` is not trusted
            phi = torch.as_tensor(batch["phi"], dtype=policy_err.dtype, device=policy_err.device).view(B, k)
        else:  # plain pairs: winner first -> phi (1, 0, ...)
            phi = torch.zeros(B, k, dtype=policy_err.dtype, device=policy_err.device)
            phi[:, 0] = 1.0
        loss, acc, margin = rank_dpo_loss(policy_err, ref_err, phi, self.beta, self.use_gain)
        ar = torch.arange(B, device=policy_err.device)
        best, worst = phi.argmax(1), phi.argmin(1)  # [B]; first index on ties
        metrics = {
            "implicit_acc": acc.detach(),
            "margin": margin.detach(),
            "err/policy_w": policy_err[ar, best].detach(),
            "err/policy_l": policy_err[ar, worst].detach(),
            "err/ref_w": ref_err[ar, best].detach(),
            "err/ref_l": ref_err[ar, worst].detach(),
        }
        return ObjectiveOutput(loss, metrics)
