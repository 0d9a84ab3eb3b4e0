"""The online methods and the evaluation harness on the new image families (issue #22): Flow-GRPO,
DiffusionNFT and online DPO sample FLUX.1 / Qwen-Image / SD3.5 groups on each family's own sigma grid
(FLUX and Qwen-Image shift it with the resolution), DCPO trains on a flow family, and `diffalign eval`
generates and judges with a FLUX pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffalign.config import load_config
from diffalign.train import train

FAMILIES = ("sd35", "flux", "qwenimage")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from diffalign._quiet import quiet_libraries
    from diffalign.models.tiny import build_tiny_pipeline

    quiet_libraries()
    root = tmp_path_factory.mktemp("tiny-online")
    for name in FAMILIES:
        build_tiny_pipeline(name, root / name)
    return {name: root / name for name in FAMILIES}


CASES = [(f, o) for f in FAMILIES for o in ("flow_grpo", "diffusion_nft", "online_dpo")]


@pytest.mark.parametrize("family,objective", CASES, ids=["-".join(c) for c in CASES])
def test_online_methods_on_new_image_families(models, tiny_clip, tmp_path, family, objective):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    extra = {"diffusion_nft": ["objective.guidance_scale=1"], "online_dpo": [], "flow_grpo": []}[objective]
    cfg = load_config(
        None,
        [
            f"model.path={models[family]}",
            f"data.path={prompts}",
            f"train.output_dir={tmp_path / 'run'}",
            "data.resolution=32",
            f"objective.name={objective}",
            f"objective.rewards=clip_score={tiny_clip}",
            "objective.sample_steps=3",
            "objective.group_size=2",
            "train.batch_size=2",
            "train.max_steps=1",
            "train.report_to=none",
            *extra,
        ],
    )
    metrics = train(cfg)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    if objective == "flow_grpo":
        assert metrics["ratio"] == 1.0  # the rollout and the training forward agree on this family too


def test_dcpo_trains_on_a_flow_family(models, tmp_path):
    from test_families_train import make_data

    pairs = make_data(tmp_path / "pairs.parquet", False, ranked=False)
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(pairs)
    caps = t.column("caption").to_pylist()
    t = t.append_column("caption_0", pa.array(caps)).append_column(
        "caption_1", pa.array([c + " and a square" for c in caps])
    )
    pq.write_table(t, pairs)
    cfg = load_config(
        None,
        [
            f"model.path={models['flux']}",
            f"data.path={pairs}",
            f"train.output_dir={tmp_path / 'run'}",
            "data.resolution=32",
            "objective.name=dcpo",
            "objective.beta=100",
            "train.max_steps=1",
            "train.batch_size=2",
            "train.report_to=none",
        ],
    )
    metrics = train(cfg)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


def test_eval_harness_generates_and_judges_with_flux(models, tmp_path):
    from diffalign.cli import main

    out = tmp_path / "eval"
    args = ["eval", "--model", str(models["flux"]), "--toy", "train", "--n-prompts", "2", "--steps", "2"]
    assert main([*args, "--per-prompt", "1", "--no-report", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    geneval = summary["models"]["model"]["geneval"]
    assert (
        0.0 <= geneval["overall"] <= 1.0 and geneval["n_prompts"] == 2 and summary["sampling"]["steps"] == 2
    )


def test_max_sequence_length_defaults_to_each_familys_pipeline(models, monkeypatch):
    """Unset ``model.max_sequence_length`` keeps the family pipeline's own default (FLUX 512, SD3 256),
    so prompts are encoded in training as the pipeline encodes them when sampling; a value given in
    the config (or the folder's ``diffalign.json``) wins."""
    import diffalign.models.loading as loading
    from diffalign.config import ModelConfig

    monkeypatch.setattr(loading, "pipeline_call_defaults", lambda path: {})  # no diffalign.json
    assert loading.load_adapter(ModelConfig(path=str(models["flux"]))).max_sequence_length == 512
    assert loading.load_adapter(ModelConfig(path=str(models["sd35"]))).max_sequence_length == 256
    cfg = ModelConfig(path=str(models["flux"]), max_sequence_length=77)
    assert loading.load_adapter(cfg).max_sequence_length == 77
