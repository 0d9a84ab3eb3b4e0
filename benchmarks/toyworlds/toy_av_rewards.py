"""Toy reward models for the two time-based worlds, trained contrastively like ``toy_rewards.py``.

- ``toy-video-clip`` (ShapesWorld-video): an *early-fusion* ``transformers.CLIPModel``: the 8 frames
  of a 32x32 clip are stacked along channels (frame-major, ``num_channels = 3 * FRAMES = 24``), so
  the patch embedding already sees how a shape moves; scored by the ``video_clip`` reward
  (:class:`diffalign.rewards.video.VideoCLIPScore`). Motion direction, which no frame-level reward
  can see, is what most hard negatives change (``video.perturb_metadata``: 60%).
- ``toy-clap`` (ToneWorld): a small ``ClapModel`` (HTSAT-style Swin audio tower + RoBERTa text
  tower) at 8 kHz, trained on the log-mel features of its own saved ``ClapFeatureExtractor``
  and scored by the ``clap`` reward (:class:`diffalign.rewards.clap.CLAPScore`). Hard negatives
  from ``tones.perturb_metadata`` (swapped order, another kind, count or pitch).

Both train with InfoNCE over the batch (identical captions all count as positives) plus, for
each clip, ``negatives`` distinct hard-negative captions of the same scene with one thing changed.
By default (``strict_negatives``) hard negatives are kept inside the train split, so no held-out
caption is ever seen in training, not even as a negative (``toy_rewards.py`` draws from both
splits; with held-out captions as negatives the held-out top-1 drops, they are pushed away from
everything). Training is time-budgeted (``minutes``); the result is saved like a hub checkpoint
(safetensors + tokenizer + preprocessor config) and evaluated through the reward class on
held-out-split clips: top-1 accuracy of the true caption among itself and 3 perturbed ones.

What the held-out split can measure differs between the worlds. Video: a held-out prompt pairs a
colour with a direction never seen together, and the true caption's direction-perturbed rivals are
train captions; the toy video CLIP composes the two. Audio: the reverse of a held-out ``order``
sequence is mostly a train caption (low then high <-> high then low), which a reward trained on the
train split alone tends to prefer; the held-out order score is reported as is, and
``two_way_order_pairwise`` measures order hearing where it is learnable: fresh clips of train
sequences whose reverse is a train caption too.

Audio geometry: the extractor keeps ``max_length_s = 1`` (8000 samples; an integer, as the
extractor's padding code needs). A ToneWorld clip has 8192 samples, so the extractor crops 192
samples (24 ms) in total off its two ends; every ToneWorld event lies at least ``EDGE_S`` = 30 ms
from either end, so the crop removes only silence and every event of the 1.024 s clip reaches the
model (:func:`clap_coverage_ok` checks this). Log-mel: 32 bins, 64 ms window, hop 32 ms, so
``1 + 8000 // 256 = 32`` frames; with ``spec_size = num_mel_bins = 32`` HTSAT's ``freq_ratio`` is 1,
so the spectrogram is not folded: a 32x32 image with time along one axis, 4x4 patches, a Swin stage
on the 8x8 grid (windows of 4) and one on the 4x4 grid, which is a single window: every part of
the clip attends to every other (relative position bias) before pooling, which is what event
order needs. A quarter of each batch is extra ``order`` clips (order is the slowest thing learnt).

Run: ``python -m diffalign.benchmarks.toyworlds.toy_av_rewards {video,clap} OUT --minutes M [--stats FILE]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import tones, video
from .pretrain import MAX_TOKENS

VIDEO_CLIP = {"patch_size": 4, "hidden": 64, "layers": 3, "text_layers": 2, "projection": 64, "seed": 0}
CLAP = {
    "sampling_rate": tones.SR,
    "num_mel_bins": 32,
    "hop_length": 256,
    "fft_window_size": 512,
    "max_length_s": 1,
    "spec_size": 32,
    "stem": 32,
    "depths": (2, 2),
    "heads": 4,
    "text_hidden": 64,
    "text_layers": 2,
    "projection": 64,
    "seed": 0,
}


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is the projected embedding;
    4.x a tensor."""
    return getattr(out, "pooler_output", out)


