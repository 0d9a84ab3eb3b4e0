"""Online objectives: SPO (step-wise pairs, clipped-ratio loss on DDIM transition log-probs) and
online DPO (self-generated best vs worst from flow SDE or DDIM groups, refreshed reference); hand-derived
losses, parity with the official lines, transition log-probs against torch.distributions, end to
end on tiny pipelines, exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffalign.config import ConfigError, load_config
from diffalign.objectives import SPO, spo_loss
from diffalign.train import train


def test_spo_loss_hand_derived_and_clip_zeroes_gradient():
    lw = torch.tensor([0.05], requires_grad=True)
    ll = torch.tensor([-0.2], requires_grad=True)
    loss, r_w, r_l = spo_loss(lw, ll, torch.zeros(1), torch.zeros(1), beta=10.0, clip_eps=0.1)
    # r_w = e^0.05 (inside [0.9, 1.1]); r_l = e^-0.2 = 0.8187 clamped to 0.9
    assert r_w.item() == pytest.approx(math.exp(0.05)) and r_l.item() == pytest.approx(0.9)
    z = 10 * (0.05 - math.log(0.9))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-5)
    loss.sum().backward()
    assert lw.grad.abs().item() > 0 and ll.grad.item() == 0.0  # outside the trust region: no gradient


def test_spo_parity_with_official_line():
    """train_spo.py:584-586 restated."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(8, 2, generator=g) * 0.1
    r = torch.randn(8, 2, generator=g) * 0.1
    beta, eps = 10.0, 0.1
    ratio_0 = torch.clamp(torch.exp(p[:, 0] - r[:, 0]), 1 - eps, 1 + eps)
    ratio_1 = torch.clamp(torch.exp(p[:, 1] - r[:, 1]), 1 - eps, 1 + eps)
    official = -torch.log(torch.sigmoid(beta * (torch.log(ratio_0)) - beta * (torch.log(ratio_1))))
    torch.testing.assert_close(SPO(spm="x")(p, r, {}).loss, official, atol=1e-6, rtol=1e-6)


def test_ddim_transition_log_prob_matches_normal_and_the_sampler():
    from diffusers import DDIMScheduler

    from diffalign.samplers.ddim import NoiseSchedule, ddim_step, ddim_transition_log_prob

    sched = NoiseSchedule.from_scheduler(
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    )
    g = torch.Generator().manual_seed(1)
    x_t, pred, z = (torch.randn(3, 4, 6, 6, generator=g) for _ in range(3))
    x_prev, lp, mean = ddim_step(pred, x_t, 501, 451, sched, 1.0, z)
    got = ddim_transition_log_prob(pred, x_t, x_prev, 501, 451, sched, 1.0)
    torch.testing.assert_close(got, lp)
    a, ap = sched.abar(501), sched.abar(451)
    sigma = ((1 - ap) / (1 - a) * (1 - a / ap)) ** 0.5
    want = torch.distributions.Normal(mean, sigma).log_prob(x_prev).flatten(1).mean(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    f.write_text("a red circle\na blue square\ntwo green triangles\na yellow circle above a red square\n")
    return f


def spo_cfg(model, prompts, clip, out, *extra):
    return load_config(
        None,
        [
            f"model.path={model}",
            f"data.path={prompts}",
            f"train.output_dir={out}",
            "data.resolution=32",
            "objective.name=spo",
            f"objective.spm={clip}",
            "objective.sample_steps=4",
            "objective.divert_start_step=1",
            "objective.threshold=0.0",
            "objective.guidance_scale=2",
            "train.batch_size=2",
            "train.lr=1e-2",
            "train.checkpoint_every=1",
            *extra,
        ],
    )


def test_spo_end_to_end_and_exact_resume(tiny_models, tiny_clip, prompts_file, tmp_path):
    from test_train import trainable

    full = train(spo_cfg(tiny_models["sd"], prompts_file, tiny_clip, tmp_path / "full", "train.max_steps=3"))
    assert full["pairs"] > 0 and math.isfinite(full["loss"]) and {"ratio_win", "ratio_lose"} <= set(full)
    train(
        spo_cfg(
            tiny_models["sd"],
            prompts_file,
            tiny_clip,
            tmp_path / "cut",
            "train.max_steps=3",
            "train.halt_after_step=1",
        )
    )
    again = train(
        spo_cfg(tiny_models["sd"], prompts_file, tiny_clip, tmp_path / "cut", "train.max_steps=3"),
        resume="latest",
    )
    assert again["loss"] == pytest.approx(full["loss"], rel=1e-5)
    a, b = trainable(tmp_path / "full"), trainable(tmp_path / "cut")
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0)


