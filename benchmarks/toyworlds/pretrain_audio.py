"""Pretraining the ToneWorld-audio base model (``toy-audio``): a tiny AudioLDM from scratch.

Three time-budgeted, resumable stages (checkpoints as in ``pretrain.py``):

1. ``avae``:    ``AutoencoderKL`` (1 channel) on normalised log-mel features ``[1, 128, 32]`` <->
                latents ``[4, 32, 8]``;
2. ``vocoder``: ``SpeechT5HifiGan`` (the vocoder class of diffusers' AudioLDM) from the same
                features to the 8 kHz waveform, with a multi-resolution STFT magnitude loss (no
                adversary: ToneWorld's beeps and noise bursts need magnitudes, not fine phase);
3. ``audio``:   ``UNet2DConditionModel`` trained jointly with a ``ClapTextModelWithProjection`` text
                tower; epsilon prediction, 10% caption dropout, EMA. ``text_conditioning``:
                ``"pooled"`` feeds the L2-normalised text embedding through the class embedding
                (AudioLDM's conditioning; the attention blocks attend to themselves), ``"tokens"``
                lets the UNet cross-attend to the tower's token states (Tango's; see
                ``models/audio.py``). ``init_from`` starts a new run from another run's weights
                wherever names and shapes agree (how the token model reused the pooled one's).

``export_audio_pipeline`` writes an ``AudioLDMPipeline`` folder plus ``diffalign.json`` with the
mel front end the adapter must use (:data:`TOY_MEL`) and the text conditioning.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ...config import ConfigError
from ...models.audio import MelConfig, TextConditioning, log_mel
from .pretrain import Bookkeeper, load_state, settle_checkpoint
from .tones import N_SAMPLES, SR, make_dataset

AudioStage = Literal["avae", "vocoder", "audio"]
TOY_MEL = MelConfig(
    sample_rate=SR, n_fft=256, hop=64, n_mels=32, fmin=0.0, fmax=SR / 2, floor=1e-4, offset=-5.0, scale=3.0
)
FRAMES = N_SAMPLES // TOY_MEL.hop  # 128 mel frames
AUDIO_WORDS = ("a an low high beep beeps noise burst followed by then silence two three").split()
MAX_TOKENS = 16


def audio_tokenizer():
    from ...models.tokenizer import build_roberta_tokenizer

    return build_roberta_tokenizer(AUDIO_WORDS, model_max_length=MAX_TOKENS)


def build_audio_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=FRAMES,
        scaling_factor=1.0,
    )


def build_vocoder():
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    cfg = SpeechT5HifiGanConfig(
        model_in_dim=TOY_MEL.n_mels,
        sampling_rate=SR,
        upsample_initial_channel=64,
        upsample_rates=[4, 4, 4],
        upsample_kernel_sizes=[8, 8, 8],
        resblock_kernel_sizes=[3, 7],
        resblock_dilation_sizes=[[1, 3], [1, 3]],
        normalize_before=False,
    )
    voc = SpeechT5HifiGan(cfg)
    for m in (
        voc.modules()
    ):  # PyTorch's default init: HiFi-GAN's N(0, 0.01) left this small vocoder barely learning
        if isinstance(m, torch.nn.Conv1d | torch.nn.ConvTranspose1d):
            m.reset_parameters()
    return voc


def build_audio_text(vocab: int):
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    cfg = ClapTextConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=MAX_TOKENS + 2,
        projection_dim=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
    return ClapTextModelWithProjection(cfg)


def build_audio_unet(text_conditioning: TextConditioning = "pooled"):
    from diffusers import UNet2DConditionModel

    if text_conditioning == "tokens":  # cross-attention to the 64-wide token states, no class embedding
        cond: dict[str, Any] = {"cross_attention_dim": 64}
    else:  # no text tokens: the attention blocks attend to themselves
        cond = {
            "cross_attention_dim": (64, 128, 128),
            "class_embed_type": "simple_projection",
            "projection_class_embeddings_input_dim": 64,
            "class_embeddings_concat": True,
        }
    return UNet2DConditionModel(
        sample_size=FRAMES // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        norm_num_groups=16,
        **cond,
    )


def _init_matching(module: torch.nn.Module, path: Path) -> tuple[int, int]:
    """Copy the tensors of ``path`` (safetensors) whose name and shape match; (copied, total)."""
    from safetensors.torch import load_file

    src, own = load_file(path), module.state_dict()
    same = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(same, strict=False)
    return len(same), len(own)


class WaveStream:
    """Endless ToneWorld train clips ``[B, N_SAMPLES]`` and captions."""

    def __init__(self, seed: int) -> None:
        self.it = make_dataset(10**12, seed, "train")

    def next(self, n: int) -> tuple[torch.Tensor, list[str]]:
        waves, caps = [], []
        for _ in range(n):
            w, cap, _ = next(self.it)
            waves.append(w)
            caps.append(cap)
        return torch.from_numpy(np.stack(waves)).float(), caps


def stft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-resolution STFT magnitude loss (linear L1) at three window sizes."""
    loss = pred.new_zeros(())
    for n_fft in (128, 256, 512):
        w = torch.hann_window(n_fft, device=pred.device)
        a = torch.stft(pred, n_fft, n_fft // 4, window=w, return_complex=True).abs()
        b = torch.stft(target, n_fft, n_fft // 4, window=w, return_complex=True).abs()
        loss = loss + (a - b).abs().mean()
    return loss


def _load_vae(work: Path):
    from safetensors.torch import load_file

    vae = build_audio_vae()
    vae.load_state_dict(load_file(work / "avae" / "vae.ema.safetensors"))
    return vae.requires_grad_(False).eval()


@torch.no_grad()
def audio_latent_scale(work: Path) -> float:
    f = work / "avae" / "scale.json"
    if f.exists():
        return json.loads(f.read_text())["scaling_factor"]
    vae = _load_vae(work)
    w, _ = WaveStream(12345).next(256)
    scale = float(1.0 / vae.encode(log_mel(w, TOY_MEL).unsqueeze(1)).latent_dist.mode().std())
    f.write_text(json.dumps({"scaling_factor": scale}))
    return scale


def train_audio_stage(  # noqa: C901 (the one flat training loop, read top to bottom)
    stage: AudioStage,
    work: Path,
    minutes: float,
    batch: int = 32,
    lr: float = 5e-4,
    seed: int = 0,
    ema_decay: float = 0.999,
    log_every: int = 50,
    device: str | torch.device = "cpu",
    text_conditioning: TextConditioning = "pooled",
    init_from: Path | None = None,
) -> dict[str, Any]:
    """Train (or continue) one stage; ``text_conditioning`` and ``init_from`` concern the ``audio``
    stage (``init_from``: another run's ``audio`` checkpoint folder, read only when starting)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    tok = audio_tokenizer()
    modules: dict[str, torch.nn.Module] = {}
    if stage == "avae":
        modules["vae"] = build_audio_vae()
    elif stage == "vocoder":
        modules["vocoder"] = build_vocoder()
    else:
        vae, scale = _load_vae(work).to(device), audio_latent_scale(work)
        modules["denoiser"] = build_audio_unet(text_conditioning)
        modules["text_encoder"] = build_audio_text(len(tok))
    ckpt = work / stage
    resuming = settle_checkpoint(ckpt)
    if stage == "audio" and resuming:
        found = json.loads((ckpt / "meta.json").read_text()).get("text_conditioning", "pooled")
        if found != text_conditioning:
            raise ConfigError(
                f"{ckpt}: a {found!r}-conditioned run; continue it with text_conditioning={found!r} "
                f"(--audio-conditioning {found}) or start a new work folder"
            )
    if stage == "audio" and init_from is not None and not resuming:
        for name, m in modules.items():
            n, total = _init_matching(m, Path(init_from) / f"{name}.ema.safetensors")
            print(f"{name}: {n}/{total} tensors from {init_from}")
    for m in modules.values():
        m.to(device)
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr if stage != "vocoder" else 3e-3, weight_decay=0.0)
    ema = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    meta: dict[str, Any] = {"clips": 0, "steps": 0, "seconds": 0.0}
    if resuming:
        meta = load_state(ckpt, modules, ema, opt)
    if stage == "audio":
        meta["text_conditioning"] = text_conditioning
    stream = WaveStream(seed * 1000 + meta["steps"] + 17)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t_end = time.time() + minutes * 60
    book = Bookkeeper(
        ckpt, modules, ema, opt, meta, work / f"{stage}.log", "clips", ema_decay, log_every, 200
    )
    while time.time() < t_end:
        w, caps = stream.next(batch)
        w = w.to(device)
        feats = log_mel(w, TOY_MEL)  # [B,T,M]
        if stage == "avae":
            post = modules["vae"].encode(feats.unsqueeze(1)).latent_dist
            rec = modules["vae"].decode(post.sample()).sample
            loss = F.mse_loss(rec, feats.unsqueeze(1)) + 1e-6 * post.kl().mean()
        elif stage == "vocoder":
            out = modules["vocoder"](feats)  # [B, S]
            # a waveform loss: beeps are phase-locked (see tones.render_events), so it has a target;
            # magnitude losses alone (linear + log STFT, mel L1) left the vocoder silent on beeps
            # after 7k clips, while this fits them in a few hundred steps. The STFT term keeps the
            # energy of noise bursts, whose waveform is unpredictable (MSE alone would shrink it).
            loss = 100 * F.mse_loss(out, w) + stft_loss(out, w)
        else:
            with torch.no_grad():
                z = vae.encode(feats.unsqueeze(1)).latent_dist.mode() * scale
            caps = [c if r > 0.1 else "" for c, r in zip(caps, torch.rand(batch).tolist(), strict=True)]
            enc = tok(
                caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
            ).to(device)
            text = modules["text_encoder"](enc.input_ids, attention_mask=enc.attention_mask)
            if text_conditioning == "tokens":
                kw = {"encoder_hidden_states": text.last_hidden_state}  # [B, L, 64]
            else:
                kw = {
                    "encoder_hidden_states": None,
                    "class_labels": F.normalize(text.text_embeds, dim=-1),
                }  # [B, 64]
            eps = torch.randn_like(z)
            t = torch.randint(0, 1000, (batch,), device=device)
            pred = modules["denoiser"](ddpm.add_noise(z, eps, t), t, **kw).sample
            loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        book.step(loss, batch)
    return book.save()


def export_audio_pipeline(work: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    import diffusers
    from safetensors.torch import load_file

    tok = audio_tokenizer()
    vae = _load_vae(work)
    vae.register_to_config(scaling_factor=audio_latent_scale(work))
    voc = build_vocoder()
    voc.load_state_dict(load_file(work / "vocoder" / "vocoder.ema.safetensors"))
    cond = json.loads((work / "audio" / "meta.json").read_text()).get("text_conditioning", "pooled")
    unet = build_audio_unet(cond)
    unet.load_state_dict(load_file(work / "audio" / "denoiser.ema.safetensors"))
    te = build_audio_text(len(tok))
    te.load_state_dict(load_file(work / "audio" / "text_encoder.ema.safetensors"))
    sched = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = diffusers.AudioLDMPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, vocoder=voc
    )
    pipe.to(dtype).save_pretrained(str(out), safe_serialization=True)
    (out / "diffalign.json").write_text(
        json.dumps(
            {
                "mel": TOY_MEL.to_dict(),
                "text_conditioning": cond,
                "call_defaults": {"audio_length_in_s": N_SAMPLES / SR},
            }
        )
    )
    return out
