"""Pretraining the ShapesWorld-video base model (``toy-video``): AnimateDiff on top of ``toy-sd``.

The image model already draws ShapesWorld objects; what a video model adds is consistent
content across frames and motion. So, as AnimateDiff (Guo et al. 2024) does with SD1.5, the
toy-sd ``UNet2DConditionModel`` becomes a ``UNetMotionModel`` (``from_unet2d`` + a fresh
``MotionAdapter`` whose temporal attention starts as the identity), and everything trains on
ShapesWorld-video clips: motion modules at ``lr``, the pretrained spatial layers and the text
encoder at ``lr/4`` (unlike AnimateDiff, the spatial layers are not frozen: motion words must
reach the features the temporal layers read). ``freeze_spatial=True`` is AnimateDiff's recipe
instead: the spatial layers stay toy-sd's, only the motion modules (``lr``) and the text encoder
(``lr/10``) train, about 3x faster per clip on a CPU. The tokenizer gains the video words; their
embeddings start at the mean of the existing ones, every other row is copied by token string.

Frames go through the shared toy VAE one by one (the ``AnimateDiffPipeline`` decodes the same
way), latents ``[B, 4, F, 16, 16]``, epsilon prediction, 10% caption dropout, EMA weights
exported as an ``AnimateDiffPipeline`` folder. Checkpointed and resumable like ``pretrain.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .pretrain import MAX_TOKENS, WORDS, Bookkeeper, load_state, settle_checkpoint, work_tokenizer
from .video import FRAMES, make_dataset

VIDEO_WORDS = ("moving", "up", "down", "then", "appearing")


def video_tokenizer(merges_from: Literal["pieces", "letters"] = "pieces"):
    from ...models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(
        WORDS + list(VIDEO_WORDS), model_max_length=MAX_TOKENS, merges_from=merges_from
    )


def motion_adapter():
    from diffusers import MotionAdapter

    return MotionAdapter(
        block_out_channels=(32, 64, 128),
        motion_layers_per_block=1,
        motion_num_attention_heads=4,
        motion_norm_num_groups=16,
        motion_max_seq_length=16,
        use_motion_mid_block=False,
    )


def extend_text_encoder(
    text_encoder: torch.nn.Module, old_tok: Any, new_tok: Any, known_words: Iterable[str] = ()
) -> torch.nn.Module:
    """A copy of ``text_encoder`` for ``new_tok``: rows copied by token string. A word of ``known_words``
    (words the old model was trained on) that is one token in ``new_tok`` but several in ``old_tok``
    (e.g. "triangle" before the tokenizer fix) starts at the mean of its old pieces' rows; any other
    new token at the mean of all rows."""
    import copy

    te = copy.deepcopy(text_encoder)
    old_emb = text_encoder.get_input_embeddings().weight.detach()
    old_vocab = old_tok.get_vocab()
    new_vocab = new_tok.get_vocab()
    emb = old_emb.mean(0, keepdim=True).repeat(len(new_vocab), 1)
    for s, i in new_vocab.items():
        if s in old_vocab:
            emb[i] = old_emb[old_vocab[s]]
    for w in known_words:
        if (s := f"{w.lower()}</w>") in new_vocab and s not in old_vocab:
            emb[new_vocab[s]] = old_emb[old_tok(w.lower(), add_special_tokens=False).input_ids].mean(0)
    te.resize_token_embeddings(len(new_vocab))
    te.get_input_embeddings().weight.data.copy_(emb)
    te.config.eos_token_id = new_tok.eos_token_id
    te.config.bos_token_id = new_tok.bos_token_id
    te.config.pad_token_id = new_tok.eos_token_id
    if hasattr(te, "eos_token_id"):  # transformers 5 reads the pooling position from the module
        te.eos_token_id = new_tok.eos_token_id
    return te


def build_modules(base: str | Path, tok: Any = None) -> tuple[dict[str, torch.nn.Module], Any, Any]:
    """(trainable modules, frozen VAE, tokenizer) initialised from the toy-sd folder ``base``; the
    text encoder is extended to ``tok`` (default: a fresh :func:`video_tokenizer`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = Path(base)
    unet2d = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32)
    unet = UNetMotionModel.from_unet2d(unet2d, motion_adapter())
    old_tok = CLIPTokenizer.from_pretrained(base / "tokenizer")
    tok = tok if tok is not None else video_tokenizer()
    te = extend_text_encoder(
        CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=torch.float32), old_tok, tok, WORDS
    )
    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32).requires_grad_(False).eval()
    return {"denoiser": unet, "text_encoder": te}, vae, tok


