"""InPO and SmPO: the per-sample inversion against diffusers' DDIMInverseScheduler (the official
code's stepper; epsilon and v-prediction), hand-derived smoothed weights and losses, parity with the
official loss lines, inversion-then-reconstruction on a tiny v-prediction model, and training end to
end on tiny epsilon and v-prediction SD pipelines at batch size > 1."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from diffalign.objectives import InPO, SmPO, smoothed_weight, smpo_loss
from diffalign.samplers.ddim import NoiseSchedule
from diffalign.samplers.inversion import ddim_invert, inversion_grid, invert_per_sample

SCHED_KW = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
)


def toy_model(x, t, c):
    """A smooth, t- and condition-dependent stand-in for the UNet (eps prediction)."""
    tt = t.float().view(-1, *[1] * (x.ndim - 1)) / 1000
    return torch.tanh(0.7 * x + tt * c.view(-1, *[1] * (x.ndim - 1)) - 0.3 * x.roll(1, -1))


def schedules():
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    inv = DDIMInverseScheduler(**SCHED_KW)
    inv.set_timesteps(10)
    return inv, DDIMScheduler(**SCHED_KW), NoiseSchedule.from_scheduler(DDIMScheduler(**SCHED_KW))


def official_inversion(x0, t0, c, steps, renoise, eta, noises=None):
    """InPO train.py:990-1014 / SmPO train.py:1000-1024 restated with diffusers' own steppers,
    one sample at a time (batch size 1, as the official scripts run)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    inv, ddim = DDIMInverseScheduler(**SCHED_KW), DDIMScheduler(**SCHED_KW)
    inv.set_timesteps(steps)
    x = x0.clone()
    for i, t in enumerate(inv.timesteps[inv.timesteps < t0]):
        eps = toy_model(x, t.repeat(1), c)
        if renoise:
            x1 = inv.step(eps, t, x).prev_sample
            eps = (eps + toy_model(x1, t.repeat(1), c)) / 2
        x = inv.step(eps, t, x).prev_sample
        if eta:
            prev_t = min(int(t) + 1000 // steps, 999)
            x = x + eta * noises[i] * ddim._get_variance(torch.tensor(prev_t), t) ** 0.5
    a = ddim.alphas_cumprod[t0]
    return x, (x - a**0.5 * x0) / (1 - a) ** 0.5


def test_grid_matches_ddim_inverse_scheduler():
    inv, _, _ = schedules()
    assert (
        inversion_grid(1000, 10, 1)
        == inv.timesteps.tolist()
        == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    )


@pytest.mark.parametrize("renoise", [0, 1])
def test_per_sample_inversion_matches_official_loop_at_any_batch_size(renoise):
    _, _, sched = schedules()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([350, 999, 40])
    c = torch.tensor([0.5, -1.0, 2.0])
    steps = 5 if renoise else 10
    x, eps = invert_per_sample(
        toy_model, x0, t, inversion_grid(1000, steps, 1), c, sched, renoise_steps=renoise
    )
    for i in range(3):  # each sample equals the official batch-size-1 computation at its own t
        xr, er = official_inversion(x0[i : i + 1], int(t[i]), c[i : i + 1], steps, renoise, 0.0)
        torch.testing.assert_close(x[i : i + 1], xr.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eps[i : i + 1], er.float(), atol=1e-4, rtol=1e-4)
    # and with a shared t it is the plain DDIM inversion over the grid points below t
    xs, _ = invert_per_sample(toy_model, x0, torch.full((3,), 350), inversion_grid(1000, 10, 1), c, sched)
    ref = ddim_invert(toy_model, x0, [1, 101, 201, 301], c, sched)
    torch.testing.assert_close(xs, ref.latent, atol=1e-6, rtol=1e-6)


def test_inversion_eta_noise_matches_official_variance():
    _, _, sched = schedules()
    x0 = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    t0, c = 960, torch.tensor([0.3])  # t > 901: the official index t + 100 would overrun; clamped
    gen = [torch.Generator().manual_seed(7)]
    x, _ = invert_per_sample(
        toy_model, x0, torch.tensor([t0]), inversion_grid(1000, 10, 1), c, sched, eta=0.1, generators=gen
    )
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(4, 5, 5, generator=g)[None] for _ in range(10)]
    xr, _ = official_inversion(x0, t0, c, 10, 0, 0.1, noises)
    torch.testing.assert_close(x, xr.float(), atol=1e-5, rtol=1e-5)


