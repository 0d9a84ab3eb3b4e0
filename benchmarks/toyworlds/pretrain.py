"""Pretraining the ShapesWorld toy models (``diffalign toy pretrain``).

Three stages, each time-budgeted and checkpointed so a long pretraining can run in the
background and continue in a later session:

1. ``vae``:   a tiny ``AutoencoderKL`` (32x32x3 <-> 16x16x4) on ShapesWorld renders;
2. ``sd``:    ``UNet2DConditionModel`` (epsilon) + a jointly trained ``CLIPTextModel``;
3. ``sd3``:   ``SD3Transformer2DModel`` (rectified flow, logit-normal t) + two jointly trained
              ``CLIPTextModelWithProjection`` encoders.

Captions are dropped 10% of the time (classifier-free guidance). Weights are kept with an EMA,
and the EMA weights are what is exported as a diffusers pipeline folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .shapes import make_dataset

Kind = Literal["vae", "sd", "sd3"]
RES, LATENT = 32, 16
WORDS = (
    "a an photo of and left right above below red yellow green blue purple black circle circles square "
    "squares triangle triangles one two three four"
).split()
MAX_TOKENS = 16


def tokenizer(merges_from: Literal["pieces", "letters"] = "pieces"):
    from ...models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(WORDS, model_max_length=MAX_TOKENS, merges_from=merges_from)


def work_tokenizer(saved: Path, make: Callable[[Literal["pieces", "letters"]], Any], started: bool) -> Any:
    """The tokenizer of a pretraining run, kept at ``saved`` so that a run resumes and exports with the
    vocabulary it started with. A run that started before runs saved theirs (``started``: it has
    checkpoints) was made with the old "letters" merge construction, which is rebuilt for it."""
    from transformers import CLIPTokenizer

    if saved.is_dir():
        return CLIPTokenizer.from_pretrained(saved)
    tok = make("letters" if started else "pieces")
    tok.save_pretrained(str(saved))
    return tok


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RES,
        scaling_factor=1.0,
    )


def build_text(projection: bool, vocab: int, eos: int, bos: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=64,
        eos_token_id=eos,
        bos_token_id=bos,
        pad_token_id=eos,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def build_denoiser(kind: Kind):
    import diffusers

    if kind == "sd":
        return diffusers.UNet2DConditionModel(
            # no attention at 16x16 (256 tokens): 3x the throughput of attending at every level
            sample_size=LATENT,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=4,
            norm_num_groups=16,
        )
    return diffusers.SD3Transformer2DModel(
        sample_size=LATENT,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=128,
        caption_projection_dim=128,
        pooled_projection_dim=128,
        pos_embed_max_size=LATENT,
    )


class Stream:
    """Endless ShapesWorld train batches: images in [-1,1] ``[B,3,32,32]`` and captions."""

    def __init__(self, seed: int) -> None:
        self.it = make_dataset(10**12, seed, "train", RES)

    def next(self, n: int) -> tuple[torch.Tensor, list[str]]:
        imgs, caps = [], []
        for _ in range(n):
            img, cap, _ = next(self.it)
            imgs.append(img)
            caps.append(cap)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x, caps


def _save_state(
    path: Path, modules: dict[str, torch.nn.Module], ema: dict[str, dict], opt, meta: dict
) -> None:
    """Write the checkpoint to ``path.tmp`` (``meta.json`` last), then swap it in: ``path`` -> ``path.old``,
    ``path.tmp`` -> ``path``, drop ``path.old``. A crash at any point leaves one complete checkpoint,
    which :func:`settle_checkpoint` puts back at ``path``."""
    import shutil

    from safetensors.torch import save_file

    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if tmp.exists():  # a save interrupted before: its meta.json may be stale
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, m in modules.items():
        save_file({k: v.cpu().contiguous() for k, v in m.state_dict().items()}, tmp / f"{name}.safetensors")
        save_file({k: v.cpu().contiguous() for k, v in ema[name].items()}, tmp / f"{name}.ema.safetensors")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "meta.json").write_text(json.dumps(meta))  # the mark of a complete checkpoint
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def settle_checkpoint(path: Path) -> bool:
    """Finish a :func:`_save_state` that a crash interrupted; True when ``path`` holds a checkpoint."""
    import shutil

    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if not (path / "meta.json").exists():
        src = tmp if (tmp / "meta.json").exists() else old if (old / "meta.json").exists() else None
        if src is not None:
            if path.exists():
                shutil.rmtree(path)
            src.rename(path)
    if (path / "meta.json").exists():
        shutil.rmtree(old, ignore_errors=True)
    return (path / "meta.json").exists()


def load_state(path: Path, modules: dict[str, torch.nn.Module], ema: dict[str, dict], opt) -> dict:
    from safetensors.torch import load_file

    for name, m in modules.items():
        m.load_state_dict(load_file(path / f"{name}.safetensors"))
        own = m.state_dict()  # EMA copies live where the module does (a GPU run resumes on a CPU and back)
        ema[name] = {k: v.to(own[k].device) for k, v in load_file(path / f"{name}.ema.safetensors").items()}
    opt.load_state_dict(
        torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    )  # moved to the params
    return json.loads((path / "meta.json").read_text())


@torch.no_grad()
def _ema_update(ema: dict[str, dict], modules: dict[str, torch.nn.Module], decay: float) -> None:
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            if v.dtype.is_floating_point:
                ema[name][k].lerp_(v, 1 - decay)
            else:
                ema[name][k].copy_(v)


class Bookkeeper:
    """What every pretraining stage does after its optimiser step: EMA update (fast decay for the
    first 200 steps), the step / sample counters, a JSONL loss log every ``log_every`` steps and an
    atomic checkpoint every ``save_every`` steps and at the end (wall time accumulated in ``meta``)."""

    def __init__(
        self,
        ckpt: Path,
        modules: dict[str, torch.nn.Module],
        ema: dict[str, dict],
        opt,
        meta: dict,
        log_path: Path,
        unit: str,
        ema_decay: float,
        log_every: int,
        save_every: int,
    ) -> None:
        self.ckpt, self.modules, self.ema, self.opt, self.meta = ckpt, modules, ema, opt, meta
        self.unit, self.ema_decay, self.log_every, self.save_every = unit, ema_decay, log_every, save_every
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = log_path.open("a")
        self.losses: list[float] = []
        self.t_start = time.time()

    def step(self, loss: torch.Tensor, n: int) -> None:
        meta = self.meta
        _ema_update(self.ema, self.modules, self.ema_decay if meta["steps"] > 200 else 0.9)
        meta["steps"] += 1
        meta[self.unit] += n
        self.losses.append(float(loss.detach()))
        if meta["steps"] % self.log_every == 0:
            rec = {"step": meta["steps"], self.unit: meta[self.unit], "loss": float(np.mean(self.losses))}
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
            self.losses = []
        if meta["steps"] % self.save_every == 0:
            self.save()

    def save(self) -> dict:
        self.meta["seconds"] += time.time() - self.t_start
        self.t_start = time.time()
        _save_state(self.ckpt, self.modules, self.ema, self.opt, self.meta)
        return self.meta


def train_stage(
    kind: Kind,
    work: Path,
    minutes: float,
    batch: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    ema_decay: float = 0.999,
    log_every: int = 50,
    device: str | torch.device = "cpu",
    restart_optimizer: bool = False,
) -> dict[str, Any]:
    """Train (or continue) one stage for ``minutes`` of wall time; checkpoint to ``work/kind``.
    ``device``: where the networks train (images are rendered on the CPU); checkpoints are device-free.
    ``restart_optimizer``: continue from the checkpoint's EMA weights (live weights := EMA) with a
    fresh AdamW, as toy-sd v2 was made from v1."""
    torch.manual_seed(seed)
    tok = work_tokenizer(
        work / "tokenizer", tokenizer, any([settle_checkpoint(work / k) for k in ("sd", "sd3")])
    )
    modules: dict[str, torch.nn.Module] = {}
    if kind == "vae":
        modules["vae"] = build_vae()
    else:
        vae = build_vae()
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(work / "vae" / "vae.ema.safetensors"))
        vae.requires_grad_(False).eval().to(device)
        scale = latent_scale(work)
        modules["denoiser"] = build_denoiser(kind)
        modules["text_encoder"] = build_text(kind == "sd3", len(tok), tok.eos_token_id, tok.bos_token_id)
        if kind == "sd3":
            modules["text_encoder_2"] = build_text(True, len(tok), tok.eos_token_id, tok.bos_token_id)
    for m in modules.values():
        m.to(device)
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    ckpt = work / kind
    meta = {"images": 0, "steps": 0, "seconds": 0.0}
    if settle_checkpoint(ckpt):
        meta = load_state(ckpt, modules, ema, opt)
        if restart_optimizer:
            for n, m in modules.items():
                m.load_state_dict(ema[n])
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    stream = Stream(seed * 1000 + meta["steps"])  # new images after a resume
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t_end = time.time() + minutes * 60
    book = Bookkeeper(
        ckpt, modules, ema, opt, meta, work / f"{kind}.log", "images", ema_decay, log_every, 200
    )
    while time.time() < t_end:
        x, caps = stream.next(batch)
        x = x.to(device)
        if kind == "vae":
            post = modules["vae"].encode(x).latent_dist
            rec = modules["vae"].decode(post.sample()).sample
            loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        else:
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mode() * scale
            caps = [c if r > 0.1 else "" for c, r in zip(caps, torch.rand(batch).tolist(), strict=True)]
            ids = tok(
                caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
            ).input_ids.to(device)
            eps = torch.randn_like(z)
            if kind == "sd":
                t = torch.randint(0, 1000, (batch,), device=device)
                ehs = modules["text_encoder"](ids).last_hidden_state
                pred = modules["denoiser"](ddpm.add_noise(z, eps, t), t, encoder_hidden_states=ehs).sample
                loss = F.mse_loss(pred, eps)
            else:
                sig = torch.sigmoid(torch.randn(batch, device=device)).view(-1, 1, 1, 1)
                o1 = modules["text_encoder"](ids, output_hidden_states=True)
                o2 = modules["text_encoder_2"](ids, output_hidden_states=True)
                # as StableDiffusion3Pipeline.encode_prompt: penultimate hidden states concatenated,
                # padded to 128
                ehs = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1)
                ehs = F.pad(ehs, (0, 128 - ehs.shape[-1]))
                pooled = torch.cat([o1.text_embeds, o2.text_embeds], -1)
                xt = (1 - sig) * z + sig * eps
                pred = modules["denoiser"](
                    hidden_states=xt,
                    timestep=sig.flatten() * 1000,
                    encoder_hidden_states=ehs,
                    pooled_projections=pooled,
                ).sample
                loss = F.mse_loss(pred, eps - z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        book.step(loss, batch)
    return book.save()


@torch.no_grad()
def latent_scale(work: Path) -> float:
    """1 / std of the VAE's latents on ShapesWorld (stored once): the denoisers see unit-variance latents,
    the exported VAE carries it as ``scaling_factor`` as in SD."""
    f = work / "vae" / "scale.json"
    if f.exists():
        return json.loads(f.read_text())["scaling_factor"]
    from safetensors.torch import load_file

    vae = build_vae()
    vae.load_state_dict(load_file(work / "vae" / "vae.ema.safetensors"))
    x, _ = Stream(12345).next(512)
    scale = float(1.0 / vae.encode(x).latent_dist.mode().std())
    f.write_text(json.dumps({"scaling_factor": scale}))
    return scale


def export_pipeline(
    kind: Literal["sd", "sd3"], work: Path, out: Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Write the EMA weights of a stage as a diffusers pipeline folder (safetensors; the shipped
    models are stored in fp16 to halve their size, loaders upcast to fp32)."""
    import diffusers
    from safetensors.torch import load_file

    tok = work_tokenizer(work / "tokenizer", tokenizer, started=True)
    vae = build_vae()
    vae.load_state_dict(load_file(work / "vae" / "vae.ema.safetensors"))
    vae.register_to_config(scaling_factor=latent_scale(work), shift_factor=0.0)
    den = build_denoiser(kind)
    den.load_state_dict(load_file(work / kind / "denoiser.ema.safetensors"))
    te = build_text(kind == "sd3", len(tok), tok.eos_token_id, tok.bos_token_id)
    te.load_state_dict(load_file(work / kind / "text_encoder.ema.safetensors"))
    if kind == "sd":
        sched = diffusers.DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="epsilon",
        )
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=tok,
            unet=den,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        te2 = build_text(True, len(tok), tok.eos_token_id, tok.bos_token_id)
        te2.load_state_dict(load_file(work / kind / "text_encoder_2.ema.safetensors"))
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=den,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0),
            vae=vae,
            text_encoder=te,
            tokenizer=tok,
            text_encoder_2=te2,
            tokenizer_2=tok,
            text_encoder_3=None,
            tokenizer_3=None,
        )
    pipe.to(dtype).save_pretrained(str(out), safe_serialization=True)
    if kind == "sd3":  # trained without T5 tokens: sample the same way
        (out / "diffalign.json").write_text(json.dumps({"call_defaults": {"max_sequence_length": 0}}))
    return out
