"""Video reward ``video_clip``: the contract on a tiny random image CLIP (frame mode) and a tiny random
early-fusion video CLIP (both saved and reloaded through the real loader), parity of both modes with
a by-hand computation, one-line errors; and the shipped toy video CLIP / toy CLAP rewards preferring
the true caption over a motion-direction / event-order perturbed one on held-out clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffalign.errors import ConfigError
from diffalign.rewards import REWARDS

PROMPTS = [
    "a red circle moving left",
    "a blue square moving up then a green triangle appearing",
    "two yellow circles",
    "a photo of a purple square",
]
FUSION_FRAMES = 4
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def videos(n: int, frames: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, frames, 3, h, w, generator=g)


def build_tiny_fusion_clip(out: Path, frames: int = FUSION_FRAMES, seed: int = 1) -> Path:
    """A random early-fusion CLIPModel (vision ``num_channels = 3 * frames``), saved like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPModel

    from diffalign.models.tiny import WORDS
    from diffalign.models.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(list(WORDS) + ["moving", "up", "down", "then", "appearing"])
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.eos_token_id,
        },
        vision_config={
            "image_size": 16,
            "patch_size": 4,
            "num_channels": 3 * frames,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": 16},
                "crop_size": {"height": 16, "width": 16},
                "image_mean": OPENAI_MEAN,
                "image_std": OPENAI_STD,
                "do_resize": True,
                "do_center_crop": True,
                "do_normalize": True,
                "resample": 3,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
            }
        )
    )
    return out


@pytest.fixture(scope="module")
def fusion_clip(tmp_path_factory) -> Path:
    return build_tiny_fusion_clip(tmp_path_factory.mktemp("vclip") / "vclip")


@pytest.fixture(scope="module", params=["frames", "fusion"])
def reward(request, tiny_clip, fusion_clip):
    from diffalign.rewards import VideoCLIPScore

    r = VideoCLIPScore(
        str(tiny_clip if request.param == "frames" else fusion_clip), batch_size=4, temporal_weight=0.5
    )
    assert r.mode == request.param
    return r


def frames_of(r) -> int:
    """The checkpoint's frame count (fusion), else 5 (not 3: a [B,3,F,H,W] mix-up must stay visible)."""
    return r.fusion_frames or 5


# ----------------------------------------------------------------------------- contract


def test_registered_as_video_and_not_in_the_image_contract():
    cls = REWARDS.get("video_clip")
    assert cls.modality == "video"
    image_rewards = [n for n in REWARDS.names() if getattr(REWARDS.get(n), "modality", "image") == "image"]
    assert "video_clip" not in image_rewards and "clap" not in image_rewards  # the filter of test_rewards.py


def test_contract(reward):
    v = videos(8, frames_of(reward), 20, 26, seed=3)
    prompts = [PROMPTS[i % 4] for i in range(8)]
    out = reward(v, prompts)
    assert out.scores.shape == (8,) and out.scores.dtype == torch.float32 and out.scores.device.type == "cpu"
    assert torch.isfinite(out.scores).all() and not out.scores.requires_grad
    assert set(out.sub) == ({"frames", "temporal"} if reward.mode == "frames" else {"cosine"})
    assert all(s.shape == (8,) and s.dtype == torch.float32 for s in out.sub.values())
    torch.testing.assert_close(reward(v, prompts).scores, out.scores, atol=0, rtol=0)  # deterministic
    try:
        reward.batch_size = 1
        one = reward(v, prompts)
    finally:
        reward.batch_size = 4
    torch.testing.assert_close(one.scores, out.scores, atol=1e-5, rtol=1e-5)  # batch-size invariant
    for k in out.sub:
        torch.testing.assert_close(one.sub[k], out.sub[k], atol=1e-5, rtol=1e-5)
    assert out.scores.unique().numel() > 1


def test_frame_count(reward):
    """Frame mode takes any number of frames (a still clip has temporal term 1); fusion only its own."""
    if reward.mode == "frames":
        one = reward(videos(2, 1, 30, 30), PROMPTS[:2])
        torch.testing.assert_close(one.sub["temporal"], torch.ones(2))
        assert reward(videos(2, 5, 30, 30), PROMPTS[:2]).scores.shape == (2,)
    else:
        with pytest.raises(ConfigError, match=f"takes clips of {FUSION_FRAMES} frames, got 5"):
            reward(videos(2, 5, 16, 16), PROMPTS[:2])


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda v: v * 2 - 1, r"must be in \[0,1\]"),
        (lambda v: (v * 255).to(torch.uint8), "must be float"),
        (lambda v: v.permute(0, 2, 1, 3, 4), r"\[B,F,3,H,W\].*channels before frames"),
        (lambda v: v.permute(0, 1, 3, 4, 2), r"\[B,F,3,H,W\].*channels last"),
        (lambda v: v[0], r"\[B,F,3,H,W\]"),
        (lambda v: v[:, :0], "no frames"),
        (lambda v: v.clone().fill_(float("nan")), "NaN"),
    ],
)
def test_bad_videos(reward, bad, match):
    with pytest.raises(ConfigError, match=match) as e:
        reward(bad(videos(2, frames_of(reward), 16, 16)), PROMPTS[:2])
    assert "\n" not in str(e.value)