def test_smoothed_weight_hand_derived():
    # s_w - s_l = 0.05 over the official range 0.16658045 -> p = sigmoid(0.300155) = 0.574481
    w = smoothed_weight(torch.tensor([0.25, 0.20, 0.2]), torch.tensor([0.20, 0.25, 0.2]))
    torch.testing.assert_close(w, torch.tensor([1.48962, -1.48962, 0.0]), atol=2e-5, rtol=0)
    # errors giving a DPO logit of exactly 2.0 at beta 2000: inside = 1.48962 * 2 = 2.97924
    loss, inside = smpo_loss(
        torch.tensor([0.100]),
        torch.tensor([0.102]),
        torch.tensor([0.101]),
        torch.tensor([0.101]),
        torch.tensor([0.25]),
        torch.tensor([0.20]),
        beta=2000.0,
    )
    torch.testing.assert_close(inside, torch.tensor([2.97924]), atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-2.97924))]), atol=1e-5, rtol=0)


def official_smpo(model_losses, ref_losses, score_w, score_l, beta):
    """SmPO train.py:738-747 and :1061, one pair (the PickScore winner first)."""
    max_val, min_val = 0.28201571106910706, 0.11543526500463486
    n0, n1 = (
        (torch.tensor(score_w) - min_val) / (max_val - min_val),
        (torch.tensor(score_l) - min_val) / (max_val - min_val),
    )
    probs = torch.exp(n0) / (torch.exp(n0) + torch.exp(n1))
    model_diff = model_losses[0] - model_losses[1]
    ref_diff = ref_losses[0] - ref_losses[1]
    inside = -0.5 * beta * (2 * probs - 1) * 10 * (model_diff - ref_diff)
    return -F.logsigmoid(inside)


def test_smpo_parity_with_official_and_order_invariance():
    g = torch.Generator().manual_seed(3)
    pol = torch.rand(6, 2, generator=g) * 0.2 + 0.05
    ref = pol + torch.randn(6, 2, generator=g) * 1e-3
    scores = torch.rand(6, 2, generator=g) * 0.15 + 0.12
    out = SmPO(beta=2000.0)(pol, ref, {"scores": scores})
    for i in range(6):
        # the official loader puts the higher-scored image first; ours keeps the data order
        j = [0, 1] if scores[i, 0] >= scores[i, 1] else [1, 0]
        want = official_smpo(pol[i, j], ref[i, j], float(scores[i, j[0]]), float(scores[i, j[1]]), 2000.0)
        torch.testing.assert_close(out.loss[i], want.float(), atol=1e-6, rtol=1e-5)


def test_inpo_loss_is_the_official_line_hand_derived():
    """InPO train.py (the Salesforce loss, ``ddiminpo``), restated:
    ``-logsigmoid(-0.5 * beta * ((e_w - e_l) - (ref_w - ref_l)))``. beta 100:
    row 0: model_diff = 0.100 - 0.120 = -0.020, ref_diff = 0.105 - 0.110 = -0.005
           inside = -50 * (-0.015) = 0.75  -> loss = log(1 + e^-0.75) = 0.3868710
    row 1: model_diff = +0.020 -> inside = -50 * 0.025 = -1.25 -> loss = log(1 + 3.4903430) = 1.5019291"""
    pol = torch.tensor([[0.100, 0.120], [0.120, 0.100]], dtype=torch.float64)
    ref = torch.tensor([[0.105, 0.110], [0.105, 0.110]], dtype=torch.float64)
    out = InPO(beta=100.0)(pol, ref, {})
    torch.testing.assert_close(
        out.loss, torch.tensor([0.3868710, 1.5019291], dtype=torch.float64), atol=1e-6, rtol=0
    )
    official = -F.logsigmoid(-0.5 * 100.0 * ((pol[:, 0] - pol[:, 1]) - (ref[:, 0] - ref[:, 1])))
    torch.testing.assert_close(out.loss, official)
    torch.testing.assert_close(out.metrics["margin"], torch.tensor([0.75, -1.25], dtype=torch.float64))


