"""Preference objectives. This file is the menu: every registered method is imported here."""

from . import dcpo, diffusion_dpo, inpo, kto, mapo, online_dpo, rankdpo, sft, smpo, spo  # noqa: F401  (registration by import)
from .base import OBJECTIVES, Objective, ObjectiveOutput, build_objective
from .dcpo import DCPO
from .diffusion_dpo import DiffusionDPO, diffusion_dpo_loss, dpo_inside
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
