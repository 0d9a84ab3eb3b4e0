"""Toy reward models for ShapesWorld: tiny ``transformers.CLIPModel``s trained contrastively.

They stand in for PickScore/HPS: trained on ShapesWorld train images and captions only (never on
judge outputs), with in-batch negatives plus hard negatives (the same scene described with one
thing changed: colour, count, relation, swapped attributes). Saved as ordinary CLIPModel folders
(safetensors + tokenizer + preprocessor config), so they load through ``diffalign.rewards.PickScore``
exactly like real checkpoints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .pretrain import MAX_TOKENS, tokenizer
from .shapes import make_dataset, perturb_metadata

VARIANTS = {
    "toy-clip-a": {"patch_size": 4, "hidden": 64, "layers": 3, "seed": 0},
    "toy-clip-b": {"patch_size": 8, "hidden": 96, "layers": 2, "seed": 1},
}


def build_clip(variant: str):
    from transformers import CLIPConfig, CLIPModel

    v = VARIANTS[variant]
    tok = tokenizer()
    h = v["hidden"]
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": h,
            "intermediate_size": 2 * h,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": MAX_TOKENS,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.eos_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": v["patch_size"],
            "hidden_size": h,
            "intermediate_size": 2 * h,
            "num_hidden_layers": v["layers"],
            "num_attention_heads": 4,
        },
        projection_dim=64,
    )
    torch.manual_seed(v["seed"])
    return CLIPModel(cfg), tok


def _features(out):
    """transformers 5 returns a model output whose ``pooler_output`` is the projected embedding;
    4.x a tensor."""
    return getattr(out, "pooler_output", out)


def train_toy_reward(
    variant: str, out: Path, minutes: float, batch: int = 64, negatives: int = 3, lr: float = 1e-3
) -> dict:
    model, tok = build_clip(variant)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    seed = VARIANTS[variant]["seed"]
    it = make_dataset(10**12, 100 + seed, "train", 32)
    rng = np.random.default_rng(seed)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    t_end, steps, images, losses = time.time() + 60 * minutes, 0, 0, []
    while time.time() < t_end:
        imgs, caps, negs = [], [], []
        for _ in range(batch):
            img, cap, md = next(it)
            imgs.append(img)
            caps.append(cap)
            negs += [perturb_metadata(md, rng)["prompt"] for _ in range(negatives)]
        x = (torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255 - mean) / 0.5
        texts = caps + negs
        ids = tok(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        img = F.normalize(_features(model.get_image_features(pixel_values=x)), dim=-1)
        txt = F.normalize(
            _features(model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)),
            dim=-1,
        )
        scale = model.logit_scale.exp().clamp(max=100)
        pos, neg = txt[:batch], txt[batch:].view(batch, negatives, -1)
        # image -> text over every caption in the batch (identical captions all count as positives)
        # + own hard negatives
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        logits_batch = scale * img @ pos.T  # [B,B]
        loss_i = (
            -(
                torch.log_softmax(
                    torch.cat([logits_batch, scale * torch.einsum("bd,bnd->bn", img, neg)], 1), 1
                )[:, :batch]
                * same
                / same.sum(1, keepdim=True)
            )
            .sum(1)
            .mean()
        )
        loss_t = -(torch.log_softmax(logits_batch.T, 1) * same / same.sum(1, keepdim=True)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps, images = steps + 1, images + batch
        losses.append(float(loss.detach()))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": 32},
                "crop_size": {"height": 32, "width": 32},
                "do_resize": True,
                "do_center_crop": True,
                "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "resample": 3,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
            },
            indent=2,
        )
    )
    meta = {
        "variant": variant,
        "steps": steps,
        "images": images,
        "minutes": minutes,
        "final_loss": float(np.mean(losses[-20:])),
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2))
    return meta
