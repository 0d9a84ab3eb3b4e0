"""SPO's ``num_inner_step`` (RockeyCoss/SPO@27a8642 ``multi_sample_pipeline_sdxl.py``; 3 in the
official SDXL config ``spo_sdxl_4k-prompts_num-sam-2_3-is_10ep_bs2_gradacc2.py``): after a branch
step the candidates each run ``num_inner_step`` more steps on their own, are judged once at the end
of the segment, and every transition of the segment becomes a pair with that label."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.config import ModelConfig
from diffalign.models.loading import load_adapter
from diffalign.objectives import SPO
from diffalign.train.spo_rollout import spo_logps, spo_pairs


class Bright:
    """A stand-in SPM: brightness of the decoded image; records the timesteps it judges at."""

    def __init__(self) -> None:
        self.judged_at: list[int] = []

    def __call__(self, imgs, texts, t):
        self.judged_at.append(t)
        return type("R", (), {"scores": imgs.mean((1, 2, 3))})()


@pytest.fixture(scope="module")
def setup(tiny_models):
    adapter = load_adapter(ModelConfig(path=str(tiny_models["sd"])))
    prompts = ["a red circle", "a blue square"]
    micro = adapter.default_micro(2, 32, 32)
    cond = {**adapter.encode_prompts(prompts), "__micro__": micro}
    uncond = {**adapter.encode_prompts(["", ""]), "__micro__": micro}
    shape = (adapter.denoiser.config.in_channels, 4, 4)
    return adapter, prompts, cond, uncond, shape


def sample(setup, inner: int):
    from diffalign.samplers.ddim import ddim_timesteps

    adapter, prompts, cond, uncond, shape = setup
    obj = SPO(
        spm="x",
        samples_per_step=2,
        sample_steps=6,
        divert_start_step=1,
        threshold=0.0,
        guidance_scale=2.0,
        num_inner_step=inner,
    )
    spm = Bright()
    with torch.no_grad():
        pairs, fallback = spo_pairs(
            obj,
            adapter,
            adapter.denoiser,
            spm,
            prompts,
            cond,
            uncond,
            shape,
            torch.Generator().manual_seed(0),
        )
    ts = ddim_timesteps(adapter.pipe.scheduler.config, 6)
    return obj, pairs, fallback, spm, ts


def test_inner_steps_segment_the_trajectory_and_share_the_label(setup):
    # 6 steps, branch from step index 1: without inner steps every step 1..5 is judged (5 segments);
    # with 2 inner steps the segments are steps [1, 2, 3] and [4, 5] (cut by the end), judged after
    # step 3 (at ts[4]) and on the final sample (t = 0, passed as -1 -> max(-1, 0)).
    obj0, pairs0, _, spm0, ts = sample(setup, 0)
    assert spm0.judged_at == [ts[2], ts[3], ts[4], ts[5], 0]
    assert len(pairs0) == 5 * 2 and not any("x_t_l" in p for p in pairs0)
    obj2, pairs2, fallback, spm2, _ = sample(setup, 2)
    assert spm2.judged_at == [ts[4], 0]
    assert sorted({p["t"] for p in pairs2}) == sorted(ts[1:])  # every transition from the branch on
    assert len(pairs2) == 5 * 2
    inner = [p for p in pairs2 if "x_t_l" in p]
    assert sorted({p["t"] for p in inner}) == sorted([ts[2], ts[3], ts[5]])  # branch steps 1, 4 share x_t
    by = {(p["t"], p["b"]): p for p in pairs2}
    for b in (0, 1):
        # one label per segment: an inner transition continues the previous transition's winner and loser
        for prev_t, t in ((ts[1], ts[2]), (ts[2], ts[3]), (ts[4], ts[5])):
            torch.testing.assert_close(by[(t, b)]["x_t"], by[(prev_t, b)]["w"])
            torch.testing.assert_close(by[(t, b)]["x_t_l"], by[(prev_t, b)]["l"])
        assert not torch.equal(by[(ts[2], b)]["x_t"], by[(ts[2], b)]["x_t_l"])
    assert fallback is not None and fallback["t"] == ts[1]


def test_inner_transition_log_probs_use_the_losers_own_latent(setup):
    adapter, prompts, cond, uncond, shape = setup
    obj, pairs, _, _, ts = sample(setup, 2)
    inner = [p for p in pairs if "x_t_l" in p][:2]
    with torch.no_grad():
        lp = spo_logps(obj, adapter, adapter.denoiser, inner, cond, uncond)  # [P, 2]
        moved = [{**p, "x_t_l": p["x_t_l"] + 0.5} for p in inner]
        lp2 = spo_logps(obj, adapter, adapter.denoiser, moved, cond, uncond)
    assert lp.shape == (2, 2) and torch.isfinite(lp).all()
    torch.testing.assert_close(lp2[:, 0], lp[:, 0])  # the winner's term does not read x_t_l
    assert (lp2[:, 1] - lp[:, 1]).abs().min() > 1e-3  # the loser's does


def test_spo_trains_with_inner_steps(tiny_models, tiny_clip, tmp_path):
    from diffalign.config import load_config
    from diffalign.train import train

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    cfg = load_config(
        None,
        [
            f"model.path={tiny_models['sd']}",
            f"data.path={prompts}",
            f"train.output_dir={tmp_path / 'run'}",
            "data.resolution=32",
            "objective.name=spo",
            f"objective.spm={tiny_clip}",
            "objective.sample_steps=5",
            "objective.divert_start_step=1",
            "objective.threshold=0.0",
            "objective.num_inner_step=3",
            "train.batch_size=2",
            "train.max_steps=1",
            "train.lr=1e-2",
        ],
    )
    m = train(cfg)
    assert m["pairs"] == 4 * 2 and math.isfinite(m["loss"])  # one segment of 4 transitions per prompt


def test_num_inner_step_must_be_non_negative():
    with pytest.raises(ValueError, match="num_inner_step must be >= 0"):
        SPO(num_inner_step=-1)