def info_nce(
    emb: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    captions: list[str],
    scale_fwd: torch.Tensor,
    scale_back: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE with hard negatives, all embeddings L2-normalised.

    ``emb`` [B,D] (clips), ``pos`` [B,D] (their captions), ``neg`` [B,N,D] (each clip's own hard
    negatives). Clip -> text: softmax over every caption of the batch plus the clip's own hard
    negatives; text -> clip: over the batch. Identical captions all count as positives."""
    B = emb.shape[0]
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    logits = emb @ pos.T  # [B,B]
    hard = torch.einsum("bd,bnd->bn", emb, neg)
    loss_c = -(torch.log_softmax(scale_fwd * torch.cat([logits, hard], 1), 1)[:, :B] * target).sum(1).mean()
    loss_t = -(torch.log_softmax(scale_back * logits.T, 1) * target).sum(1).mean()
    return (loss_c + loss_t) / 2


def hard_negatives(perturb, md: dict[str, Any], rng: np.random.Generator, k: int, in_train=None) -> list[str]:
    """``k`` hard-negative captions of ``md`` from ``perturb(md, rng)``, distinct where the world
    has that many (so an ``order`` clip gets its swapped order, its first and its second kind
    changed); with ``in_train`` given, only captions of the train split (a few draws, then any)."""
    out: list[str] = []
    for _ in range(k):
        for _ in range(20):
            m = perturb(md, rng)
            if (in_train is None or in_train(m)) and m["prompt"] not in out:
                break
        out.append(m["prompt"])
    return out


def _save_stats(out: Path, stats: dict[str, Any]) -> None:
    (out / "training.json").write_text(json.dumps(stats, indent=2))


def top1_accuracy(scores: np.ndarray) -> float:
    """``scores`` [n, 1 + k], the true caption first: the fraction of rows where it beats every other
    (strictly, so a tie with a duplicated negative counts as a miss)."""
    return float(np.mean(scores[:, 0] > scores[:, 1:].max(1)))


# ----------------------------------------------------------------------------- video


def build_video_clip(cfg: dict[str, Any] = VIDEO_CLIP):
    """(early-fusion ``CLIPModel`` with ``num_channels = 3 * FRAMES``, CLIP BPE tokenizer of the
    video words)."""
    from transformers import CLIPConfig, CLIPModel

    from .pretrain_video import video_tokenizer

    tok = video_tokenizer()
    h = cfg["hidden"]
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": h,
            "intermediate_size": 2 * h,
            "num_hidden_layers": cfg["text_layers"],
            "num_attention_heads": 4,
            "max_position_embeddings": MAX_TOKENS,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.eos_token_id,
        },
        vision_config={
            "image_size": video.RES,
            "patch_size": cfg["patch_size"],
            "num_channels": 3 * video.FRAMES,
            "hidden_size": h,
            "intermediate_size": 2 * h,
            "num_hidden_layers": cfg["layers"],
            "num_attention_heads": 4,
        },
        projection_dim=cfg["projection"],
    )
    torch.manual_seed(cfg["seed"])
    return CLIPModel(config), tok


def video_preprocessor_config() -> dict[str, Any]:
    """``preprocessor_config.json`` of the toy video CLIP: size/crop 32, mean/std 0.5 (read per frame)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": video.RES},
        "crop_size": {"height": video.RES, "width": video.RES},
        "do_resize": True,
        "do_center_crop": True,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
    }


def clips_to_pixels(clips: np.ndarray) -> torch.Tensor:
    """uint8 ``[B,F,H,W,3]`` -> the fused model input ``[B,3F,H,W]``, normalised with mean/std 0.5."""
    x = torch.from_numpy(np.ascontiguousarray(clips)).permute(0, 1, 4, 2, 3).float() / 255
    return ((x - 0.5) / 0.5).flatten(1, 2)


