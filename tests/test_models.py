"""Adapters on tiny saved pipelines of every family, loaded through the real from_pretrained path."""

from __future__ import annotations

import pytest
import torch

from diffalign.config import ModelConfig
from diffalign.models import ModelLoadError, load_adapter


@pytest.fixture(scope="module")
def adapters(tiny_models):
    return {f: load_adapter(ModelConfig(path=str(tiny_models[f]))) for f in ("sd", "sdxl", "sd3", "sd-v")}


def test_families_and_prediction_types(adapters):
    assert [adapters[f].family for f in ("sd", "sdxl", "sd3")] == ["sd", "sdxl", "sd3"]
    assert adapters["sd"].prediction_type == "epsilon"
    assert adapters["sd-v"].prediction_type == "v_prediction"  # read from the scheduler config
    assert adapters["sd3"].prediction_type == "flow_matching"
    assert (
        adapters["sd3"].timestep_sampling == "logit_normal" and adapters["sd"].timestep_sampling == "uniform"
    )


@pytest.mark.parametrize("fam", ["sd", "sdxl", "sd3", "sd-v"])
def test_adapter_roundtrip_shapes(adapters, fam):
    ad = adapters[fam]
    cond = ad.encode_prompts(["a red circle", "a dog"])
    z = ad.encode_images(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert z.shape == (2, 4, 4, 4)
    t = torch.stack([ad.sample_timestep(torch.Generator().manual_seed(i)) for i in range(2)])
    eps = torch.randn_like(z)
    pred = ad.predict(ad.add_noise(z, eps, t), t, cond)
    assert pred.shape == z.shape and torch.isfinite(pred).all()
    assert ad.decode_latents(z).shape == (2, 3, 32, 32)


def test_v_prediction_target(adapters):
    ad = adapters["sd-v"]
    x0, eps, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    ab = ad.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(ad.target(x0, eps, t), ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-6)
    assert torch.equal(adapters["sd"].target(x0, eps, t), eps)


def test_flow_matching_noise_target_and_shifted_grid(adapters):
    ad = adapters["sd3"]
    x0, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([250.0, 500.0, 990.0])
    s = (t / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(ad.add_noise(x0, eps, t), (1 - s) * x0 + s * eps)
    assert torch.equal(ad.target(x0, eps, t), eps - x0)
    # timesteps come from the scheduler's shifted grid (shift 3 pushes mass towards high noise)
    draws = torch.stack([ad.sample_timestep(torch.Generator().manual_seed(i)) for i in range(400)])
    grid = set(ad.noise_scheduler.timesteps.tolist())
    assert all(float(d) in grid for d in draws)
    shift = 3.0
    u = 0.5  # the logit-normal median maps to the shifted sigma at 0.5
    assert draws.median().item() / 1000 == pytest.approx(shift * u / (1 + (shift - 1) * u), abs=0.03)


def test_sdxl_micro_conditioning_changes_prediction(adapters):
    ad = adapters["sdxl"]
    cond = ad.encode_prompts(["a dog"])
    x, t = torch.randn(1, 4, 4, 4), torch.tensor([500])
    a = ad.predict(x, t, cond, torch.tensor([[32.0, 32, 0, 0, 32, 32]]))
    b = ad.predict(x, t, cond, torch.tensor([[512.0, 768, 40, 0, 32, 32]]))
    assert not torch.allclose(a, b)


def test_wrong_prediction_type_is_one_line_error(tiny_models):
    with pytest.raises(
        ModelLoadError, match="model.prediction_type: 'epsilon' but .* is trained for 'v_prediction'"
    ):
        load_adapter(ModelConfig(path=str(tiny_models["sd-v"]), prediction_type="epsilon"))
    with pytest.raises(ModelLoadError, match="trained for 'flow_matching'"):
        load_adapter(ModelConfig(path=str(tiny_models["sd3"]), prediction_type="epsilon"))
    with pytest.raises(ModelLoadError, match="model.family: 'sdxl' but .* is a StableDiffusionPipeline"):
        load_adapter(ModelConfig(path=str(tiny_models["sd"]), family="sdxl"))


def test_missing_model_path_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"model.path '/no/such/model' does not exist"):
        load_adapter(ModelConfig(path="/no/such/model"))
    with pytest.raises(ModelLoadError, match="has no model_index.json"):
        load_adapter(ModelConfig(path=str(tmp_path)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set and it is not in the local cache"):
        load_adapter(ModelConfig(path="someorg/not-cached-model"))


def test_low_precision_denoiser_load_equals_loading_then_casting(tiny_models):
    """LoRA under bf16 loads the frozen denoiser straight in bf16 (``denoiser_dtype``): the same
    values, bit for bit, as loading it in fp32 and casting afterwards (what the loop did before),
    with the frozen parts in their own dtype."""
    for fam in ("sd", "sd3"):
        mcfg = ModelConfig(path=str(tiny_models[fam]))
        direct = load_adapter(mcfg, "cpu", torch.bfloat16, torch.bfloat16)
        late = load_adapter(mcfg, "cpu", torch.bfloat16)
        assert next(late.denoiser.parameters()).dtype == torch.float32  # default: fp32 master weights
        late.denoiser.to(torch.bfloat16)
        a, b = direct.denoiser.state_dict(), late.denoiser.state_dict()
        assert a.keys() == b.keys()
        assert all(v.dtype == torch.bfloat16 for v in a.values() if v.is_floating_point())
        for k in a:
            assert torch.equal(a[k], b[k]), (fam, k)
        for m in direct.frozen_modules():
            assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_adapter_classes_cover_every_family_and_import_on_demand():
    """Every family has an adapter class; loading one family imports its own module only (an SD3 run
    never imports the audio module, and with it AudioLDM and CLAP)."""
    import subprocess
    import sys
    from typing import get_args

    from diffalign.models.base import Adapter, Family
    from diffalign.models.loading import ADAPTER_CLASSES, adapter_class

    assert set(ADAPTER_CLASSES) == set(get_args(Family))
    for family in ADAPTER_CLASSES:
        assert issubclass(adapter_class(family), Adapter)
    code = (
        "import sys\n"
        "from diffalign.config import ModelConfig\n"
        "from diffalign.demo import asset\n"
        "from diffalign.models import load_adapter\n"
        "a = load_adapter(ModelConfig(path=asset('toy-sd3')), 'cpu')\n"
        "print(type(a).__name__, sorted(m for m in sys.modules if m.startswith('diffalign.models.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("SD3Adapter ")
    for other in ("audio", "video", "flux", "wan", "qwenimage", "sdxl"):
        assert f"'diffalign.models.{other}'" not in out, out
