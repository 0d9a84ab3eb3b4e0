"""``train.precompute_reference`` is a memory path, never a numbers path: the reference errors of the
pre-pass (before LoRA is added, on the freshly loaded denoiser) are bit-identical to the ones a live
reference computes during training (LoRA disabled on the policy, or the frozen copy of full
fine-tuning), for every family, in fp32 and in mixed precision, so losses and weights are too.

The tiny denoisers here are perturbed ("trained"): freshly initialised ones have norm weights of
exactly 1 and biases of exactly 0, which every dtype represents, and would hide a reference that
computes with weights of another precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_av_models import make_av_parquet
from test_train import overrides, run, trainable

import diffalign.train.sources as loop
from diffalign.config import load_config
from diffalign.train import train

from conftest import make_pairs_parquet

FAMILIES = ["sd", "sdxl", "sd3", "animatediff", "text2video", "audioldm", "audioldm-tokens"]
MODALITY = {"animatediff": "video", "text2video": "video", "audioldm": "audio", "audioldm-tokens": "audio"}


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """``family -> (model folder, pairs parquet)``, built on first use (a tiny pipeline whose
    denoiser weights carry a small random offset; data of the family's modality)."""
    from diffalign._quiet import quiet_libraries
    from diffalign.models.tiny import build_tiny_pipeline

    quiet_libraries()
    root = tmp_path_factory.mktemp("trained-tiny")
    built: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in built:
            folder = root / family
            build_tiny_pipeline(
                family.removesuffix("-tokens"),
                folder,
                text_conditioning="tokens" if family.endswith("-tokens") else "pooled",
            )
            (weights,) = [
                f for f in folder.glob("*/diffusion_pytorch_model.safetensors") if "vae" not in str(f)
            ]
            g = torch.Generator().manual_seed(1)
            state = load_file(weights)
            save_file({n: v + 0.02 * torch.randn(v.shape, generator=g) for n, v in state.items()}, weights)
            modality = MODALITY.get(family, "image")
            data = root / f"{modality}.parquet"
            if not data.exists():
                if modality == "image":
                    make_pairs_parquet(data, n=8)
                else:
                    make_av_parquet(data, modality)
            built[family] = (folder, data)
        return built[family]

    return get


def reference_errors_of(monkeypatch, model: Path, data: Path, out: Path, *extra: str) -> list[torch.Tensor]:
    """Train, returning every reference error tensor ``[B,k]`` in the order computed: the pre-pass
    and the live reference both run under inference mode, the policy forward never does."""
    seen: list[torch.Tensor] = []
    group_errors = loop.group_errors

    def recording(*args, **kwargs):
        err = group_errors(*args, **kwargs)
        if torch.is_inference_mode_enabled():
            seen.append(err.clone())
        return err

    monkeypatch.setattr(loop, "group_errors", recording)
    run(model, data, out, *extra)
    monkeypatch.undo()
    return seen


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


CASES = [(f, m, p) for f in FAMILIES for m in ("lora", "full") for p in ("fp32", "bf16")]


@pytest.mark.parametrize("family,mode,precision", CASES, ids=["-".join(c) for c in CASES])
def test_precomputed_reference_is_bit_identical(trained_tiny, monkeypatch, tmp_path, family, mode, precision):
    model, data = trained_tiny(family)
    extra = [
        "train.max_steps=3",
        "train.batch_size=2",
        "train.grad_accum=2",
        "data.random_flip=false",
        *(["train.mixed_precision=bf16"] if precision == "bf16" else []),
        *(["lora.rank=0", "train.lr=1e-3"] if mode == "full" else []),
    ]
    live = reference_errors_of(monkeypatch, model, data, tmp_path / "live", *extra)
    pre = reference_errors_of(
        monkeypatch, model, data, tmp_path / "pre", *extra, "train.precompute_reference=true"
    )
    assert len(live) == len(pre) == 3 * 2  # one per (step, micro-batch)
    worst = max(float((a - b).abs().max()) for a, b in zip(live, pre))
    assert all(torch.equal(a, b) for a, b in zip(live, pre)), f"reference errors differ by up to {worst:.3g}"
    assert losses(tmp_path / "live") == losses(tmp_path / "pre")
    a, b = trainable(tmp_path / "live"), trainable(tmp_path / "pre")
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.equal(a[n], b[n]), (n, float((a[n] - b[n]).abs().max()))


def test_precomputed_reference_survives_resume(tiny_models, pairs_parquet, tmp_path):
    extra = [
        "train.max_steps=3",
        "train.batch_size=2",
        "lora.rank=0",
        "train.lr=1e-3",
        "train.precompute_reference=true",
        "train.checkpoint_every=1",
    ]
    run(tiny_models["sd"], pairs_parquet, tmp_path / "full", *extra)
    run(tiny_models["sd"], pairs_parquet, tmp_path / "cut", *extra, "train.halt_after_step=1")
    train(
        load_config(None, overrides(tiny_models["sd"], pairs_parquet, tmp_path / "cut", *extra)),
        resume="latest",
    )
    a, b = trainable(tmp_path / "full"), trainable(tmp_path / "cut")
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0)


def test_precomputed_reference_with_channels_last_lora(trained_tiny, monkeypatch, tmp_path):
    model, data = trained_tiny("sd")
    extra = ["train.max_steps=2", "train.batch_size=2", "train.channels_last=true"]
    live = reference_errors_of(monkeypatch, model, data, tmp_path / "live", *extra)
    pre = reference_errors_of(
        monkeypatch, model, data, tmp_path / "pre", *extra, "train.precompute_reference=true"
    )
    assert all(torch.equal(a, b) for a, b in zip(live, pre, strict=True))


def test_reference_weights_restores_the_policy_exactly():
    """The pre-pass casts the denoiser in place and switches it to eval mode; afterwards every weight
    is the very fp32 tensor it was and every module has its own training flag back."""
    from torch import nn

    from diffalign.train.reference import Reference, reference_weights

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    net[1].eval()  # a submodule deliberately in eval mode stays so
    before = {n: t.clone() for n, t in net.state_dict().items()}
    storage = {n: t.data_ptr() for n, t in net.state_dict().items()}
    with reference_weights(net, torch.bfloat16) as ref:
        assert ref is net and not any(m.training for m in net.modules())
        assert all(t.dtype == torch.bfloat16 for t in net.state_dict().values() if t.is_floating_point())
    after = net.state_dict()
    assert all(torch.equal(before[n], after[n]) and after[n].dtype == before[n].dtype for n in before)
    assert all(after[n].data_ptr() == storage[n] for n in storage)  # no copies left behind
    assert [m.training for m in net.modules()] == [True, True, False, True]

    live = Reference("lora_off", net)  # the live LoRA-off reference runs in eval mode too
    with live.active() as m:
        assert not any(x.training for x in m.modules())
    assert [m.training for m in net.modules()] == [True, True, False, True]
