"""FLUX.1 adapter against restated formulas: 2x2 packing and position ids
(``pipeline_flux.py`` ``_pack_latents``/``_prepare_latent_image_ids``), the dynamic-shift ``mu``
(``calculate_shift``) and sampling sigmas, the dreambooth script's training timesteps, the
flow-matching target, per-sample errors of packed vs unpacked latents, the distilled guidance of dev
vs none for schnell, and one pipeline step from given latents."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.config import ModelConfig


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> dict[str, Path]:
    from diffalign._quiet import quiet_libraries
    from diffalign.models.tiny import build_tiny_pipeline

    quiet_libraries()
    root = tmp_path_factory.mktemp("flux")
    for name in ("flux", "flux-schnell"):
        build_tiny_pipeline(name, root / name)
    return {"dev": root / "flux", "schnell": root / "flux-schnell"}


def adapter(path: Path):
    from diffalign.models import load_adapter

    return load_adapter(ModelConfig(path=str(path)))


def restated_pack(x: torch.Tensor) -> torch.Tensor:
    """``FluxPipeline._pack_latents``, restated: (B,C,H,W) -> (B, H/2*W/2, 4C), each 2x2 patch one
    token with the channel outermost and the 2x2 offsets (row, column) innermost."""
    B, C, H, W = x.shape
    out = torch.empty(B, (H // 2) * (W // 2), 4 * C)
    for i in range(H // 2):
        for j in range(W // 2):
            patch = x[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]  # [B, C, 2, 2]
            out[:, i * (W // 2) + j] = patch.reshape(B, 4 * C)
    return out


def test_packing_and_ids_are_the_pipelines():
    from diffalign.models.flux import image_ids, pack_latents, unpack_latents

    x = torch.randn(2, 16, 6, 4, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert packed.shape == (2, 6, 64) and torch.equal(packed, restated_pack(x))
    assert torch.equal(unpack_latents(packed, 6, 4), x)
    ids = image_ids(6, 4)  # rows [0, row, col] of the 3 x 2 patch grid, row-major
    assert ids.tolist() == [[0, r, c] for r in range(3) for c in range(2)]


def test_packed_and_unpacked_per_sample_errors_are_equal(flux):
    """The loop's per-sample error on unpacked ``[B,C,h,w]`` equals the packed computation's (the
    transformer's raw ``[B,S,64]`` output against the packed target)."""
    from diffalign.models.base import per_sample_error

    a = adapter(flux["dev"])
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    t = torch.tensor([700.0, 250.0])
    cond = a.encode_prompts(["a red circle", "a blue square"])
    x_t, target = a.add_noise(x0, eps, t), a.target(x0, eps, t)
    with torch.no_grad():
        pred = a.predict(x_t, t, cond)
        raw = a.denoiser(
            hidden_states=restated_pack(x_t),
            timestep=t / 1000,
            guidance=torch.full((2,), 3.5),
            pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
            img_ids=torch.tensor([[0.0, r, c] for r in range(2) for c in range(3)]),
            return_dict=False,
        )[0]
    packed_err = (raw - restated_pack(target)).pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(per_sample_error(pred, target), packed_err, rtol=1e-6, atol=0)
    assert torch.equal(restated_pack(pred), raw)  # the very same numbers, only rearranged


def test_timestep_shift_mu_and_sampling_sigmas(flux):
    """``mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)`` and
    ``sigma' = e^mu / (e^mu + 1/sigma - 1)`` on ``linspace(1, 1/n, n)``: 0.65 at sigma 0.5 for 512 px,
    0.76 for 1024 px (reference §1)."""
    from diffalign.models.flux import calculate_mu

    def mu(tokens):
        return 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)

    for px in (256, 512, 1024):
        assert calculate_mu((px // 16) ** 2) == pytest.approx(mu((px // 16) ** 2), abs=1e-12)
    a = adapter(flux["dev"])
    for px, at_half in ((512, 0.65), (1024, 0.76)):
        m = mu((px // 16) ** 2)
        sig = a.sampling_sigmas(4, px // 8, px // 8)
        want = [math.exp(m) / (math.exp(m) + 1 / s - 1) for s in np.linspace(1.0, 0.25, 4)] + [0.0]
        torch.testing.assert_close(sig.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
        assert math.exp(m) / (math.exp(m) + 1) == pytest.approx(at_half, abs=0.005)


def test_sampling_sigmas_are_the_ones_the_pipeline_steps_through(flux):
    from diffalign.models.loading import load_pipeline

    a = adapter(flux["dev"])
    pipe, _ = load_pipeline(flux["dev"])
    pipe(
        ["a red circle"],
        num_inference_steps=3,
        height=32,
        width=48,
        max_sequence_length=16,
        output_type="latent",
    )
    torch.testing.assert_close(pipe.scheduler.sigmas.float(), a.sampling_sigmas(3, 4, 6))


def test_training_timesteps_follow_the_dreambooth_script(flux):
    """``--weighting_scheme none``: ``u ~ U(0,1)``, ``t = scheduler.timesteps[int(u * 1000)]``. dev ships
    dynamic shifting, so the training grid is the unshifted ``1000, 999, ..., 1`` (sigma uniform);
    noising and target are the rectified-flow ones."""
    a = adapter(flux["dev"])
    assert a.timestep_sampling == "uniform"
    for seed in range(20):
        u = torch.rand((), generator=torch.Generator().manual_seed(seed))
        assert float(a.sample_timestep(torch.Generator().manual_seed(seed))) == 1000 - int(u * 1000)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    t = torch.tensor([800.0, 100.0])
    s = (t / 1000).view(2, 1, 1, 1)
    torch.testing.assert_close(a.add_noise(x0, eps, t), (1 - s) * x0 + s * eps)
    assert torch.equal(a.target(x0, eps, t), eps - x0)


def test_dev_takes_distilled_guidance_and_schnell_none(flux):
    dev, schnell = adapter(flux["dev"]), adapter(flux["schnell"])
    assert dev.denoiser.config.guidance_embeds and not schnell.denoiser.config.guidance_embeds
    assert schnell.guidance(2, torch.device("cpu")) is None
    assert dev.guidance(2, torch.device("cpu")).tolist() == [3.5, 3.5]
    x, t = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    cond = dev.encode_prompts(["a red circle"])
    with torch.no_grad():
        at_35 = dev.predict(x, t, cond)
        dev.guidance_scale = 1.0
        assert not torch.allclose(dev.predict(x, t, cond), at_35)  # the embedding reads the value


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_one_pipeline_step_equals_the_adapter_prediction(flux, variant):
    """Training-time conditioning is the sampling-time one: one Euler step of ``FluxPipeline`` from
    given (packed) latents at sigma 1 is ``x - v`` with the adapter's (unpacked) prediction ``v``."""
    from diffalign.models.loading import load_pipeline

    a = adapter(flux[variant])
    pipe, _ = load_pipeline(flux[variant])
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    out = pipe(
        ["a red circle"],
        num_inference_steps=1,
        height=32,
        width=32,
        max_sequence_length=16,
        latents=restated_pack(x),
        output_type="latent",
    ).images  # packed [1, 4, 64]
    with torch.no_grad():
        v = a.predict(x, torch.tensor([1000.0]), a.encode_prompts(["a red circle"]))
    torch.testing.assert_close(out, restated_pack(x - v), rtol=1e-4, atol=1e-5)


def test_odd_latent_size_is_one_line(flux):
    a = adapter(flux["dev"])
    with pytest.raises(ValueError, match="must be even"):
        a.predict(torch.zeros(1, 16, 3, 4), torch.tensor([10.0]), a.encode_prompts(["a"]))