def test_bad_prompts(reward):
    v = videos(2, frames_of(reward), 16, 16)
    with pytest.raises(ConfigError, match="prompt list is empty"):
        reward(v, [])
    with pytest.raises(ConfigError, match="2 videos but 3 prompts"):
        reward(v, PROMPTS[:3])
    with pytest.raises(ConfigError, match="video batch is empty"):
        reward(v[:0], PROMPTS[:1])


def test_missing_path_is_one_line(tmp_path):
    from diffalign.rewards import VideoCLIPScore

    with pytest.raises(ConfigError, match="does not exist"):
        VideoCLIPScore(str(tmp_path / "no" / "such" / "model"))


# ----------------------------------------------------------------------------- parity


def _text(model, tok, prompts: list[str]) -> torch.Tensor:
    t = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    out = model.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask)
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


def _image(model, px: torch.Tensor) -> torch.Tensor:
    out = model.get_image_features(pixel_values=px)
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


def test_frame_mode_is_frame_average_plus_temporal_by_hand(tiny_clip):
    """30x30 frames (the checkpoint's size: no resize, no crop): normalise, embed each frame, then
    logit_scale.exp() * mean_f cos(frame_f, text) + w * mean_f cos(frame_f, frame_f+1)."""
    from transformers import CLIPModel, CLIPTokenizer

    from diffalign.rewards import VideoCLIPScore

    B, Fr, w = 3, 5, 0.7
    v = (videos(B, Fr, 30, 30, seed=7) * 255).round() / 255  # saved frames: the reference reads uint8
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    tok = CLIPTokenizer.from_pretrained(str(tiny_clip))
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    with torch.no_grad():
        txt = _text(model, tok, PROMPTS[:B])
        scale = model.logit_scale.exp()
        want_frames, want_temporal = [], []
        for b in range(B):
            emb = [_image(model, ((v[b, f] - mean) / std)[None])[0] for f in range(Fr)]
            want_frames.append(sum(scale * torch.dot(e, txt[b]) for e in emb) / Fr)
            want_temporal.append(sum(torch.dot(emb[f], emb[f + 1]) for f in range(Fr - 1)) / (Fr - 1))
    want_frames, want_temporal = torch.stack(want_frames), torch.stack(want_temporal)
    out = VideoCLIPScore(str(tiny_clip), temporal_weight=w)(v, PROMPTS[:B])
    torch.testing.assert_close(out.sub["frames"], want_frames, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sub["temporal"], want_temporal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.scores, want_frames + w * want_temporal, atol=1e-5, rtol=1e-5)


def test_frame_mode_frames_term_is_mean_pickscore(tiny_clip):
    """Frames of another size go through the image rewards' preprocessing: the frame term is the
    mean of PickScore over the frames, and a static clip has temporal term 1."""
    from diffalign.rewards import PickScore, VideoCLIPScore

    v = videos(4, 3, 36, 44, seed=2)
    out = VideoCLIPScore(str(tiny_clip))(v, PROMPTS)
    ps = PickScore(str(tiny_clip))
    want = torch.stack([ps(v[:, f], PROMPTS).scores for f in range(3)]).mean(0)
    torch.testing.assert_close(out.sub["frames"], want, atol=1e-5, rtol=1e-5)
    still = v[:, :1].expand(-1, 3, -1, -1, -1)
    torch.testing.assert_close(
        VideoCLIPScore(str(tiny_clip))(still, PROMPTS).sub["temporal"], torch.ones(4), atol=1e-5, rtol=1e-5
    )