def train_toy_video_clip(
    out: str | Path,
    minutes: float,
    batch: int = 64,
    negatives: int = 3,
    lr: float = 1e-3,
    eval_clips: int = 200,
    strict_negatives: bool = True,
    fresh: int = 32,
    pool: int = 4096,
) -> dict[str, Any]:
    """Train the early-fusion toy video CLIP for ``minutes`` and save it to ``out``; returns the stats
    (including the held-out top-1 accuracy, see :func:`evaluate_video_reward`)."""
    out = Path(out)
    cfg = VIDEO_CLIP
    model, tok = build_video_clip(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    it = video.make_dataset(10**12, 200 + cfg["seed"], "train")
    rng = np.random.default_rng(cfg["seed"])

    def in_train(m):
        return video._in_split(m, "train")

    check = in_train if strict_negatives else None
    # rendering costs about as much as a step: each batch is ``fresh`` new clips plus clips drawn
    # from a pool of the last ``pool`` ones (new hard negatives every time)
    seen: list[tuple[np.ndarray, str, dict[str, Any]]] = []

    t0 = time.time()
    t_end, steps, clips_seen, rendered, losses = t0 + 60 * minutes, 0, 0, 0, []
    while time.time() < t_end:
        new = [next(it) for _ in range(fresh if len(seen) >= batch else batch)]
        old = (
            [seen[i] for i in rng.choice(len(seen), batch - len(new), replace=False)]
            if len(new) < batch
            else []
        )
        seen = (seen + new)[-pool:]
        rendered += len(new)
        clips, caps, negs = [], [], []
        for clip, cap, md in new + old:
            clips.append(clip)
            caps.append(cap)
            negs += hard_negatives(video.perturb_metadata, md, rng, negatives, check)
        x = clips_to_pixels(np.stack(clips))
        ids = tok(caps + negs, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        emb = F.normalize(_pooled(model.get_image_features(pixel_values=x)), dim=-1)
        txt = F.normalize(
            _pooled(model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)),
            dim=-1,
        )
        scale = model.logit_scale.exp().clamp(max=100)
        loss = info_nce(emb, txt[:batch], txt[batch:].view(batch, negatives, -1), caps, scale, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps, clips_seen = steps + 1, clips_seen + batch
        losses.append(float(loss.detach()))
    train_s = time.time() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(video_preprocessor_config(), indent=2))
    stats: dict[str, Any] = {
        "model": "toy-video-clip",
        "steps": steps,
        "clips": clips_seen,
        "rendered_clips": rendered,
        "minutes": minutes,
        "train_seconds": round(train_s, 1),
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "strict_negatives": strict_negatives,
        **cfg,
    }
    stats |= evaluate_video_reward(out, n=eval_clips)
    _save_stats(out, stats)
    return stats


def _other_direction(md: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    m = md["objects"][0]
    d = str(rng.choice([d for d in video.DIRECTIONS if d != m["motion"]]))
    other = (md["objects"][1]["color"], md["objects"][1]["class"]) if md["tag"] == "appear" else None
    return video.build_metadata(md["tag"], (m["color"], m["class"], d), other)


def evaluate_video_reward(
    path: str | Path, n: int = 200, seed: int = 1000, negatives: int = 3
) -> dict[str, float]:
    """Held-out evaluation through the ``video_clip`` reward, on ``n`` clips of
    ``video.make_dataset(n, seed, "heldout")``:

    - ``heldout_top1``: the true caption scores above all of ``negatives`` captions from
      ``video.perturb_metadata`` (direction, colour or shape changed);
    - ``heldout_direction_pairwise``: the true caption beats the same caption with another
      (random) direction of motion."""
    from diffalign.rewards.video import VideoCLIPScore

    reward = VideoCLIPScore(str(path), batch_size=50)
    rng = np.random.default_rng([seed, 1])
    clips, cands, dirs = [], [], []
    for clip, cap, md in video.make_dataset(n, seed, "heldout"):
        clips.append(clip)
        cands.append([cap] + [video.perturb_metadata(md, rng)["prompt"] for _ in range(negatives)])
        dirs.append(_other_direction(md, rng)["prompt"])
    x = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 255
    scores = np.stack([reward(x, [c[k] for c in cands]).scores.numpy() for k in range(negatives + 1)], 1)
    pair = reward(x, dirs).scores.numpy()
    return {
        "heldout_clips": n,
        "heldout_top1": top1_accuracy(scores),
        "heldout_direction_pairwise": float(np.mean(scores[:, 0] > pair)),
    }


# ----------------------------------------------------------------------------- audio


def build_toy_clap(cfg: dict[str, Any] = CLAP):
    """(``ClapModel``, ``ClapFeatureExtractor``, RoBERTa tokenizer of the ToneWorld words), untrained.

    HTSAT geometry: ``freq_ratio = spec_size // num_mel_bins``; the ``1 + 8000 // hop`` mel frames
    must fit ``spec_size * freq_ratio``; Swin windows of 4 tile the 16, 8 and 4 token grids of the
    three stages; the audio ``hidden_size`` is the last stage's width."""
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    from .pretrain_audio import audio_tokenizer

    tok = audio_tokenizer()
    sr, mels, hop, spec = cfg["sampling_rate"], cfg["num_mel_bins"], cfg["hop_length"], cfg["spec_size"]
    frames = 1 + cfg["max_length_s"] * sr // hop
    if frames > spec * (spec // mels):
        raise ValueError(f"toy CLAP: {frames} mel frames do not fit spec_size {spec} with {mels} mel bins")
    depths, stem, th = list(cfg["depths"]), cfg["stem"], cfg["text_hidden"]
    text = ClapTextConfig(
        vocab_size=len(tok),
        hidden_size=th,
        num_hidden_layers=cfg["text_layers"],
        num_attention_heads=4,
        intermediate_size=2 * th,
        max_position_embeddings=MAX_TOKENS + tok.pad_token_id + 1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    audio = ClapAudioConfig(
        spec_size=spec,
        num_mel_bins=mels,
        window_size=4,
        patch_size=4,
        patch_stride=(4, 4),
        patch_embeds_hidden_size=stem,
        depths=depths,
        num_attention_heads=[cfg["heads"] * 2**i for i in range(len(depths))],
        hidden_size=stem * 2 ** (len(depths) - 1),
        enable_fusion=False,
        num_hidden_layers=len(depths),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
    torch.manual_seed(cfg["seed"])
    model = ClapModel(
        ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=cfg["projection"])
    )
    fe = ClapFeatureExtractor(
        feature_size=mels,
        sampling_rate=sr,
        hop_length=hop,
        max_length_s=cfg["max_length_s"],
        fft_window_size=cfg["fft_window_size"],
        frequency_min=50,
        frequency_max=0.45 * sr,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    return model, fe, tok


def clap_coverage_ok(fe) -> bool:
    """Every sample of a ToneWorld event reaches the audio tower: the extractor's window holds the
    clip, or what its crop can remove (at most ``N_SAMPLES - window`` samples in all, from one end
    or split over both) lies inside the ``EDGE_S`` margins that no event enters."""
    window = int(fe.nb_max_samples)
    return tones.N_SAMPLES <= window or tones.N_SAMPLES - window <= round(tones.EDGE_S * tones.SR)


def train_toy_clap(
    out: str | Path,
    minutes: float,
    batch: int = 48,
    negatives: int = 3,
    lr: float = 1e-3,
    eval_clips: int = 200,
    strict_negatives: bool = True,
    order_fraction: float = 0.25,
    cfg: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the toy CLAP for ``minutes`` on ToneWorld train clips and save it to ``out``; returns the
    stats (including the held-out top-1 accuracy, see :func:`evaluate_clap_reward`)."""
    from transformers import ClapProcessor

    out = Path(out)
    cfg = CLAP | (cfg or {})
    model, fe, tok = build_toy_clap(cfg)
    if not clap_coverage_ok(fe):
        raise ValueError(f"toy CLAP: a {fe.nb_max_samples}-sample window would cut ToneWorld events")
    out.mkdir(parents=True, exist_ok=True)
    fe.save_pretrained(str(out))  # the processor is saved first and training featurises through the saved one
    tok.save_pretrained(str(out))
    processor = ClapProcessor.from_pretrained(str(out))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    it = tones.make_dataset(10**12, 300 + cfg["seed"], "train")
    rng = np.random.default_rng(cfg["seed"])
    np.random.seed(cfg["seed"])  # the extractor draws its random crops from NumPy's global generator

    def in_train(m):
        return tones._in_split(m, "train")

    def perturb(md, g):
        return tones.perturb_metadata(md, g, split="train" if strict_negatives else None)

    check = in_train if strict_negatives else None
    order_rng = np.random.default_rng([cfg["seed"], 5])

    t0 = time.time()
    t_end, steps, clips_seen, losses = t0 + 60 * minutes, 0, 0, []
    while time.time() < t_end:
        waves, caps, negs = [], [], []
        n_order = round(order_fraction * batch)
        for k in range(batch):
            if k < n_order:  # extra ``order`` clips: event order is the slowest thing to learn
                md = tones.sample_metadata("order", order_rng, "train")
                wave, cap = tones.synthesize(md, order_rng, "train"), md["prompt"]
            else:
                wave, cap, md = next(it)
            waves.append(wave.astype(np.float64))
            caps.append(cap)
            negs += hard_negatives(perturb, md, rng, negatives, check)
        feats = processor.feature_extractor(waves, sampling_rate=cfg["sampling_rate"], return_tensors="pt")
        ids = tok(caps + negs, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        emb = F.normalize(
            _pooled(
                model.get_audio_features(
                    input_features=feats["input_features"].float(), is_longer=feats["is_longer"]
                )
            ),
            dim=-1,
        )
        txt = F.normalize(
            _pooled(model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)),
            dim=-1,
        )
        loss = info_nce(
            emb,
            txt[:batch],
            txt[batch:].view(batch, negatives, -1),
            caps,
            model.logit_scale_a.exp().clamp(max=100),
            model.logit_scale_t.exp().clamp(max=100),
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps, clips_seen = steps + 1, clips_seen + batch
        losses.append(float(loss.detach()))
    train_s = time.time() - t0
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    stats: dict[str, Any] = {
        "model": "toy-clap",
        "steps": steps,
        "clips": clips_seen,
        "minutes": minutes,
        "train_seconds": round(train_s, 1),
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "strict_negatives": strict_negatives,
        "order_fraction": order_fraction,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
    }
    stats |= evaluate_clap_reward(out, n=eval_clips)
    _save_stats(out, stats)
    return stats


def _swapped(md: dict[str, Any]) -> dict[str, Any]:
    """The ``order`` prompt with the events reversed."""
    return tones.build_metadata("order", tuple(reversed(md["events"])))


def evaluate_clap_reward(
    path: str | Path, n: int = 200, seed: int = 1000, negatives: int = 3
) -> dict[str, float]:
    """Held-out evaluation through the ``clap`` reward, on ``n`` clips of
    ``tones.make_dataset(n, seed, "heldout")`` (order, counting and silence prompts, round-robin):

    - ``heldout_top1``: the true caption scores above all of ``negatives`` captions from
      ``tones.perturb_metadata`` (order swapped, a kind, count or pitch changed);
    - ``heldout_order_pairwise``: on the ``order`` clips, the true caption beats the swapped order."""
    from diffalign.rewards.clap import CLAPScore

    reward = CLAPScore(str(path), batch_size=50)
    rng = np.random.default_rng([seed, 1])
    waves, cands, order_idx, swapped = [], [], [], []
    for i, (wave, cap, md) in enumerate(tones.make_dataset(n, seed, "heldout")):
        waves.append(wave)
        cands.append([cap] + [tones.perturb_metadata(md, rng)["prompt"] for _ in range(negatives)])
        if md["tag"] == "order":
            order_idx.append(i)
            swapped.append(_swapped(md)["prompt"])
    x = torch.from_numpy(np.stack(waves))
    scores = np.stack(
        [reward(x, [c[k] for c in cands], tones.SR).scores.numpy() for k in range(negatives + 1)], 1
    )
    pair = reward(x[order_idx], swapped, tones.SR).scores.numpy()
    both = two_way_order_clips(n // 2, seed)
    xb = torch.from_numpy(np.stack([w for w, _, _ in both]))
    good = reward(xb, [c for _, c, _ in both], tones.SR).scores
    bad = reward(xb, [_swapped(md)["prompt"] for _, _, md in both], tones.SR).scores
    return {
        "heldout_clips": n,
        "heldout_top1": top1_accuracy(scores),
        "heldout_order_pairwise": float(np.mean(scores[order_idx, 0] > pair)),
        "two_way_order_clips": len(both),
        "two_way_order_pairwise": float((good > bad).float().mean()),
    }


def two_way_order_clips(n: int, seed: int) -> list[tuple[np.ndarray, str, dict[str, Any]]]:
    """``n`` fresh train-split ``order`` clips (``make_dataset(..., seed, "train")``, a stream the
    trainer does not use for seed != its own) of sequences whose reverse is a train caption too:
    the reversed caption is as familiar as the true one, so only hearing the order can tell them
    apart. (A held-out sequence's reverse is mostly a train caption, which a reward trained on the
    train split prefers.)"""
    two_way = {
        p
        for p in tones._all_params("order")
        if p != p[::-1]  # (a palindrome's reverse is itself)
        and not tones.heldout_combinations(tones.build_metadata("order", p))
        and not tones.heldout_combinations(tones.build_metadata("order", p[::-1]))
    }
    out = []
    for item in tones.make_dataset(10**9, seed, "train"):
        if item[2]["tag"] == "order" and tones.metadata_params(item[2]) in two_way:
            out.append(item)
            if len(out) == n:
                return out
    return out


# ----------------------------------------------------------------------------- entry point


def record(stats_file: str | Path, key: str, stats: dict[str, Any]) -> None:
    """Merge ``{key: stats}`` into the JSON file ``stats_file`` (created if missing)."""
    p = Path(stats_file)
    data = json.loads(p.read_text()) if p.exists() else {}
    data[key] = stats
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items()]  # one line per model
    p.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="train a toy video CLIP or toy CLAP reward")
    ap.add_argument("world", choices=["video", "clap"])
    ap.add_argument("out")
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--stats", default=None, help="JSON file to merge the stats into")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="clap: initial weights, clip stream and negatives")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.world == "video":
        if a.seed != 0:
            ap.error("--seed: only the clap reward takes a seed")
        stats = train_toy_video_clip(a.out, a.minutes)
    else:
        stats = train_toy_clap(a.out, a.minutes, cfg={"seed": a.seed})
    if a.stats:
        record(a.stats, "toy-video-clip" if a.world == "video" else "toy-clap", stats)
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
