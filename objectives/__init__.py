"""Preference objectives. This file is the menu: every registered method is imported here."""

from . import (  # noqa: F401  (registration by import)
    dcpo,
    diffusion_dpo,
    diffusion_nft,
    flow_grpo,
    grpo,
    inpo,
    kto,
    mapo,
    online_dpo,
    rankdpo,
    sft,
    smpo,
    spo,
)
from .base import OBJECTIVES, Objective, ObjectiveOutput, build_objective
from .dcpo import DCPO
from .diffusion_dpo import DiffusionDPO, diffusion_dpo_loss, dpo_inside
from .diffusion_nft import DiffusionNFT, nft_loss, nft_optimality, old_policy_decay
from .flow_grpo import FlowGRPO
from .grpo import GRPO, group_advantages, grpo_loss
from .inpo import InPO, inversion_inputs
from .kto import DiffusionKTO, kto_loss
from .mapo import MaPO, mapo_loss
from .online_dpo import OnlineDPO
from .rankdpo import RankDPO, rank_dpo_loss
from .sft import SFT, sft_loss
from .smpo import SmPO, smoothed_weight, smpo_loss
from .spo import SPO, spo_loss

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveOutput",
    "build_objective",
    "DCPO",
    "DiffusionDPO",
    "diffusion_dpo_loss",
    "dpo_inside",
    "DiffusionNFT",
    "nft_loss",
    "nft_optimality",
    "old_policy_decay",
    "FlowGRPO",
    "GRPO",
    "group_advantages",
    "grpo_loss",
    "InPO",
    "inversion_inputs",
    "DiffusionKTO",
    "kto_loss",
    "MaPO",
    "mapo_loss",
    "OnlineDPO",
    "RankDPO",
    "rank_dpo_loss",
    "SFT",
    "sft_loss",
    "SmPO",
    "smoothed_weight",
    "smpo_loss",
    "SPO",
    "spo_loss",
]
