"""Every offline objective that applies runs on the new flow families (KTO, MaPO, SFT next to the DPO and
RankDPO of ``test_families_train.py``), the inversion objectives are refused in one line, online DPO
samples flow groups on SD3.5, and each shipped config of the new families (``configs/sd35*``,
``flux1dev*``, ``qwenimage*``, ``wan21*``) trains a step on the tiny pipeline of its family with its
own recipe (LoRA targets, gradient checkpointing, optimizer, reference mode) kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_families_train import make_data

from diffalign.config import ConfigError, load_config
from diffalign.train import train

REPO = Path(__file__).resolve().parent.parent
CONFIG_FAMILY = {
    "sd35m_dpo_lora.yaml": "sd35",
    "sd35l_dpo_lora.yaml": "sd35",
    "flux1dev_dpo_lora.yaml": "flux",
    "qwenimage_dpo_lora.yaml": "qwenimage",
    "wan21_dpo_lora.yaml": "wan",
    "wan21_dpo_full.yaml": "wan",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from diffalign._quiet import quiet_libraries
    from diffalign.models.tiny import build_tiny_pipeline

    quiet_libraries()
    root = tmp_path_factory.mktemp("tiny-dit")
    for name in ("sd35", "flux", "wan", "qwenimage"):
        build_tiny_pipeline(name, root / name)
    return {name: root / name for name in ("sd35", "flux", "wan", "qwenimage")}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("pairs")
    return {video: make_data(root / f"{video}.parquet", video, ranked=False) for video in (False, True)}


def overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model}",
        f"data.path={data}",
        f"train.output_dir={out}",
        "data.resolution=32",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.lr=1e-3",
        "train.report_to=none",
        *extra,
    ]


OBJECTIVES = {"kto": ["objective.beta=100"], "mapo": ["objective.beta=100"], "sft": []}
CASES = [(f, o) for f in ("sd35", "flux", "wan", "qwenimage") for o in OBJECTIVES]


@pytest.mark.parametrize("name,objective", CASES, ids=["-".join(c) for c in CASES])
def test_offline_objectives_train_on_new_families(models, pairs, tmp_path, name, objective):
    args = overrides(models[name], pairs[name == "wan"], tmp_path, f"objective.name={objective}")
    metrics = train(load_config(None, [*args, *OBJECTIVES[objective]]))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0


def test_inversion_objectives_are_refused_in_one_line(models, pairs, tmp_path):
    with pytest.raises(ConfigError) as e:
        train(load_config(None, overrides(models["flux"], pairs[False], tmp_path, "objective.name=inpo")))
    assert "\n" not in str(e.value) and "flow_matching" in str(e.value)


def test_online_dpo_samples_flow_groups_on_sd35(models, tmp_path, tiny_clip):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    cfg = load_config(
        None,
        [
            f"model.path={models['sd35']}",
            f"data.path={prompts}",
            f"train.output_dir={tmp_path / 'run'}",
            "data.resolution=32",
            "objective.name=online_dpo",
            f"objective.rewards=pickscore={tiny_clip}",
            "objective.sample_steps=2",
            "objective.group_size=2",
            "train.batch_size=1",
            "train.max_steps=1",
            "train.report_to=none",
        ],
    )
    metrics = train(cfg)
    assert np.isfinite(metrics["loss"])


@pytest.mark.parametrize("config", list(CONFIG_FAMILY))
def test_shipped_family_configs_train_on_tiny_pipelines(models, pairs, tmp_path, config):
    """The config's own recipe (targets, gradient checkpointing, optimizer, reference mode, precomputed
    reference) on the tiny pipeline; only paths, sizes and precision are overridden (CPU)."""
    path = REPO / "configs" / config
    text = path.read_text()
    header = text.split("\n\n")[0]  # expected memory and the launch config to use, before any key
    assert "Memory" in header and "configs/accelerate/" in header
    name = CONFIG_FAMILY[config]
    ovr = overrides(
        models[name],
        pairs[name == "wan"],
        tmp_path,
        "train.mixed_precision='no'",
        "train.grad_accum=1",
        "data.format=auto",
    )
    cfg = load_config(path, [*ovr, "train.checkpoint_every=1"])
    assert cfg.train.gradient_checkpointing
    metrics = train(cfg)
    assert np.isfinite(metrics["loss"])
    ckpt = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    state = json.loads((ckpt / "state.json").read_text())
    want = "none" if cfg.train.precompute_reference else ("lora_off" if cfg.lora.rank else "copy")
    assert state["reference_mode"] == want
    if cfg.lora.rank and "attn2.to_q" in cfg.lora.target_modules:  # SD3.5-M's dual-attention layers train
        from safetensors.torch import load_file

        assert any("attn2.to_q.lora" in n for n in load_file(ckpt / "trainable.safetensors"))
