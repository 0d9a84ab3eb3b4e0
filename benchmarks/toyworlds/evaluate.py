"""Judged GenEval-style evaluation of a text-to-image pipeline on ShapesWorld prompts.

Distinct prompts (``geneval.metadata.shapes_prompts``) are rendered with fixed per-image seeds
(``diffalign.synpic.image_seed(seed, prompt index, sample index)``), judged by the exact ShapesWorld
detector + GenEval rules, and summarised GenEval's way (overall = mean of per-tag accuracies) with
cluster-bootstrap CIs over distinct prompts (``geneval.stats``: compare two models evaluated on the
same prompts and seeds with ``stats.overall_gain`` / ``stats.paired_difference``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...synpic import image_seed
from ..geneval.metadata import shapes_prompts
from ..geneval.stats import summarize_results
from .judge import judge_image


@torch.no_grad()
def generate(
    pipe: Any,
    texts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    guidance: float = 4.0,
    batch: int = 64,
    **call_kw: Any,
) -> np.ndarray:
    """uint8 images ``[N,H,W,3]``, one per (text, seed), batched through the pipeline."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(texts), batch), desc="generate", unit="batch", leave=False):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        imgs = pipe(
            list(texts[i : i + batch]),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
            **call_kw,
        ).images
        out.append((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def evaluate_pipeline(
    pipe: Any,
    split: str = "heldout",
    n_prompts: int = 60,
    per_prompt: int = 4,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    batch: int = 64,
    **call_kw: Any,
) -> dict[str, Any]:
    metas = shapes_prompts(split, n_prompts, seed)  # distinct; fewer than asked if the split has fewer
    texts = [m["prompt"] for m in metas for _ in range(per_prompt)]
    seeds = [image_seed(seed, i, j) for i in range(len(metas)) for j in range(per_prompt)]
    images = generate(pipe, texts, seeds, steps, guidance, batch, **call_kw)
    results = []
    for k, img in enumerate(images):
        md = metas[k // per_prompt]
        ok, reason = judge_image(img, md)
        results.append(
            {
                "tag": md["tag"],
                "prompt": md["prompt"],
                "metadata": md,
                "seed": seeds[k],
                "correct": ok,
                "reason": reason,
            }
        )
    summary = summarize_results(results)
    summary["n_prompts_requested"] = n_prompts
    return {"summary": summary, "results": results, "images": images}
