"""RankDPO (Karthik et al., "Scalable Ranked Preference Optimization for Text-to-Image Generation", ICCV 2025).

No official code was released; this follows the paper's Eq. 5-7 and Alg. 2 (arXiv 2410.18013v2).

Notation (code -> paper), for k images of one prompt sharing t (and noise, as in the loop):
    s = policy_err - ref_err            ->  s_i = ||eps_i - eps_theta(x^i_t)||^2 - ||eps_i - eps_ref(x^i_t)||^2
    gain  = 2**phi - 1                  ->  G_i (phi: fraction of pairwise reward wins, diffalign.rewards.ensemble)
    disc  = log(1 + rank)               ->  D(tau(i)), tau the true rank from phi (Alg. 2; rank 1 = best)
    w_ij  = |G_i-G_j| * |1/D_i - 1/D_j| ->  Delta_ij (LambdaLoss / LiPO weight)
    loss  = sum_{i above j} w_ij * -logsigmoid(-beta_eff * (s_i - s_j))

Beta convention: diffalign's Diffusion-DPO convention, ``beta_eff = 0.5 * beta``, so with k = 2 the
loss is ``diffusion_dpo`` times the constant pair weight ``|G_1 - G_2| * (1/log 2 - 1/log 3)``
("DPO with gain", paper App. A.2; tested). Natural log for D (the paper writes log).
Pairs are normalised by the number of ordered pairs (k(k-1)/2) so beta transfers across k
(a diffalign choice; the paper sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import OBJECTIVES, ObjectiveOutput


def rank_dpo_loss(
    policy_err: Tensor, ref_err: Tensor, phi: Tensor, rank: Tensor, beta: float, use_gain: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-prompt loss ``[B]`` and the weighted pairwise accuracy ``[B]`` for ``[B, k]`` inputs."""
    s = policy_err - ref_err  # [B,k]; lower is better for the policy
    gain = (2.0**phi) - 1.0 if use_gain else torch.ones_like(phi)
    inv_d = 1.0 / torch.log1p(rank.to(s.dtype))  # 1 / log(1 + rank)
    above = rank[:, :, None] < rank[:, None, :]  # [B,k,k]: i ranked above j
    dgap = (inv_d[:, :, None] - inv_d[:, None, :]).abs()
    w = (gain[:, :, None] - gain[:, None, :]).abs() * dgap if use_gain else dgap
    inside = -0.5 * beta * (s[:, :, None] - s[:, None, :])  # [B,k,k]
    k = s.shape[1]
    npairs = k * (k - 1) / 2
    loss = (w * -F.logsigmoid(inside) * above).sum((1, 2)) / npairs
    acc = ((inside > 0).float() * above * (w > 0)).sum((1, 2)) / (above * (w > 0)).sum((1, 2)).clamp_min(1)
    return loss, acc


@OBJECTIVES.register("rankdpo")
@dataclass(frozen=True)
class RankDPO:
    """RankDPO: listwise DPO over k ranked images per prompt with DCG-style pair weights."""

    beta: float = 5000.0
    """Same convention as diffusion_dpo (``-0.5 * beta``)."""
    use_gain: bool = True

    needs_reference: ClassVar[bool] = True
    kind: ClassVar[str] = "ranked"
    winner_only: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    def __call__(self, policy_err: Tensor, ref_err: Tensor | None, batch: dict[str, Any]) -> ObjectiveOutput:
        assert ref_err is not None
        B, k = policy_err.shape
        if "phi" in batch:
            phi = torch.as_tensor(batch["phi"], dtype=policy_err.dtype, device=policy_err.device).view(B, k)
            rank = torch.as_tensor(batch["rank"], device=policy_err.device).view(B, k)
        else:  # plain pairs: winner first -> phi (1, 0), ranks (1, 2)
            phi = torch.tensor([[1.0] + [0.0] * (k - 1)], device=policy_err.device).expand(B, k)
            rank = torch.arange(1, k + 1, device=policy_err.device).expand(B, k)
        loss, acc = rank_dpo_loss(policy_err, ref_err, phi, rank, self.beta, self.use_gain)
        metrics = {
            "implicit_acc": acc.detach(),
            "err/policy_w": policy_err[:, 0].detach(),
            "err/ref_w": ref_err[:, 0].detach(),
        }
        return ObjectiveOutput(loss, metrics)
