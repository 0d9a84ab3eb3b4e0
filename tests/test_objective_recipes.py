"""Shipped recipes carry the official hyperparameters (values restated from the reference code)."""

from __future__ import annotations

from pathlib import Path

from diffalign.config import load_config, validate
from diffalign.objectives import build_objective

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_sdxl_smpo_inverts_on_the_official_10_step_grid():
    """JaydenLyh/SmPO@8922d54 train.py:872: under --sdxl, ``inverse_scheduler.set_timesteps(10)``
    (SD1.5: 5, train.py:881); beta 5000, 200 steps (examples/sdxl.sh)."""
    cfg = load_config(CONFIGS / "sdxl_smpo_full.yaml", [])
    validate(cfg, check_data=False)
    obj = build_objective(cfg.objective)
    assert (obj.inversion_steps, obj.renoise_steps, obj.beta) == (10, 1, 5000.0)
    assert cfg.train.max_steps == 200


def test_sdxl_spo_runs_the_official_inner_steps():
    """RockeyCoss/SPO@27a8642 configs/spo_sdxl_4k-prompts_num-sam-2_3-is_10ep_bs2_gradacc2.py:
    ``sample.num_inner_step = 3``, ``compare_func_cfg.threshold = 0.4``, ``lora_rank = 64``, lr 1e-5;
    2 samples per step (``num-sam-2``)."""
    cfg = load_config(CONFIGS / "sdxl_spo_lora.yaml", [])
    validate(cfg, check_data=False)
    obj = build_objective(cfg.objective)
    assert (obj.num_inner_step, obj.samples_per_step, obj.threshold) == (3, 2, 0.4)
    assert cfg.lora.rank == 64 and cfg.train.lr == 1e-5
    text = (CONFIGS / "sdxl_spo_lora.yaml").read_text()
    assert "gradient accumulation 2" in text  # the official value is recorded with why it has no key here


def test_sdxl_inpo_keeps_the_official_10_step_eta_inversion():
    """JaydenLyh/InPO@a9cfc4d train.py:866/875 ``set_timesteps(10)``, ``inversion_eta`` 0.1 (:996)."""
    obj = build_objective(load_config(CONFIGS / "sdxl_inpo_full.yaml", []).objective)
    assert (obj.inversion_steps, obj.inversion_eta, obj.beta) == (10, 0.1, 5000.0)
