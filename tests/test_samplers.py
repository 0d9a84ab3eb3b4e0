"""Samplers against diffusers' own schedulers and pipelines, log-probs against torch.distributions."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

from diffalign.samplers import (
    NoiseSchedule,
    ddim_invert,
    ddim_sample,
    ddim_step,
    flow_sample,
    flow_sde_scheduler,
    flow_sde_step,
    stepwise_resample,
)


def _sched(pred="epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=pred,
    )


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(pred, eta):
    sch = _sched(pred)
    sch.set_timesteps(10)
    ns = NoiseSchedule.from_scheduler(sch)
    g = torch.Generator().manual_seed(0)
    x, out, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    ts = sch.timesteps.tolist()
    for i in (0, 4, 9):
        t, t_prev = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        ref = sch.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        ours, lp, mean = ddim_step(out, x, t, t_prev, ns, eta, z)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        if eta > 0:
            a, ap = ns.abar(t), ns.abar(t_prev)
            sigma = eta * ((1 - ap) / (1 - a) * (1 - a / ap)) ** 0.5
            expect = Normal(mean, sigma).log_prob(ours).flatten(1).mean(1)
            torch.testing.assert_close(lp, expect, atol=1e-5, rtol=1e-5)
        else:
            assert lp is None


def _unet_fn(unet):
    return lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample


@torch.no_grad()
def test_ddim_sample_matches_pipeline(tiny_models):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_models["sd"], safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ref = pipe(
        "a red circle", num_inference_steps=6, guidance_scale=3.0, latents=x_T.clone(), output_type="latent"
    ).images
    cond, uncond = pipe.encode_prompt("a red circle", "cpu", 1, True)
    pipe.scheduler.set_timesteps(6)
    out = ddim_sample(
        _unet_fn(pipe.unet),
        x_T * pipe.scheduler.init_noise_sigma,
        pipe.scheduler.timesteps,
        (uncond, cond),
        NoiseSchedule.from_scheduler(pipe.scheduler),
        guidance_scale=3.0,
        return_trajectory=True,
    )
    torch.testing.assert_close(out.sample, ref, atol=1e-5, rtol=1e-5)
    assert len(out.trajectory) == 7


@torch.no_grad()
def test_flow_euler_matches_sd3_pipeline(tiny_models):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_models["sd3"], text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    ref = pipe(
        "a red circle",
        num_inference_steps=5,
        guidance_scale=3.0,
        latents=x_T.clone(),
        output_type="latent",
        max_sequence_length=8,
    ).images
    pe, npe, pooled, npooled = pipe.encode_prompt(
        "a red circle", "a red circle", "a red circle", device="cpu", max_sequence_length=8
    )
    pipe.scheduler.set_timesteps(5)

    def fn(x, t, c):
        return pipe.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=c["e"], pooled_projections=c["p"]
        ).sample

    out = flow_sample(
        fn, x_T, pipe.scheduler.sigmas, ({"e": npe, "p": npooled}, {"e": pe, "p": pooled}), guidance_scale=3.0
    )
    torch.testing.assert_close(out.sample, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_flow_sde_scheduler_samples_the_rollout_sde_in_a_pipeline(tiny_models):
    """The SD3 pipeline with ``flow_sde_scheduler`` gives the latents of ``flow_sample(eta=a)`` (the
    Flow-GRPO SDE, hand-checked below) from the same start and noise generator; at noise level 0 it
    is the pipeline's Euler ODE; the pipeline's own scheduler is left as it was."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_models["sd3"], text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    euler = pipe.scheduler
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    kw = dict(num_inference_steps=5, guidance_scale=3.0, output_type="latent", max_sequence_length=8)

    def run(noise_level: float) -> torch.Tensor:
        pipe.scheduler = flow_sde_scheduler(euler, noise_level, torch.Generator().manual_seed(5))
        return pipe(["a red circle"] * 2, latents=x_T.clone(), **kw).images

    sde, ode = run(0.7), run(0.0)
    pipe.scheduler = euler
    torch.testing.assert_close(ode, pipe(["a red circle"] * 2, latents=x_T.clone(), **kw).images)
    pe, npe, pooled, npooled = pipe.encode_prompt(
        ["a red circle"] * 2, None, None, device="cpu", max_sequence_length=8
    )
    euler.set_timesteps(5)

    def fn(x, t, c):
        return pipe.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=c["e"], pooled_projections=c["p"]
        ).sample

    cond = ({"e": npe, "p": npooled}, {"e": pe, "p": pooled})
    ref = flow_sample(fn, x_T, euler.sigmas, cond, 3.0, eta=0.7, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sde, ref.sample, atol=1e-5, rtol=1e-5)
    assert (sde - ode).abs().mean() > 0.1  # the noise really went in


def test_flow_sde_log_prob_is_normal():
    g = torch.Generator().manual_seed(0)
    x, v, z = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    x_next, lp, mean = flow_sde_step(v, x, 0.6, 0.5, z, noise_level=0.7)
    std = 0.7 * (0.6 / 0.4) ** 0.5 * 0.1**0.5
    torch.testing.assert_close(x_next, mean + std * z)
    torch.testing.assert_close(lp, Normal(mean, std).log_prob(x_next).flatten(1).mean(1))
    # mean formula, written out: x (1 + std_t^2/(2 s) dt) + v (1 + std_t^2 (1-s)/(2 s)) dt
    st2, dt = 0.7**2 * 0.6 / 0.4, -0.1
    torch.testing.assert_close(mean, x * (1 + st2 / 1.2 * dt) + v * (1 + st2 * 0.4 / 1.2) * dt)


