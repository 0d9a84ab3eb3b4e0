"""The shipped ShapesWorld toy models load through the real classes from their local folders."""

from __future__ import annotations

import torch

from diffalign.demo import ASSETS


def test_assets_size_budget():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= 40 * 2**20, f"toy assets are {total / 2**20:.1f} MB (budget 40 MB)"


def test_toy_pipelines_load_and_sample():
    import diffusers

    from diffalign.models import load_pipeline

    for name, cls in (("toy-sd", diffusers.StableDiffusionPipeline), ("toy-sd3", diffusers.StableDiffusion3Pipeline)):
        pipe, kw = load_pipeline(ASSETS / name)
        assert isinstance(pipe, cls)
        img = pipe(["a photo of a red circle"], num_inference_steps=4, output_type="pt",
                   generator=torch.Generator().manual_seed(0), **kw).images
        assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
    assert diffusers.StableDiffusionPipeline.from_pretrained(ASSETS / "toy-sd", safety_checker=None).unet.config.sample_size == 16


def test_toy_rewards_load_through_pickscore():
    import numpy as np

    from diffalign.benchmarks.toyworlds.shapes import make_dataset, perturb_metadata
    from diffalign.rewards import PickScore

    items = list(make_dataset(60, 5, "train", 32))
    x = torch.from_numpy(np.stack([i[0] for i in items])).permute(0, 3, 1, 2).float() / 255
    rng = np.random.default_rng(0)
    for name in ("toy-clip-a", "toy-clip-b"):
        r = PickScore(str(ASSETS / name))
        good = r(x, [i[1] for i in items]).scores
        bad = r(x, [perturb_metadata(i[2], rng)["prompt"] for i in items]).scores
        assert (good > bad).float().mean() > 0.7  # trained rewards prefer the true caption