def test_fusion_mode_stacks_frames_frame_major_by_hand(fusion_clip):
    """Frames of the checkpoint's size: each normalised like an image, concatenated frame 0 RGB,
    frame 1 RGB, ... into one 12-channel input; score = logit_scale.exp() * cos. Reversing the
    frames changes the score (the stack is ordered)."""
    from transformers import CLIPModel, CLIPTokenizer

    from diffalign.rewards import VideoCLIPScore

    v = (videos(3, FUSION_FRAMES, 16, 16, seed=9) * 255).round() / 255  # saved frames (uint8)
    model = CLIPModel.from_pretrained(str(fusion_clip)).eval()
    tok = CLIPTokenizer.from_pretrained(str(fusion_clip))
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        px = torch.cat([(v[:, f] - mean) / std for f in range(FUSION_FRAMES)], dim=1)  # [B, 12, 16, 16]
        cos = (_image(model, px) * _text(model, tok, PROMPTS[:3])).sum(-1)
        want = model.logit_scale.exp() * cos
    r = VideoCLIPScore(str(fusion_clip))
    out = r(v, PROMPTS[:3])
    torch.testing.assert_close(out.scores, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sub["cosine"], cos, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(r(v.flip(1), PROMPTS[:3]).scores, out.scores, atol=1e-4)


def test_unsupported_channel_count_is_one_line(fusion_clip, tmp_path):
    """A vision tower of 4 channels is neither an image CLIP nor a frame stack."""
    import shutil

    from transformers import CLIPConfig, CLIPModel

    from diffalign.rewards import VideoCLIPScore

    d = tmp_path / "bad"
    shutil.copytree(fusion_clip, d)
    cfg = CLIPConfig.from_pretrained(str(d))
    cfg.vision_config.num_channels = 4
    CLIPModel(cfg).save_pretrained(str(d), safe_serialization=True)
    with pytest.raises(ConfigError, match="takes 4 channels; expected 3") as e:
        VideoCLIPScore(str(d))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- shipped toy rewards


def _asset(name: str) -> Path:
    from diffalign.demo import ASSETS

    p = ASSETS / name
    if not (p / "config.json").exists():
        pytest.skip(f"{name} is not shipped in this checkout")
    return p


def test_toy_video_clip_sees_motion_direction_on_heldout_clips():
    """40 held-out clips (colour-direction pairs never seen moving in training): the true caption
    beats the same caption with another direction of motion, something no frame-level reward can
    do (a frame average is blind to time order); and playing ``motion`` clips backwards makes the
    opposite direction win."""
    from diffalign.benchmarks.toyworlds import video
    from diffalign.rewards import VideoCLIPScore

    r = VideoCLIPScore(str(_asset("toy-video-clip")))
    assert r.mode == "fusion" and r.fusion_frames == video.FRAMES
    rng = np.random.default_rng(11)
    items = list(video.make_dataset(40, 77, "heldout"))
    x = torch.from_numpy(np.stack([i[0] for i in items])).permute(0, 1, 4, 2, 3).float() / 255

    def with_direction(md, d):
        other = (md["objects"][1]["color"], md["objects"][1]["class"]) if md["tag"] == "appear" else None
        m = md["objects"][0]
        return video.build_metadata(md["tag"], (m["color"], m["class"], d), other)["prompt"]

    wrong = [
        with_direction(md, str(rng.choice([d for d in video.DIRECTIONS if d != md["objects"][0]["motion"]])))
        for _, _, md in items
    ]
    good = r(x, [i[1] for i in items]).scores
    bad = r(x, wrong).scores
    assert (good > bad).float().mean() > 0.6

    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    motion = [k for k, (_, _, md) in enumerate(items) if md["tag"] == "motion"]
    back = x[motion].flip(1)  # the same frames played backwards: the shape moves the other way
    true_dir = r(back, [items[k][1] for k in motion]).scores
    opp_dir = r(
        back, [with_direction(items[k][2], opposite[items[k][2]["objects"][0]["motion"]]) for k in motion]
    ).scores
    assert (opp_dir > true_dir).float().mean() > 0.6


def test_toy_clap_hears_event_order_on_unseen_clips():
    """60 clips never used in training (a seed the trainer does not use) of three sequences and their
    reverses ("a high beep followed by a noise burst" / "a noise burst followed by a high beep", and
    high-low-noise / noise-low-high): the true caption beats the reversed order, which names the
    same sounds and is a train caption too, so only hearing the order decides (an order-blind
    reward prefers one caption for both orders: 0.5).

    Not the held-out split: the reverse of a held-out order is mostly a train caption, which a
    reward trained on the train split prefers (see ``toy_av_rewards``; its held-out numbers are
    in ``training_av.json``)."""
    from diffalign.benchmarks.toyworlds import tones
    from diffalign.rewards import CLAPScore

    r = CLAPScore(str(_asset("toy-clap")))
    want = {
        ("high", "noise"): 15,
        ("noise", "high"): 15,
        ("high", "low", "noise"): 15,
        ("noise", "low", "high"): 15,
    }
    items = []
    for item in tones.make_dataset(10**6, 77, "train"):
        key = tuple(item[2]["events"])
        if item[2]["tag"] == "order" and want.get(key, 0) > 0:
            want[key] -= 1
            items.append(item)
            if len(items) == 60:
                break
    x = torch.from_numpy(np.stack([i[0] for i in items]))
    swapped = [tones.build_metadata("order", tuple(md["events"][::-1]))["prompt"] for _, _, md in items]
    good = r(x, [i[1] for i in items], tones.SR).scores
    bad = r(x, swapped, tones.SR).scores
    assert (good > bad).float().mean() > 0.6
