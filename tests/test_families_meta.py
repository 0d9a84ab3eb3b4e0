"""The architectures are the real ones: the hub configs of SD3.5-M/L, FLUX.1-dev/schnell, Wan2.1
1.3B/14B and Qwen-Image, instantiated on the meta device (no memory, no download), have the
parameter counts recorded in ``shared/reference/model-families.md`` (counted there the same way)."""

from __future__ import annotations

import pytest
import torch

# hub transformer configs (third-party copies, reference §2-§5); only the keys that differ from the
# diffusers class defaults that matter for the count are listed
SD3_COMMON = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
}
WAN_COMMON = {
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
}
REAL = {
    "SD3.5-Medium": (
        "SD3Transformer2DModel",
        {
            **SD3_COMMON,
            "num_layers": 24,
            "num_attention_heads": 24,
            "caption_projection_dim": 1536,
            "pos_embed_max_size": 384,
            "qk_norm": "rms_norm",
            "dual_attention_layers": tuple(range(13)),
        },
        2.24,
    ),
    "SD3.5-Large": (
        "SD3Transformer2DModel",
        {
            **SD3_COMMON,
            "num_layers": 38,
            "num_attention_heads": 38,
            "caption_projection_dim": 2432,
            "pos_embed_max_size": 192,
            "qk_norm": "rms_norm",
        },
        8.06,
    ),
    "FLUX.1-dev": ("FluxTransformer2DModel", {"guidance_embeds": True}, 11.90),
    "FLUX.1-schnell": ("FluxTransformer2DModel", {"guidance_embeds": False}, 11.89),
    "Wan2.1-T2V-1.3B": (
        "WanTransformer3DModel",
        {**WAN_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
        1.42,
    ),
    "Wan2.1-T2V-14B": (
        "WanTransformer3DModel",
        {**WAN_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
        14.29,
    ),
    "Qwen-Image": ("QwenImageTransformer2DModel", {}, 20.43),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_size_parameter_counts(name):
    import diffusers

    cls, config, billions = REAL[name]
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**config)
    n = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated
    assert round(n / 1e9, 2) == billions, f"{name}: {n / 1e9:.3f} B parameters, reference {billions} B"


def test_sd35_medium_dual_attention_layers_are_the_first_13():
    """SD3.5-M's MMDiT-X blocks carry an image-only ``attn2`` (the model card's "first 13 layers");
    a default diffusers LoRA list (``attn.to_q`` ...) never reaches them."""
    import diffusers

    _, config, _ = REAL["SD3.5-Medium"]
    with torch.device("meta"):
        model = diffusers.SD3Transformer2DModel(**config)
    with_attn2 = [i for i, b in enumerate(model.transformer_blocks) if getattr(b, "attn2", None) is not None]
    assert with_attn2 == list(range(13))
    names = [n for n, _ in model.named_modules()]
    assert not [n for n in names if n.endswith("attn.to_q") and "attn2" in n]
    assert len([n for n in names if n.endswith("attn2.to_q")]) == 13
