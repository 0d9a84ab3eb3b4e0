"""Wan2.1 and Qwen-Image adapters against restated formulas: per-channel latent normalisation of
their VAEs, Wan's 1 + 4k frames, the training grids (Wan: static ``flow_shift`` 3 of its UniPC
config; Qwen-Image: unshifted, dynamic shifting at sampling only), the conditioning (Wan's zeroed
padding, Qwen's chat template with 34 dropped tokens and masked padding) and one pipeline step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffalign.config import ConfigError, ModelConfig


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from diffalign._quiet import quiet_libraries
    from diffalign.models.tiny import build_tiny_pipeline

    quiet_libraries()
    root = tmp_path_factory.mktemp("wan-qwen")
    for name in ("wan", "qwenimage"):
        build_tiny_pipeline(name, root / name)
    return {name: root / name for name in ("wan", "qwenimage")}


def adapter(path: Path):
    from diffalign.models import load_adapter

    return load_adapter(ModelConfig(path=str(path)))


def stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, 16, 1, 1, 1)
    return torch.tensor(vae.config.latents_mean).view(shape), torch.tensor(vae.config.latents_std).view(shape)


# ----------------------------------------------------------------------------- Wan2.1


def test_wan_latents_are_normalised_per_channel(models):
    a = adapter(models["wan"])
    clips = torch.rand(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = a.encode_images(clips)
    with torch.no_grad():
        raw = a.vae.encode(clips.permute(0, 2, 1, 3, 4)).latent_dist.mode()  # [B,16,F',h,w]
    mean, std = stats(a.vae)
    assert z.shape == (2, 16, 2, 4, 4)  # 5 frames -> 1 + 4/4 latent frames, 8x space
    torch.testing.assert_close(z, (raw - mean) / std)
    assert a.decode_latents(z).shape == (2, 5, 3, 32, 32)
    with pytest.raises(ConfigError, match="needs 1 \\+ 4k frames"):
        a.encode_images(clips[:, :3])


def test_wan_training_grid_is_the_static_flow_shift(models):
    """Uniform ``u``, ``t = 1000 * 3 sigma / (1 + 2 sigma)`` at ``sigma = (1000 - int(u * 1000)) / 1000``
    (the UniPC config's ``flow_shift`` 3.0); noising and target are rectified flow's."""
    a = adapter(models["wan"])
    assert a.pipe.scheduler.config.flow_shift == 3.0 and a.timestep_sampling == "uniform"
    for seed in range(20):
        u = torch.rand((), generator=torch.Generator().manual_seed(seed))
        sigma = (1000 - int(u * 1000)) / 1000
        got = float(a.sample_timestep(torch.Generator().manual_seed(seed)))
        assert got == pytest.approx(1000 * 3 * sigma / (1 + 2 * sigma), abs=1e-3)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 16, 2, 4, 4, generator=g)
    t = torch.tensor([900.0, 300.0])
    s = (t / 1000).view(2, 1, 1, 1, 1)
    torch.testing.assert_close(a.add_noise(x0, eps, t), (1 - s) * x0 + s * eps)
    assert torch.equal(a.target(x0, eps, t), eps - x0)


def test_wan_text_is_zero_past_each_prompt(models):
    a = adapter(models["wan"])
    prompts = ["a red circle", "a photo of a dog and a cat"]
    emb = a.encode_prompts(prompts)["prompt_embeds"]
    n = [len(a.pipe.tokenizer(p).input_ids) for p in prompts]  # tokens incl. </s>
    assert emb.shape == (2, 16, 32) and n[0] < n[1] < 16
    for i in range(2):
        assert emb[i, : n[i]].abs().sum(-1).gt(0).all() and emb[i, n[i] :].eq(0).all()


def test_wan_one_pipeline_step_equals_the_adapter_prediction(models):
    """With a flow-matching Euler scheduler swapped in (``WanPipeline`` accepts it), one step from
    sigma 1 is ``x - v``: the adapter conditions like the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffalign.models.loading import load_pipeline

    a = adapter(models["wan"])
    pipe, _ = load_pipeline(models["wan"])
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    out = pipe(
        ["a red circle"],
        num_inference_steps=1,
        height=32,
        width=32,
        num_frames=5,
        guidance_scale=1.0,
        max_sequence_length=16,
        latents=x.clone(),
        output_type="latent",
    ).frames
    with torch.no_grad():
        v = a.predict(x, torch.tensor([1000.0]), a.encode_prompts(["a red circle"]))
    torch.testing.assert_close(out, x - v, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- Qwen-Image


def test_qwen_latents_are_normalised_5d_vae_latents(models):
    a = adapter(models["qwenimage"])
    px = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = a.encode_images(px)
    with torch.no_grad():
        raw = a.vae.encode(px[:, :, None]).latent_dist.mode()  # [B,16,1,h,w]
    mean, std = stats(a.vae)
    assert z.shape == (2, 16, 4, 4)
    torch.testing.assert_close(z, ((raw - mean) / std)[:, :, 0])
    assert a.decode_latents(z).shape == (2, 3, 32, 32)


def test_qwen_text_drops_the_template_and_padding_is_invisible(models):
    """The conditioning keeps the prompt's tokens after the template's 34 system tokens; the padding to
    ``max_sequence_length`` is masked, so the prediction equals the one on the pipeline's unpadded
    embeddings."""
    a = adapter(models["qwenimage"])
    prompts = ["a red circle", "a photo of a dog and a cat"]
    cond = a.encode_prompts(prompts)
    template = a.pipe.prompt_template_encode
    n = [len(a.pipe.tokenizer(template.format(p)).input_ids) - 34 for p in prompts]
    assert cond["prompt_embeds"].shape == (2, 16, 24)
    assert cond["prompt_mask"].sum(1).tolist() == n
    embeds, mask = a.pipe.encode_prompt(prompts, max_sequence_length=16)
    assert embeds.shape[1] == max(n) < 16  # the pipeline pads to the batch's longest only
    x, t = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([600.0, 200.0])
    with torch.no_grad():
        ours = a.predict(x, t, cond)
        theirs = a.predict(x, t, {"prompt_embeds": embeds, "prompt_mask": mask})
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_qwen_training_timesteps_are_unshifted(models):
    a = adapter(models["qwenimage"])
    assert a.noise_scheduler.config.use_dynamic_shifting and a.timestep_sampling == "uniform"
    for seed in range(10):
        u = torch.rand((), generator=torch.Generator().manual_seed(seed))
        assert float(a.sample_timestep(torch.Generator().manual_seed(seed))) == 1000 - int(u * 1000)


def test_qwen_first_pipeline_step_equals_the_adapter_prediction(models):
    """Qwen-Image's first Euler step from sigma 1 moves ``x`` by ``(sigma_1 - 1) v`` with the adapter's
    ``v`` (timestep sigma = 1, packed latents, ``img_shapes``, text mask)."""
    from diffalign.models.flux import pack_latents, unpack_latents
    from diffalign.models.loading import load_pipeline

    a = adapter(models["qwenimage"])
    pipe, _ = load_pipeline(models["qwenimage"])
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    seen = []

    def grab(p, i, t, kw):
        seen.append(kw["latents"].clone())
        return kw

    pipe(
        ["a red circle"],
        num_inference_steps=2,
        height=32,
        width=32,
        true_cfg_scale=1.0,
        max_sequence_length=16,
        latents=pack_latents(x),
        output_type="latent",
        callback_on_step_end=grab,
    )
    s0, s1 = (float(s) for s in pipe.scheduler.sigmas[:2])
    assert s0 == 1.0 and s1 == pytest.approx(0.02)  # stretched to shift_terminal
    torch.testing.assert_close(a.sampling_sigmas(2, 4, 4), pipe.scheduler.sigmas.float())
    with torch.no_grad():
        v = a.predict(x, torch.tensor([1000.0]), a.encode_prompts(["a red circle"]))
    torch.testing.assert_close(unpack_latents(seen[0], 4, 4), x + (s1 - s0) * v, rtol=1e-4, atol=1e-5)
