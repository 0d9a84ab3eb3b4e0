"""SD3.5 on the SD3 adapter: the dual-attention (``attn2``) layers of 3.5-Medium are trained only when
the LoRA list names them (the diffusers script's list does not), the training timesteps are the SD3
script's (logit-normal index into the shift-3 grid), qk-norm layers are present, and one pipeline
step equals the adapter's prediction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffalign.config import ModelConfig


@pytest.fixture(scope="module")
def sd35(tmp_path_factory) -> Path:
    from diffalign._quiet import quiet_libraries
    from diffalign.models.tiny import build_tiny_pipeline

    quiet_libraries()
    out = tmp_path_factory.mktemp("sd35") / "sd35"
    build_tiny_pipeline("sd35", out)
    return out


def adapter(path: Path):
    from diffalign.models import load_adapter

    return load_adapter(ModelConfig(path=str(path)))


def lora_modules(transformer, targets: list[str]) -> set[str]:
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    return {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if ".lora_A." in n}


def test_dual_attention_and_qk_norm_are_there(sd35):
    a = adapter(sd35)
    blocks = a.denoiser.transformer_blocks
    assert blocks[0].attn2 is not None and blocks[1].attn2 is None  # dual_attention_layers=(0,)
    assert type(blocks[0].attn.norm_q).__name__ == "RMSNorm" and blocks[0].attn.norm_added_q is not None


@pytest.mark.parametrize(
    "targets,attn2",
    [("SD3_LORA_TARGETS", False), ("SD35_LORA_TARGETS", True), (["to_q", "to_k", "to_v", "to_out.0"], True)],
)
def test_lora_targets_reach_attn2_only_when_listed(sd35, targets, attn2):
    import diffalign.models.sd3 as sd3

    names = getattr(sd3, targets) if isinstance(targets, str) else targets
    hit = lora_modules(adapter(sd35).denoiser, names)
    assert "transformer_blocks.0.attn.to_q" in hit
    assert ("transformer_blocks.0.attn2.to_q" in hit) == attn2
    assert all("attn2" not in n for n in hit) != attn2


def test_training_timesteps_follow_the_sd3_script(sd35):
    """``logit_normal`` (mean 0, std 1): ``u = sigmoid(N(0,1))``, ``t = timesteps[int(u * 1000)]`` with the
    static shift 3: ``sigma' = 3 sigma / (1 + 2 sigma)``, ``sigma = (1000 - index) / 1000``."""
    a = adapter(sd35)
    assert a.timestep_sampling == "logit_normal"
    for seed in range(20):
        u = torch.sigmoid(torch.randn((), generator=torch.Generator().manual_seed(seed)))
        sigma = (1000 - int(u * 1000)) / 1000
        want = 1000 * 3 * sigma / (1 + 2 * sigma)
        got = float(a.sample_timestep(torch.Generator().manual_seed(seed)))
        assert got == pytest.approx(want, abs=1e-3)


def test_one_pipeline_step_equals_the_adapter_prediction(sd35):
    from diffalign.models.loading import load_pipeline

    a = adapter(sd35)
    pipe, call = load_pipeline(sd35)
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    out = pipe(
        ["a red circle"],
        num_inference_steps=1,
        guidance_scale=1.0,
        latents=x.clone(),
        output_type="latent",
        **call,
    ).images
    with torch.no_grad():
        v = a.predict(x, torch.tensor([1000.0]), a.encode_prompts(["a red circle"]))
    torch.testing.assert_close(out, x - v, rtol=1e-4, atol=1e-5)


def test_sampling_sigmas_are_the_pipelines(sd35):
    """Static shift 3 on the default ``set_timesteps(n)`` grid: what online methods roll out on."""
    from diffalign.models.loading import load_pipeline

    a = adapter(sd35)
    pipe, call = load_pipeline(sd35)
    pipe(["a red circle"], num_inference_steps=3, output_type="latent", **call)  # 32 px
    torch.testing.assert_close(a.sampling_sigmas(3, 4, 4), pipe.scheduler.sigmas.float())