def odpo_cfg(model, prompts, clip, out, *extra):
    return load_config(
        None,
        [
            f"model.path={model}",
            f"data.path={prompts}",
            f"train.output_dir={out}",
            "data.resolution=32",
            "objective.name=online_dpo",
            f"objective.rewards=pickscore={clip},clip_score={clip}",
            "objective.sample_steps=3",
            "objective.group_size=3",
            "train.batch_size=2",
            "train.lr=1e-2",
            "train.checkpoint_every=1",
            *extra,
        ],
    )


def test_online_dpo_flow_reference_refresh_and_resume(tiny_models, tiny_clip, prompts_file, tmp_path):
    from safetensors.torch import load_file
    from test_train import final_ckpt, trainable

    out = tmp_path / "odpo"
    m = train(
        odpo_cfg(
            tiny_models["sd3"],
            prompts_file,
            tiny_clip,
            out,
            "train.max_steps=3",
            "objective.ref_refresh_every=2",
        )
    )
    assert math.isfinite(m["loss"]) and "phi_spread" in m
    ref, live = load_file(final_ckpt(out) / "reference.safetensors"), trainable(out)
    # refreshed at step 2, then one more update: the reference is neither the start (zero LoRA B)
    # nor the live weights
    assert any(not torch.equal(ref[n], live[n]) for n in live) and any(
        v.abs().sum() > 0 for n, v in ref.items() if "lora_B" in n
    )
    train(
        odpo_cfg(
            tiny_models["sd3"],
            prompts_file,
            tiny_clip,
            tmp_path / "cut",
            "train.max_steps=3",
            "objective.ref_refresh_every=2",
            "train.halt_after_step=2",
        )
    )
    train(
        odpo_cfg(
            tiny_models["sd3"],
            prompts_file,
            tiny_clip,
            tmp_path / "cut",
            "train.max_steps=3",
            "objective.ref_refresh_every=2",
        ),
        resume="latest",
    )
    b = trainable(tmp_path / "cut")
    for n in live:
        torch.testing.assert_close(live[n], b[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["sd", "sd-v", "sdxl"])
def test_online_dpo_on_ddpm_family_models_samples_with_ddim_and_moves_the_lora(
    family, tiny_models, tiny_clip, prompts_file, tmp_path
):
    """DDPM-family models (epsilon, v, SDXL micro-conditioning) draw each group with DDIM
    (eta 1 = ancestral)."""
    from test_train import trainable

    m = train(odpo_cfg(tiny_models[family], prompts_file, tiny_clip, tmp_path / "eps", "train.max_steps=2"))
    assert math.isfinite(m["loss"]) and m["phi_spread"] > 0
    moved = [n for n, v in trainable(tmp_path / "eps").items() if "lora_B" in n and v.abs().sum() > 0]
    assert moved  # LoRA B starts at zero; two steps moved it


def test_online_dpo_group_sampler_is_ddim_for_epsilon_models(tiny_models, monkeypatch):
    """The group sampler calls ddim_sample with the objective's eta on the DDIM timesteps of sample_steps."""
    import diffalign.samplers.ddim as ddim_mod
    from diffalign.config import ModelConfig
    from diffalign.models.loading import load_adapter
    from diffalign.objectives import OnlineDPO
    from diffalign.train.rollout import group_pairs

    seen = {}
    real = ddim_mod.ddim_sample

    def spy(fn, x_T, timesteps, cond, sched, guidance_scale, eta, gen):
        seen.update(
            steps=len(timesteps),
            eta=eta,
            guidance=guidance_scale,
            n=x_T.shape[0],
            pred=sched.prediction_type,
            uncond_first=torch.equal(cond[0]["prompt_embeds"][0], uncond["prompt_embeds"][0]),
        )
        return real(fn, x_T, timesteps, cond, sched, guidance_scale, eta, gen)

    monkeypatch.setattr(ddim_mod, "ddim_sample", spy)
    adapter = load_adapter(ModelConfig(path=str(tiny_models["sd"])))
    obj = OnlineDPO(rewards="x", group_size=3, sample_steps=4, guidance_scale=2.0, eta=0.5)
    cond = {k: v for k, v in adapter.encode_prompts(["a red circle", "a blue square"]).items()}
    uncond = {k: v for k, v in adapter.encode_prompts(["", ""]).items()}
    micro = adapter.default_micro(2, 32, 32)
    cond, uncond = {**cond, "__micro__": micro}, {**uncond, "__micro__": micro}

    # reward = mean brightness: best and worst are the brightest and darkest image of each group
    class Bright:
        def __call__(self, imgs, texts):
            return type("R", (), {"scores": imgs.mean((1, 2, 3))})()

    shape = (
        adapter.denoiser.config.in_channels,
        32 // adapter.pipe.vae_scale_factor,
        32 // adapter.pipe.vae_scale_factor,
    )
    pairs, phi, _ = group_pairs(
        obj,
        adapter,
        adapter.denoiser,
        {"b": Bright()},
        ["a red circle", "a blue square"],
        cond,
        uncond,
        shape,
        torch.Generator().manual_seed(0),
    )
    assert seen == {"steps": 4, "eta": 0.5, "guidance": 2.0, "n": 6, "pred": "epsilon", "uncond_first": True}
    assert pairs.shape == (2, 2, *shape) and phi.shape == (2, 3)
    bright = adapter.decode_latents(pairs.flatten(0, 1)).mean((1, 2, 3)).view(2, 2)
    assert (bright[:, 0] > bright[:, 1]).all()


def test_online_objectives_refuse_video_and_audio_models_before_loading(tiny_clip, prompts_file, tmp_path):
    import json

    for cls in ("AnimateDiffPipeline", "TextToVideoSDPipeline", "AudioLDMPipeline"):
        fake = tmp_path / cls  # only model_index.json: the refusal must come before any weights load
        fake.mkdir()
        (fake / "model_index.json").write_text(json.dumps({"_class_name": cls}))
        for cfg in (
            odpo_cfg(fake, prompts_file, tiny_clip, tmp_path / "o", "train.max_steps=1"),
            spo_cfg(fake, prompts_file, tiny_clip, tmp_path / "s", "train.max_steps=1"),
        ):
            with pytest.raises(ConfigError, match="trains image models"):
                train(cfg)


def test_guided_at_scale_one_runs_only_the_conditional_half_of_a_pair():
    from diffalign.samplers.base import guided

    calls = []

    def fn(x, t, c):
        calls.append(c)
        return x * c

    x, t = torch.ones(2, 3), torch.tensor(5)
    out = guided(fn, x, t, (torch.tensor(7.0), torch.tensor(3.0)), 1.0)
    assert torch.equal(out, torch.full((2, 3), 3.0)) and len(calls) == 1
    assert torch.equal(
        guided(fn, x, t, torch.tensor(2.0), 1.0), torch.full((2, 3), 2.0)
    )  # a plain cond still works


def test_online_objectives_refuse_wrong_families(tiny_models, tiny_clip, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="needs an epsilon-prediction model"):
        train(spo_cfg(tiny_models["sd3"], prompts_file, tiny_clip, tmp_path / "a", "train.max_steps=1"))
    # full fine-tuning runs online too (one loop): the reference is a frozen copy
    train(
        spo_cfg(
            tiny_models["sd"], prompts_file, tiny_clip, tmp_path / "c", "train.max_steps=1", "lora.rank=0"
        )
    )
    state = json.loads((tmp_path / "c/checkpoints/step-000001/state.json").read_text())
    assert state["reference_mode"] == "copy" and state["lora"] is False


def test_train_spm_learns_time_modules_and_reloads(tiny_models, tiny_clip, tmp_path):
    from diffalign.rewards import StepAwarePM
    from diffalign.spm import SPMConfig, train_spm

    from conftest import make_pairs_parquet

    data = make_pairs_parquet(tmp_path / "p.parquet", n=12)
    rep = train_spm(
        SPMConfig(
            data=str(data),
            model=str(tiny_models["sd"]),
            clip=str(tiny_clip),
            out=str(tmp_path / "spm"),
            steps=3,
            batch_size=4,
            lr=1e-2,
            heldout=4,
            guidance_scale=2.0,
        )
    )
    assert set(rep["heldout_acc_after"]) <= {"t<250", "250-500", "500-750", ">=750"}
    spm = StepAwarePM(str(tmp_path / "spm"))
    moved = [
        n
        for n, p in spm.time.state_dict().items()
        if "layers" in n and n.endswith("weight") and p.abs().sum() > 0
    ]
    assert moved  # adaLN weights start at zero; training moved them
    imgs = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(
        spm(imgs, ["a red circle"] * 2, t=0).scores, spm(imgs, ["a red circle"] * 2, t=900).scores
    )


def test_spo_step_without_kept_pairs_still_runs_a_zero_weight_backward(
    tiny_models, tiny_clip, prompts_file, tmp_path, monkeypatch
):
    """No pair passes the threshold: the step still does forward+backward (DDP all-reduce stays in
    step on every rank) with weight 0, and logs pairs = 0."""
    calls = []
    import diffalign.train.spo_rollout as online

    real = online.spo_logps
    monkeypatch.setattr(online, "spo_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = train(
        spo_cfg(
            tiny_models["sd"],
            prompts_file,
            tiny_clip,
            tmp_path / "r",
            "train.max_steps=1",
            "objective.threshold=1.0",
        )
    )
    assert (
        m["pairs"] == 0 and m["loss"] == 0 and len(calls) == 2
    )  # reference + policy forward on the fallback pair