class ClipStream:
    """Endless ShapesWorld-video train clips in [-1,1] ``[B,F,3,32,32]`` and captions."""

    def __init__(self, seed: int) -> None:
        self.it = make_dataset(10**12, seed, "train")

    def next(self, n: int) -> tuple[torch.Tensor, list[str]]:
        clips, caps = [], []
        for _ in range(n):
            clip, cap, _ = next(self.it)
            clips.append(clip)
            caps.append(cap)
        return torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 127.5 - 1, caps


@torch.no_grad()
def encode_clips(vae: Any, x: torch.Tensor) -> torch.Tensor:
    """``[B,F,3,H,W]`` in [-1,1] -> scaled latents ``[B,C,F,h,w]`` (frame by frame)."""
    B, Fr = x.shape[:2]
    z = vae.encode(x.flatten(0, 1)).latent_dist.mode() * vae.config.scaling_factor
    return z.unflatten(0, (B, Fr)).permute(0, 2, 1, 3, 4)


def train_video(
    work: Path,
    base: str | Path,
    minutes: float,
    batch: int = 16,
    lr: float = 4e-4,
    seed: int = 0,
    ema_decay: float = 0.998,
    log_every: int = 25,
    device: str | torch.device = "cpu",
    freeze_spatial: bool = False,
) -> dict[str, Any]:
    """Train (or continue) the video model for ``minutes``; checkpoints in ``work/video``."""
    from diffusers import DDPMScheduler

    from ...config import ConfigError

    ckpt = work / "video"
    resuming = settle_checkpoint(ckpt)
    if resuming:  # the optimiser's parameter groups differ between the two recipes
        found = json.loads((ckpt / "meta.json").read_text()).get("freeze_spatial", False)
        if found != freeze_spatial:
            raise ConfigError(
                f"{ckpt}: a run with freeze_spatial={found}; "
                f"continue it the same way or start a new work folder"
            )
    tok = work_tokenizer(work / "video.tokenizer", video_tokenizer, resuming)
    torch.manual_seed(seed)
    modules, vae, tok = build_modules(base, tok)
    for m in (*modules.values(), vae):
        m.to(device)
    unet = modules["denoiser"]
    motion = [p for n, p in unet.named_parameters() if "motion_modules" in n]
    motion_ids = {id(p) for p in motion}
    spatial = [p for p in unet.parameters() if id(p) not in motion_ids]
    text = list(modules["text_encoder"].parameters())
    if freeze_spatial:
        for p in spatial:
            p.requires_grad_(False)
        groups = [{"params": motion, "lr": lr}, {"params": text, "lr": lr / 10}]
    else:
        groups = [{"params": motion, "lr": lr}, {"params": spatial + text, "lr": lr / 4}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    ema = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    meta: dict[str, Any] = {"clips": 0, "steps": 0, "seconds": 0.0}
    if resuming:
        meta = load_state(ckpt, modules, ema, opt)
    meta["freeze_spatial"] = freeze_spatial
    stream = ClipStream(seed * 1000 + meta["steps"])
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t_end = time.time() + minutes * 60
    book = Bookkeeper(ckpt, modules, ema, opt, meta, work / "video.log", "clips", ema_decay, log_every, 100)
    while time.time() < t_end:
        x, caps = stream.next(batch)
        z = encode_clips(vae, x.to(device))  # [B,4,F,16,16]
        caps = [c if r > 0.1 else "" for c, r in zip(caps, torch.rand(batch).tolist(), strict=True)]
        ids = tok(
            caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        ehs = modules["text_encoder"](ids).last_hidden_state.repeat_interleave(
            FRAMES, 0
        )  # one copy per frame
        eps = torch.randn_like(z)
        t = torch.randint(0, 1000, (batch,), device=device)
        pred = unet(ddpm.add_noise(z, eps, t), t, encoder_hidden_states=ehs).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        book.step(loss, batch)
    return book.save()


def export_video_pipeline(
    work: Path, base: str | Path, out: Path, dtype: torch.dtype = torch.float32
) -> Path:
    """EMA weights -> an ``AnimateDiffPipeline`` folder (DDIM scheduler, like toy-sd)."""
    import diffusers
    from safetensors.torch import load_file

    modules, vae, tok = build_modules(
        base, work_tokenizer(work / "video.tokenizer", video_tokenizer, started=True)
    )
    for name, m in modules.items():
        m.load_state_dict(load_file(work / "video" / f"{name}.ema.safetensors"))
    sched = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = diffusers.AnimateDiffPipeline(
        vae=vae,
        text_encoder=modules["text_encoder"],
        tokenizer=tok,
        unet=modules["denoiser"],
        motion_adapter=None,
        scheduler=sched,
    )
    pipe.to(dtype).save_pretrained(str(out), safe_serialization=True)
    (out / "diffalign.json").write_text(json.dumps({"call_defaults": {"num_frames": FRAMES}}))
    return out