def test_flow_sde_first_step_uses_the_grids_second_sigma():
    """flow_grpo ``sd3_sde_with_logprob.py``:
    ``std = sqrt(sigma / (1 - where(sigma == 1, sigma_max, sigma))) * a`` with ``sigma_max = sigmas[1]``;
    only the denominator changes, the drift keeps sigma = 1."""
    g = torch.Generator().manual_seed(1)
    x, v, z = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    x_next, lp, mean = flow_sde_step(v, x, 1.0, 0.9, z, noise_level=0.7, sigma_max=0.9)
    st2, dt = 0.7**2 * 1.0 / (1 - 0.9), -0.1
    torch.testing.assert_close(mean, x * (1 + st2 / 2 * dt) + v * dt)
    torch.testing.assert_close(x_next, mean + st2**0.5 * 0.1**0.5 * z)
    torch.testing.assert_close(
        flow_sde_step(v, x, 1.0, 0.9, z, noise_level=0.7)[0], x_next
    )  # default: sigma_next
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_step(v, x, 1.0, 0.9, z, sigma_max=1.0)


def test_flow_sde_sampler_keeps_the_marginals():
    """Exact velocity of Gaussian data x0 ~ N(0, s^2): the SDE is marginal-preserving, so every state keeps
    ``var(x_sigma) = (1 - sigma)^2 s^2 + sigma^2`` (up to discretisation) and the sample has std s.
    A mis-handled sigma = 1 step (std ~ 22 a) blows the first state up by a factor ~15."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s2 = 0.25
    sch = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sch.set_timesteps(15)

    def fn(x, t, c):
        sig = (t / 1000).reshape(-1, *[1] * (x.ndim - 1))  # [B or 1, 1, 1, 1]
        var = (1 - sig) ** 2 * s2 + sig**2
        return (sig - (1 - sig) * s2) * x / var

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4096, 4, 2, 2, generator=g)
    out = flow_sample(fn, x_T, sch.sigmas, None, 1.0, eta=0.7, generator=g, return_trajectory=True)
    for sig, x in zip(sch.sigmas.tolist(), out.trajectory, strict=True):
        want = ((1 - sig) ** 2 * s2 + sig**2) ** 0.5
        assert abs(x.std().item() / want - 1) < 0.12, (sig, x.std().item(), want)  # measured: at most 9% off


def test_ddim_inversion_round_trip():
    """Invert with the model's own DDIM ODE, then sample back: the latent is recovered.

    The model is the exact denoiser of Gaussian data x0 ~ N(0, s^2):
    E[eps | x_t] = sqrt(1-a) x_t / (a s^2 + 1 - a), a smooth model for which the ODE is well defined
    (a random-weight UNet's is not)."""
    sch = _sched()
    sch.set_timesteps(50)
    ns = NoiseSchedule.from_scheduler(sch)
    ac = ns.alphas_cumprod.float()
    s2 = 0.5

    def fn(x, t, c):
        a = ac[t.long()].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * s2 + 1 - a)

    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4)) * s2**0.5
    inv = ddim_invert(fn, x0, list(reversed(sch.timesteps.tolist())), None, ns)
    back = ddim_sample(fn, inv.latent, sch.timesteps, None, ns).sample
    err = (back - x0).abs().max().item()
    assert err < 0.05, (
        err
    )  # stated tolerance: 50 steps, data std 0.71 (first-order ODE mismatch, ~0.03 measured)
    assert (inv.latent - x0).abs().max() > 0.5  # it really went to noise and back
    aT = ns.abar(int(sch.timesteps[0]))
    torch.testing.assert_close(inv.noise, (inv.latent - aT**0.5 * x0) / (1 - aT) ** 0.5)
    renoise = ddim_invert(fn, x0, list(reversed(sch.timesteps.tolist())), None, ns, renoise_steps=1)
    err_renoise = (ddim_sample(fn, renoise.latent, sch.timesteps, None, ns).sample - x0).abs().max().item()
    assert err_renoise <= err  # the refinement does not hurt the reconstruction


def test_stepwise_resampler():
    sch = _sched()
    sch.set_timesteps(20)
    ns = NoiseSchedule.from_scheduler(sch)
    x_t = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))

    def fn(x, t, c):
        return 0.1 * x

    out = stepwise_resample(
        fn,
        x_t,
        501,
        451,
        None,
        ns,
        k=4,
        scorer=lambda c, t: c.mean((1, 2, 3)),
        generator=torch.Generator().manual_seed(6),
    )
    assert out.scores.shape == (4, 3)
    assert torch.allclose(out.best.mean((1, 2, 3)), out.scores.max(0).values)
    assert torch.allclose(out.worst.mean((1, 2, 3)), out.scores.min(0).values)
    assert out.best_log_prob.shape == (3,)


def test_samplers_keep_gradients():
    """No hidden no_grad: log-probs of a DDIM-eta sample are differentiable w.r.t. model parameters."""
    w = torch.tensor(0.1, requires_grad=True)
    sch = _sched()
    sch.set_timesteps(4)
    out = ddim_sample(
        lambda x, t, c: w * x,
        torch.randn(2, 4, 4, 4),
        sch.timesteps,
        None,
        NoiseSchedule.from_scheduler(sch),
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        return_log_probs=True,
    )
    assert len(out.log_probs) == 4
    torch.stack(out.log_probs).sum().backward()
    assert w.grad is not None and w.grad != 0
