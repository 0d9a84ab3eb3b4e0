"""The ShapesWorld exact judge as a reward: the toy analogue of Flow-GRPO's GenEval reward.

``shapes_judge=PROMPTS.jsonl`` scores an image 1.0 when the exact detector + GenEval rules
(``judge.judge_image``) accept it for its prompt's metadata, else 0.0 (GenEval's strict accuracy).
``shapes_partial=PROMPTS.jsonl`` gives the dense partial credit Flow-GRPO trains on (the mean
per-clause credit, ``geneval.rules.partial_credit``; 1.0 exactly when the strict judge accepts). The
prompts file is the one the rollout source reads (GenEval metadata lines with a ``prompt`` key), so
every training prompt has its metadata. Registered in ``diffalign.rewards.REWARDS`` when this module
is imported (the demo and the toy benchmarks import it; the core never does: the judge belongs to the
toy world, above the reward layer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError
from ...rewards.base import REWARDS, RewardOutput, check_inputs
from ..geneval.rules import partial_credit
from .judge import detect, judge_image


def read_metadata(path: str | Path) -> dict[str, dict[str, Any]]:
    """prompt -> GenEval metadata, from a JSONL file of metadata lines."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"shapes_judge: metadata file {str(p)!r} does not exist (a GenEval-style JSONL)")
    out = {}
    for ln, line in enumerate(p.read_text().splitlines(), start=1):
        if line.strip():
            rec = json.loads(line)
            if "prompt" not in rec or "include" not in rec:
                raise ConfigError(f"shapes_judge: {p} line {ln}: needs GenEval keys 'prompt' and 'include'")
            out[rec["prompt"]] = rec
    return out


@REWARDS.register("shapes_judge")
class ShapesJudge:
    """1.0 if the exact ShapesWorld judge accepts the image for its prompt, else 0.0."""

    modality = "image"

    def __init__(self, path: str, device: str | torch.device = "cpu") -> None:
        self.metadata = read_metadata(path)

    def score(self, image: np.ndarray, metadata: dict[str, Any]) -> float:
        return float(judge_image(image, metadata)[0])

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        check_inputs(images, prompts)
        arr = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores = []
        for img, text in zip(arr, prompts, strict=True):
            md = self.metadata.get(text)
            if md is None:
                raise ConfigError(f"shapes_judge: prompt {text[:60]!r} is not in its metadata file")
            scores.append(self.score(np.ascontiguousarray(img), md))
        return RewardOutput(torch.tensor(scores, dtype=torch.float32))


@REWARDS.register("shapes_partial")
class ShapesPartialCredit(ShapesJudge):
    """The mean per-clause credit of the exact judge's detections (Flow-GRPO's training reward)."""

    def score(self, image: np.ndarray, metadata: dict[str, Any]) -> float:
        return partial_credit(detect(image), metadata)
