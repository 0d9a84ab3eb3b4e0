"""train.report_to and the checkpoint sample grids: where metrics and samples go, and that drawing
samples leaves the training run itself untouched."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.config import ConfigError, validate
from diffalign.train import train

from conftest import newest_weights, tb_scalars, tiny_train_config


def _cfg(model: Path, data: Path, out: Path, *extra: str):
    return tiny_train_config(model, data, out, "train.max_steps=2", *extra)


_weights = newest_weights


def _tb_tags(folder: Path) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(folder.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {folder}"
    scalars, images = set(), set()
    for e in events:
        acc = EventAccumulator(str(e), size_guidance={"images": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


def test_samples_at_checkpoints_reach_disk_and_tensorboard_without_changing_training(
    tiny_models, pairs_parquet, tmp_path
):
    prompts = ["a red circle", "a blue square"]
    plain = tmp_path / "plain"
    train(_cfg(tiny_models["sd"], pairs_parquet, plain))
    sampled = tmp_path / "sampled"
    train(
        _cfg(
            tiny_models["sd"],
            pairs_parquet,
            sampled,
            f"train.sample_prompts=[{', '.join(prompts)}]",
            "train.sample_steps=2",
        )
    )
    # one grid per checkpoint: 2 images side by side (32 px, padded and upscaled x2)
    grids = sorted(p.name for p in (sampled / "samples").glob("*.png"))
    assert grids == ["step-1.png", "step-2.png"]
    g1 = np.asarray(Image.open(sampled / "samples" / "step-1.png"))
    g2 = np.asarray(Image.open(sampled / "samples" / "step-2.png"))
    assert g1.shape == (2 * (32 + 4), 2 * (2 * 32 + 6), 3)
    assert not np.array_equal(g1, g2)  # the weights moved between the checkpoints
    scalars, images = _tb_tags(sampled / "tb")
    assert "loss" in scalars and "samples" in images
    # sampling runs on a forked RNG in eval mode: the trained weights are bit-identical
    a, b = _weights(plain), _weights(sampled)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (plain / "samples").exists()


def test_report_to_none_writes_only_metrics_jsonl(tiny_models, pairs_parquet, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_models["sd"], pairs_parquet, out, "train.report_to=none"))
    assert (out / "metrics.jsonl").read_text().count("\n") == 2
    assert not (out / "tb").exists() and not list(out.rglob("events.out.tfevents.*"))


def test_report_to_is_a_checked_choice(tiny_models, pairs_parquet, tmp_path):
    with pytest.raises(ConfigError, match="train.report_to"):
        _cfg(tiny_models["sd"], pairs_parquet, tmp_path, "train.report_to=mlflow")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="pip install wandb"):
            validate(_cfg(tiny_models["sd"], pairs_parquet, tmp_path, "train.report_to=wandb"))


def test_reference_none_is_refused_before_loading_when_the_objective_needs_one(
    tiny_models, pairs_parquet, tmp_path
):
    cfg = _cfg(tiny_models["sd"], pairs_parquet, tmp_path, "train.reference=none")
    with pytest.raises(ConfigError, match="needs a reference model"):
        validate(cfg)
    # reference-free objectives, and a precomputed reference, are fine without one
    validate(_cfg(tiny_models["sd"], pairs_parquet, tmp_path, "train.reference=none", "objective.name=sft"))
    validate(
        _cfg(
            tiny_models["sd"],
            pairs_parquet,
            tmp_path,
            "train.reference=none",
            "train.precompute_reference=true",
        )
    )


def test_the_command_exits_without_the_final_collection_and_with_everything_written(
    tiny_models, pairs_parquet, tmp_path
):
    """``diffalign train`` (``cli.entry``) freezes the gc before exiting (the shutdown collection is
    1-2 s with torch, diffusers and transformers loaded); whatever the run writes is complete."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model:\n  path: {tiny_models['sd']}\ndata:\n  path: {pairs_parquet}\n  resolution: 32\n"
        f"objective:\n  beta: 100\ntrain:\n  output_dir: {out}\n  max_steps: 2\n  checkpoint_every: 1\n"
        "  sample_prompts: [a red circle]\n  sample_steps: 2\n  report_to: tensorboard\n"
    )
    # what the installed command runs, with an exit hook reporting the gc state at shutdown
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0, flush=True))\n"
        f"sys.argv = ['diffalign', 'train', {str(cfg)!r}]\n"
        "from diffalign.cli import entry\n"
        "entry()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "frozen at exit: True" in done.stdout
    assert (out / "metrics.jsonl").read_text().count("\n") == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert (out / "samples" / "step-2.png").is_file()
    steps = [s for s, _ in tb_scalars(out / "tb").get("loss", [])]
    assert steps == [1, 2], steps  # every step's scalars flushed to disk before the exit
