from __future__ import annotations

from pathlib import Path

import pytest

from diffalign.config import Config, ConfigError, load_config, to_dict, validate

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "model:\n  path: org/model\nobjective:\n  name: diffusion_dpo\n  beta: 2500\ntrain:\n  lr: 1e-5\n"
    )
    cfg = load_config(
        f, ["train.batch_size=4", "objective.loss_type=hinge", "train.lr=2e-6", "data.random_flip=true"]
    )
    assert isinstance(cfg, Config)
    assert cfg.train.batch_size == 4 and cfg.train.lr == 2e-6 and cfg.data.random_flip is True
    assert cfg.objective.params == {"beta": 2500, "loss_type": "hinge"}
    assert to_dict(cfg)["objective"] == {"name": "diffusion_dpo", "beta": 2500, "loss_type": "hinge"}


def test_yaml_scientific_notation_is_a_number(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-5\n")
    assert load_config(f).train.lr == 1e-5


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.lrr=1", r"unknown config key 'train.lrr'. Did you mean 'lr'"),
        ("trian.lr=1", r"unknown config key 'trian'. Did you mean 'train'"),
        (
            "train.mixed_precision=fp8",
            r"train.mixed_precision: 'fp8' is not a valid choice; valid choices: no, fp16, bf16",
        ),
        ("train.batch_size=two", r"train.batch_size: expected an integer"),
        ("model.family=fluxx", r"model.family: 'fluxx' is not a valid choice"),
        ("train.lr", r"must look like key=value"),
    ],
)
def test_bad_keys_fail_with_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_validate_semantics(pairs_parquet):
    base = [f"data.path={pairs_parquet}", "model.path=org/model"]
    validate(load_config(None, base))
    with pytest.raises(ConfigError, match="unknown objective 'dpo'"):
        validate(load_config(None, [*base, "objective.name=dpo"]))
    with pytest.raises(ConfigError, match="model.path is empty"):
        validate(load_config(None, [f"data.path={pairs_parquet}"]))
    with pytest.raises(ConfigError, match="'lora_off' needs LoRA"):
        validate(load_config(None, [*base, "lora.rank=0", "train.reference=lora_off"]))
    with pytest.raises(ConfigError, match="data.path '/nonexistent/x.parquet' does not exist"):
        validate(load_config(None, ["model.path=org/model", "data.path=/nonexistent/x.parquet"]))
    with pytest.raises(ConfigError, match="multiple of 8"):
        validate(load_config(None, [*base, "data.resolution=36"]))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    text = path.read_text()
    assert text.startswith("#") and "diffalign train" in text.split("\n\n")[0], (
        "configs start with a how-to-run header"
    )
    cfg = load_config(path)
    validate(cfg, check_data=False)  # hub datasets are not reachable in tests


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"sd15_dpo_lora.yaml", "sdxl_dpo_lora.yaml", "sd3_dpo_lora.yaml"} <= names


# objectives defined only for one kind of model: InPO/SmPO invert with DDIM and SPO and GRPO sample
# with DDIM (epsilon / v models); Flow-GRPO and DiffusionNFT are flow-matching methods; online_dpo
# runs on both (flow SDE or DDIM groups)
ONLY_SDXL, ONLY_SD3 = {"inpo", "smpo", "spo", "grpo"}, {"flow_grpo", "diffusion_nft"}


def test_every_objective_has_sdxl_and_sd3_configs():
    from diffalign.objectives import OBJECTIVES

    used: dict[str, set[str]] = {"sdxl": set(), "sd3": set()}
    for p in CONFIGS:
        fam = p.name.split("_")[0]
        if fam in used:
            used[fam].add(load_config(p).objective.name)
    for name in OBJECTIVES.names():
        if name not in ONLY_SD3:
            assert name in used["sdxl"], f"no configs/sdxl_*.yaml for objective {name!r}"
        if name not in ONLY_SDXL:
            assert name in used["sd3"], f"no configs/sd3_*.yaml for objective {name!r}"
