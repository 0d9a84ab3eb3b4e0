"""Performance paths change speed and memory, never the numbers: precomputed reference errors
give the same losses and weights as a live reference (LoRA-off and frozen copy), also across a
resume; channels-last trains the same model."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import run, trainable


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_precomputed_reference_equals_live_reference(tiny_models, pairs_parquet, tmp_path, mode):
    extra = ["train.max_steps=3", "train.batch_size=2", "train.grad_accum=2"] + (
        ["lora.rank=0", "train.lr=1e-3"] if mode == "full" else []
    )
    run(tiny_models["sd"], pairs_parquet, tmp_path / "live", *extra)
    run(tiny_models["sd"], pairs_parquet, tmp_path / "pre", *extra, "train.precompute_reference=true")
    assert losses(tmp_path / "live") == losses(tmp_path / "pre")  # bit-identical
    a, b = trainable(tmp_path / "live"), trainable(tmp_path / "pre")
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_precomputed_reference_survives_resume(tiny_models, pairs_parquet, tmp_path):
    from test_train import overrides

    from diffalign.config import load_config
    from diffalign.train import train

    extra = [
        "train.max_steps=3",
        "train.batch_size=2",
        "lora.rank=0",
        "train.lr=1e-3",
        "train.precompute_reference=true",
        "train.checkpoint_every=1",
    ]
    run(tiny_models["sd"], pairs_parquet, tmp_path / "full", *extra)
    run(tiny_models["sd"], pairs_parquet, tmp_path / "cut", *extra, "train.halt_after_step=1")
    train(
        load_config(None, overrides(tiny_models["sd"], pairs_parquet, tmp_path / "cut", *extra)),
        resume="latest",
    )
    a, b = trainable(tmp_path / "full"), trainable(tmp_path / "cut")
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0)


def test_channels_last_trains_the_same(tiny_models, pairs_parquet, tmp_path):
    run(tiny_models["sd"], pairs_parquet, tmp_path / "a", "train.max_steps=2", "train.batch_size=2")
    run(
        tiny_models["sd"],
        pairs_parquet,
        tmp_path / "b",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.channels_last=true",
    )
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-6)


def test_gpu_check_builds_real_size_architectures():
    """The GPU script's configs are the real SDXL UNet (2.57B) and SD3-medium transformer (2.03B)."""
    from diffalign.benchmarks.perf.gpu_check import sd3_transformer, sdxl_unet

    with torch.device("meta"):
        n_xl = sum(p.numel() for p in sdxl_unet().parameters())
        n_3 = sum(p.numel() for p in sd3_transformer().parameters())
    assert 2.55e9 < n_xl < 2.6e9 and 2.0e9 < n_3 < 2.1e9, (n_xl, n_3)