def official_v_inversion(x0, t0, c, steps, renoise):
    """The official inversion loop (InPO/SmPO train.py) run on a v-prediction model with diffusers'
    own ``DDIMInverseScheduler(prediction_type="v_prediction")``: ReNoise averages the raw model
    outputs (v) and steps from the current latent; the implied noise is the usual formula."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    inv = DDIMInverseScheduler(**SCHED_KW, prediction_type="v_prediction")
    inv.set_timesteps(steps)
    x = x0.clone()
    for t in inv.timesteps[inv.timesteps < t0]:
        v = toy_model(x, t.repeat(1), c)
        if renoise:
            x1 = inv.step(v, t, x).prev_sample
            v = (v + toy_model(x1, t.repeat(1), c)) / 2
        x = inv.step(v, t, x).prev_sample
    a = DDIMScheduler(**SCHED_KW).alphas_cumprod[t0]
    return x, (x - a**0.5 * x0) / (1 - a) ** 0.5


@pytest.mark.parametrize("renoise,steps", [(0, 10), (1, 5), (0, 1), (1, 1)])
def test_v_prediction_inversion_matches_diffusers_inverse_scheduler(renoise, steps):
    """Also at one inversion step, where the first (only) step starts at ``final_alpha_cumprod``."""
    import dataclasses

    from diffusers import DDIMScheduler

    from diffalign.objectives.inpo import epsilon_model

    sched = NoiseSchedule.from_scheduler(DDIMScheduler(**SCHED_KW, prediction_type="v_prediction"))
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([350, 999, 40])
    c = torch.tensor([0.5, -1.0, 2.0])
    grid = inversion_grid(1000, steps, 1)
    x, eps = invert_per_sample(
        epsilon_model(toy_model, sched, grid),
        x0,
        t,
        grid,
        c,
        dataclasses.replace(sched, prediction_type="epsilon"),
        renoise_steps=renoise,
    )
    for i in range(3):
        xr, er = official_v_inversion(x0[i : i + 1], int(t[i]), c[i : i + 1], steps, renoise)
        torch.testing.assert_close(x[i : i + 1], xr.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eps[i : i + 1], er.float(), atol=1e-4, rtol=1e-4)


def test_v_prediction_tiny_sd_inverts_and_reconstructs(tiny_models):
    """On a tiny v-prediction SD pipeline: the inverted latent and its velocity target are
    consistent (x_inv = sqrt(a_t) x0 + sqrt(1-a_t) eps*, target = sqrt(a_t) eps* - sqrt(1-a_t) x0), and
    deterministic DDIM sampling back down the inversion grid reconstructs x0, with an error that
    shrinks with the grid step as DDIM inversion's should (measured: 0.33 / 0.075 / 0.020 for 10 / 50 /
    200 steps; reading v as epsilon instead leaves an error of ~1.2 at every grid size)."""
    from diffalign.config import ModelConfig
    from diffalign.models.loading import load_adapter
    from diffalign.objectives import inversion_inputs
    from diffalign.samplers.ddim import ddim_step

    adapter = load_adapter(ModelConfig(path=str(tiny_models["sd-v"])))
    assert adapter.prediction_type == "v_prediction"
    model = adapter.denoiser
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(2, 2, 4, 4, 4, generator=g)  # [B=2, k=2, C, h, w]
    xf = x0.flatten(0, 1)  # [4, C, h, w]
    cond = {
        k: v.repeat_interleave(2, 0) for k, v in adapter.encode_prompts(["a red circle", "a cat"]).items()
    }
    micro = adapter.default_micro(4, 32, 32)
    sched = NoiseSchedule.from_scheduler(adapter.noise_scheduler)
    worst = {}
    for steps in (50, 200):
        x_inv, t, target = inversion_inputs(adapter, model, x0, cond, micro, [3, 11], steps)
        a = adapter.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x_inv - a.sqrt() * xf) / (1 - a).sqrt()
        torch.testing.assert_close(target, a.sqrt() * eps - (1 - a).sqrt() * xf, atol=1e-5, rtol=1e-5)
        grid = inversion_grid(1000, steps, int(adapter.noise_scheduler.config.steps_offset))
        errs = []
        with torch.no_grad():
            for i in range(4):
                down = [p for p in grid if p < int(t[i])][::-1]  # the grid points the inversion climbed
                x = x_inv[i : i + 1]
                c = {k: v[i : i + 1] for k, v in cond.items()}
                for hi, lo in zip(down, down[1:] + [-1], strict=True):
                    v = adapter.predict(x, torch.tensor([hi]), c, micro[i : i + 1], model=model)
                    x = ddim_step(v.float(), x, hi, lo, sched)[0]
                errs.append((x - xf[i : i + 1]).abs().max().item())
        worst[steps] = max(errs)
    assert worst[200] < 0.03 and worst[200] < 0.4 * worst[50], worst


def scored_pairs(path, n=8):
    from conftest import make_pairs_parquet

    make_pairs_parquet(path, n=n)
    t = pq.read_table(path)
    t = t.append_column("score_0.pickscore", pa.array([0.2 + 0.01 * i for i in range(n)]))
    t = t.append_column("score_1.pickscore", pa.array([0.25 - 0.01 * i for i in range(n)]))
    pq.write_table(t, path)
    return path


@pytest.mark.parametrize("name, fam", [("inpo", "sd"), ("smpo", "sd"), ("inpo", "sd-v"), ("smpo", "sd-v")])
def test_train_inversion_objectives_end_to_end(tiny_models, tmp_path, name, fam, monkeypatch):
    """Both objectives train at batch size 2 on epsilon and on v-prediction models."""
    from test_train import run, trainable

    import diffalign.samplers.inversion as inv

    calls = []
    real = inv.invert_per_sample
    monkeypatch.setattr(
        inv, "invert_per_sample", lambda *a, **k: calls.append(k.get("renoise_steps")) or real(*a, **k)
    )
    data = scored_pairs(tmp_path / "scored.parquet")
    extra = ["data.score_column=pickscore"] if name == "smpo" else []
    metrics = run(
        tiny_models[fam],
        data,
        tmp_path / "run",
        f"objective.name={name}",
        "train.max_steps=2",
        "train.batch_size=2",
        "objective.inversion_steps=3",
        *extra,
    )
    assert all(math.isfinite(v) for v in metrics.values()) and "implicit_acc" in metrics
    assert calls == [1 if name == "smpo" else 0] * 2  # the loop's inputs came from inversion, each step
    w = trainable(tmp_path / "run")
    assert any(v.abs().sum() > 0 for n, v in w.items() if "lora_B" in n)  # LoRA B starts at zero: it trained
    if name == "smpo":
        assert "smooth_weight" in metrics


def test_smpo_without_scores_fails_before_loading(tiny_models, pairs_parquet, tmp_path):
    from test_train import run

    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="needs per-image reward scores: set data.score_column"):
        run(tiny_models["sd"], pairs_parquet, tmp_path / "r", "objective.name=smpo", "train.max_steps=1")
    with pytest.raises(ConfigError, match="score_column='hps' needs columns hps_0/hps_1"):
        run(
            tiny_models["sd"],
            pairs_parquet,
            tmp_path / "r",
            "objective.name=smpo",
            "train.max_steps=1",
            "data.score_column=hps",
        )


def test_inversion_objectives_refuse_flow_models(tiny_models, tmp_path):
    from test_train import run

    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="need an epsilon- or v-prediction model"):
        run(
            tiny_models["sd3"],
            scored_pairs(tmp_path / "s.parquet"),
            tmp_path / "r",
            "objective.name=inpo",
            "train.max_steps=1",
        )
