"""Tiny random-weight pipelines of the 2025-26 flow families: SD3.5, FLUX.1, Wan2.1, Qwen-Image.

Same diffusers and transformers classes as the real checkpoints, shrunk to a few ten thousand
parameters with the settings that make each family what it is kept: SD3.5-M's dual-attention
(``attn2``) block and RMS qk-norm, FLUX's packed 2x2 latents with T5 + CLIP-pooled conditioning and
dev's guidance embedding (schnell: none), Wan's causal 3-D VAE with per-channel latent statistics,
UMT5 and UniPC flow scheduler, Qwen-Image's Qwen2.5-VL text encoder with its chat template and 5-D
VAE. Sizes follow ``shared/reference/model-families.md`` (the "Tiny config" entries, checked there by
instantiating them); schedulers carry the hub configs' settings (static shift 3 for SD3.5, dynamic
shifting for FLUX-dev and Qwen-Image, ``flow_shift`` 3 for Wan T2V at 480p).
"""

from __future__ import annotations

from typing import Any

import torch

from .tokenizer import build_clip_tokenizer, build_qwen2_tokenizer, build_t5_tokenizer

T5_LENGTH = 16
"""T5 / UMT5 / Qwen tokens of the tiny pipelines (``call_defaults.max_sequence_length``): the real
512 would make the tiny text longer than the tiny image by two orders of magnitude."""


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),  # 4 levels: the usual 8x spatial downsampling
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def _clip(tok: Any, hidden: int, projection: int | None):
    from .tiny import _clip_text

    return _clip_text(hidden, projection, len(tok), tok.eos_token_id, tok.bos_token_id)


def _t5(tok: Any, d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))


def tiny_sd35(words: list[str]):
    """SD3.5-Medium in miniature: block 0 has the extra image-only self-attention ``attn2``
    (``dual_attention_layers``), q/k carry RMSNorm, 16-channel VAE with SD3's shift and scale."""
    import diffusers

    tok = build_clip_tokenizer(words)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # >= 16 + 16 (the two CLIP states, concatenated and zero-padded)
        caption_projection_dim=16,  # = heads x head_dim
        pooled_projection_dim=16,  # 8 + 8 (the two CLIP projections)
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, 1.5305, 0.0609),
        text_encoder=_clip(tok, 16, 8),
        tokenizer=tok,
        text_encoder_2=_clip(tok, 16, 8),
        tokenizer_2=build_clip_tokenizer(words),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_flux(words: list[str], guidance_embeds: bool = True):
    """FLUX.1 in miniature: ``guidance_embeds`` True is dev (distilled guidance), False schnell.
    16-channel VAE with FLUX's shift/scale; the transformer sees 2x2-packed latents (64 channels)."""
    import diffusers

    tok = build_clip_tokenizer(words)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2 x 2 (packing)
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # = T5 d_model
        pooled_projection_dim=16,  # = CLIP hidden size (its pooled output)
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    # dev's scheduler config (dynamic shifting); schnell's hub config is not verified (reference §9)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=guidance_embeds,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    tok2 = build_t5_tokenizer(words, model_max_length=512)
    return diffusers.FluxPipeline(
        scheduler=sched,
        vae=_vae(16, 0.3611, 0.1159),
        text_encoder=_clip(tok, 16, None),
        tokenizer=tok,
        text_encoder_2=_t5(tok2, 32),
        tokenizer_2=tok2,
        transformer=transformer,
    )


def tiny_wan(words: list[str]):
    """Wan2.1 text-to-video in miniature: causal 3-D VAE (4x time, 8x space, per-channel latent
    mean/std of the real one), UMT5, Conv3d-patchified transformer, UniPC flow scheduler (shift 3)."""
    import diffusers

    tok = build_t5_tokenizer(words, model_max_length=512)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,  # = UMT5 d_model
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = diffusers.AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    sched = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    return diffusers.WanPipeline(
        tokenizer=tok, text_encoder=_t5(tok, 32, umt5=True), vae=vae, scheduler=sched, transformer=transformer
    )


def tiny_qwenimage(words: list[str]):
    """Qwen-Image in miniature: a two-layer Qwen2.5-VL (its vision tower unused, as in the
    pipeline), the chat-template Qwen2 tokenizer, Wan-style 5-D VAE, 2x2-packed latents."""
    import diffusers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = build_qwen2_tokenizer(words)
    hidden = 24
    cfg = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tok.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 4]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [0],
        },
        vocab_size=len(tok),
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        image_token_id=len(tok) + 1,
        video_token_id=len(tok) + 2,
        vision_start_token_id=len(tok) + 3,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(cfg)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=hidden,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return diffusers.QwenImagePipeline(
        scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )


def build_tiny_dit(name: str, words: list[str], seed: int = 0):
    """The tiny pipeline of ``name`` (``sd35``, ``flux``, ``flux-schnell``, ``wan``, ``qwenimage``) and
    the ``diffalign.json`` settings its folder needs (sampling defaults sized for it)."""
    torch.manual_seed(seed)
    # 32 px (the pipelines' own defaults are 480-1024 px); SD3.5 has no T5 here (as the tiny sd3): its
    # zero tokens only need to exist, 16 of them
    call = {"max_sequence_length": T5_LENGTH, "height": 32, "width": 32}
    if name == "sd35":
        return tiny_sd35(words), {"call_defaults": call}
    if name in ("flux", "flux-schnell"):
        return tiny_flux(words, guidance_embeds=name == "flux"), {"call_defaults": call}
    if name == "wan":
        return tiny_wan(words), {"call_defaults": {**call, "num_frames": 5}}
    if name == "qwenimage":
        return tiny_qwenimage(words), {"call_defaults": call}
    raise ValueError(f"unknown tiny model {name!r}; valid choices: sd35, flux, flux-schnell, wan, qwenimage")
