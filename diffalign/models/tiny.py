"""Tiny random-weight pipelines of every supported family, built from configs.

Same classes as the real checkpoints (diffusers ``get_dummy_components`` style), saved with
``save_pretrained`` so tests go through the real ``from_pretrained`` path with nothing downloaded.
The tokenizers are real CLIP BPE tokenizers with a small offline vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import torch

from .tokenizer import build_clip_tokenizer

WORDS = (
    "a an the photo of and left right above below red green blue yellow purple orange "
    "cat dog circle square triangle"
).split()


def _vae(latent_channels: int = 4, shift_factor: float | None = None):
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
        scaling_factor=0.5,
        shift_factor=shift_factor,
    )


def _clip_text(hidden: int, projection: int | None, vocab_size: int, eos: int, bos: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        eos_token_id=eos,
        bos_token_id=bos,
        pad_token_id=eos,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


TinyName = Literal[
    "sd", "sdxl", "sd3", "sd35", "flux", "flux-schnell", "wan", "qwenimage",
    "animatediff", "text2video", "audioldm",
]  # fmt: skip
TINY_NAMES: tuple[str, ...] = get_args(TinyName)
"""What ``diffalign tiny`` builds: one per family, plus SD3.5-M (family ``sd3``: dual attention and
qk-norm) and FLUX.1-schnell (family ``flux``: no guidance embedding) as variants."""


def build_tiny_pipeline(
    family: TinyName,
    out_dir: str | Path | None = None,
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
    seed: int = 0,
    sample_size: int = 4,
    text_conditioning: Literal["pooled", "tokens"] = "pooled",
):
    """Build (and optionally save) a tiny pipeline; ``sample_size`` is the latent side (x8 pixels).
    ``text_conditioning`` applies to ``audioldm`` (see ``models/audio.py``); ``prediction_type`` and
    ``sample_size`` to the DDPM families and ``sd3`` (the flow families of ``tiny_dit.py`` have theirs)."""
    import diffusers

    if family in ("sd35", "flux", "flux-schnell", "wan", "qwenimage"):
        import json

        from .tiny_dit import build_tiny_dit

        pipe, settings = build_tiny_dit(family, list(WORDS), seed)
        if out_dir is not None:
            pipe.save_pretrained(str(out_dir), safe_serialization=True)
            if settings:
                (Path(out_dir) / "diffalign.json").write_text(json.dumps(settings))
        return pipe
    torch.manual_seed(seed)
    tok = build_clip_tokenizer(WORDS)
    V, eos, bos = len(tok), tok.eos_token_id, tok.bos_token_id
    if family == "sd":
        te = _clip_text(16, None, V, eos, bos)
        unet = diffusers.UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        sched = diffusers.DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=prediction_type,
        )
        pipe = diffusers.StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=te,
            tokenizer=tok,
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif family == "sdxl":
        te1 = _clip_text(16, None, V, eos, bos)
        te2 = _clip_text(16, 8, V, eos, bos)
        tok2 = build_clip_tokenizer(WORDS)
        unet = diffusers.UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,  # 16 + 16 concatenated
            attention_head_dim=4,
            norm_num_groups=8,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 8,  # 6 ids x 4 + pooled 8
            transformer_layers_per_block=1,
        )
        sched = diffusers.EulerDiscreteScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type=prediction_type,
            timestep_spacing="leading",
            steps_offset=1,
        )
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tok,
            tokenizer_2=tok2,
            unet=unet,
            scheduler=sched,
        )
    elif family == "sd3":
        te1 = _clip_text(16, 8, V, eos, bos)
        te2 = _clip_text(16, 8, V, eos, bos)
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,  # >= 16 + 16 (CLIP concat, padded)
            caption_projection_dim=16,
            pooled_projection_dim=16,
            pos_embed_max_size=16,
        )
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=sched,
            vae=_vae(shift_factor=0.1),
            text_encoder=te1,
            tokenizer=tok,
            text_encoder_2=te2,
            tokenizer_2=build_clip_tokenizer(WORDS),
            text_encoder_3=None,
            tokenizer_3=None,
        )
    elif family in ("animatediff", "text2video", "audioldm"):
        pipe = _tiny_av(family, sample_size, prediction_type, V, eos, bos, tok, text_conditioning)
    else:
        raise ValueError(f"unknown tiny model {family!r}; valid choices: {', '.join(TINY_NAMES)}")
    if out_dir is not None:
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
        if family == "audioldm":  # the mel front end matching the 8-bin vocoder (see models/audio.py)
            import json

            mel = {"sample_rate": 8000, "n_fft": 256, "hop": 64, "n_mels": 8, "fmax": 4000.0}
            (Path(out_dir) / "diffalign.json").write_text(
                json.dumps(
                    {
                        "mel": mel,
                        "text_conditioning": text_conditioning,
                        "call_defaults": {"audio_length_in_s": 0.256},
                    }
                )
            )
        if family in ("animatediff", "text2video"):  # the tiny motion modules know 8 positions
            import json

            (Path(out_dir) / "diffalign.json").write_text(json.dumps({"call_defaults": {"num_frames": 4}}))
    if (
        family == "audioldm" and text_conditioning == "tokens"
    ):  # saved as an AudioLDMPipeline folder, used as this
        from .audio import TokenAudioLDMPipeline

        pipe = TokenAudioLDMPipeline(**pipe.components)
    return pipe


def _ddim(prediction_type: str):
    import diffusers

    return diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _tiny_av(
    family: str,
    sample_size: int,
    prediction_type: str,
    V: int,
    eos: int,
    bos: int,
    tok,
    text_conditioning: str = "pooled",
):
    """Video (AnimateDiff, ModelScope text-to-video) and audio (AudioLDM) pipelines."""
    import diffusers

    if family == "animatediff":
        unet2d = diffusers.UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        adapter = diffusers.MotionAdapter(
            block_out_channels=(16, 32),
            motion_layers_per_block=1,
            motion_num_attention_heads=2,
            motion_norm_num_groups=8,
            motion_max_seq_length=8,
            use_motion_mid_block=False,
        )
        unet = diffusers.UNetMotionModel.from_unet2d(unet2d, adapter)
        return diffusers.AnimateDiffPipeline(
            vae=_vae(),
            text_encoder=_clip_text(16, None, V, eos, bos),
            tokenizer=tok,
            unet=unet,
            motion_adapter=None,
            scheduler=_ddim(prediction_type),
        )
    if family == "text2video":
        unet = diffusers.UNet3DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        return diffusers.TextToVideoSDPipeline(
            vae=_vae(),
            text_encoder=_clip_text(16, None, V, eos, bos),
            tokenizer=tok,
            unet=unet,
            scheduler=_ddim(prediction_type),
        )
    # audioldm: mel VAE (1 channel), CLAP text tower + RoBERTa BPE, class-embedding (pooled) or
    # cross-attention (tokens) UNet, HiFi-GAN vocoder
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    from .tokenizer import build_roberta_tokenizer

    rtok = build_roberta_tokenizer(WORDS, model_max_length=16)
    te = ClapTextModelWithProjection(
        ClapTextConfig(
            vocab_size=len(rtok),
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=18,
            projection_dim=16,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            type_vocab_size=1,
        )
    )
    vae = diffusers.AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    )
    cond: dict = (
        {"cross_attention_dim": 16}
        if text_conditioning == "tokens"
        else {
            "cross_attention_dim": (16, 32),
            "class_embed_type": "simple_projection",
            "projection_class_embeddings_input_dim": 16,
            "class_embeddings_concat": True,
        }
    )
    unet = diffusers.UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        norm_num_groups=8,
        **cond,
    )
    voc = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=8,
            sampling_rate=8000,
            upsample_initial_channel=16,
            upsample_rates=[4, 4, 4],
            upsample_kernel_sizes=[8, 8, 8],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            normalize_before=False,
        )
    )
    for m in voc.modules():  # HiFi-GAN's own init (std 0.01) makes a tiny random vocoder silent (~1e-7)
        if isinstance(m, torch.nn.Conv1d | torch.nn.ConvTranspose1d):
            torch.nn.init.normal_(m.weight, std=0.3)
    return diffusers.AudioLDMPipeline(
        vae=vae, text_encoder=te, tokenizer=rtok, unet=unet, scheduler=_ddim(prediction_type), vocoder=voc
    )
