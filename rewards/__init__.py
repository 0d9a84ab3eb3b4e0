"""Reward models behind one interface. This file is the menu: every registered reward is imported here."""

from . import clip_family  # noqa: F401  (registration by import)
from .base import REWARDS, RewardOutput, check_inputs
from .clip_family import CLIPScore, PickScore, clip_preprocess, load_clip

__all__ = ["REWARDS", "RewardOutput", "check_inputs", "CLIPScore", "PickScore", "clip_preprocess", "load_clip"]
