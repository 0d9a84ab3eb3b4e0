"""Reward models behind one interface. This file is the menu: every registered reward is imported here.

Image rewards score ``(images, prompts)``; audio rewards (``modality = "audio"``, e.g. ``clap``) score
``(audio, prompts, sample_rate)``."""

from . import aesthetic, clap, clip_family, compressibility, hps, image_reward, step_aware, video  # noqa: F401  (registration by import)
from .aesthetic import AestheticV2
from .base import REWARDS, RewardOutput, check_audio_inputs, check_inputs
from .clap import CLAPScore, load_clap
from .clip_family import CLIPScore, PickScore, clip_preprocess, load_clip
from .hps import HPSv2, pad_preprocess
from .image_reward import ImageReward
from .loading import check_reward_names, load_rewards, score_media
from .step_aware import StepAwarePM
from .video import VideoCLIPScore, check_video_inputs

__all__ = [
    "AestheticV2",
    "HPSv2",
    "pad_preprocess",
    "REWARDS",
    "RewardOutput",
    "check_inputs",
    "check_audio_inputs",
    "CLAPScore",
    "load_clap",
    "CLIPScore",
    "PickScore",
    "clip_preprocess",
    "load_clip",
    "ImageReward",
    "check_reward_names",
    "load_rewards",
    "score_media",
    "StepAwarePM",
    "VideoCLIPScore",
    "check_video_inputs",
]
