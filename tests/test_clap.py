"""CLAP score (audio reward): parity with ClapProcessor + ClapModel on a tiny random checkpoint
saved and reloaded through the real loader, the resampler, the audio contract over every
registered audio reward, one-line errors, and the offline RoBERTa tokenizer builder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.errors import ConfigError
from diffalign.rewards import REWARDS

SR = 8000  # the tiny extractor's rate; clips are 1 s (8000 samples) long
LONG = "the sound of " + " and ".join(["a dog barking", "rain on a car"] * 20)  # > 77 tokens
PROMPTS = ["a dog barking", "the sound of rain", LONG, "a car engine"]
AUDIO_REWARDS = sorted(n for n in REWARDS.names() if getattr(REWARDS.get(n), "modality", "image") == "audio")


def waves(n: int, samples: int, seed: int = 0) -> torch.Tensor:
    """Noise plus a tone per clip, peak below 1."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    tones = torch.stack([torch.sin(2 * torch.pi * (300 + 500 * i) * t) for i in range(n)])
    return 0.5 * tones + 0.4 * (torch.rand(n, samples, generator=g) * 2 - 1)


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory) -> Path:
    from diffalign.rewards.clap import build_tiny_clap

    return build_tiny_clap(tmp_path_factory.mktemp("clap") / "clap", sampling_rate=SR)


@pytest.fixture(scope="module")
def clap(tiny_clap):
    from diffalign.rewards import CLAPScore

    return CLAPScore(str(tiny_clap), batch_size=4)


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize(
    "sr_in, sr_out, up, down", [(16000, 8000, 1, 2), (44100, 48000, 160, 147), (8000, 8000, 1, 1)]
)
def test_resample_is_resample_poly_at_the_reduced_ratio(sr_in, sr_out, up, down):
    from scipy.signal import resample_poly

    from diffalign.rewards.clap import resample

    x = waves(2, 4410).numpy()
    y = resample(x, sr_in, sr_out)
    assert y.dtype == np.float64 and y.shape == (2, -(-4410 * up // down))
    np.testing.assert_allclose(y, resample_poly(x.astype(np.float64), up, down, axis=-1), atol=1e-12, rtol=0)


def test_resample_is_band_limited():
    """16 -> 8 kHz: a 1 kHz tone passes, a 6 kHz tone (above the new Nyquist) is filtered out
    instead of aliasing to 2 kHz."""
    from diffalign.rewards.clap import resample

    t = np.arange(16000) / 16000
    rms = [
        float(np.sqrt(np.mean(resample(np.sin(2 * np.pi * f * t), 16000, 8000)[200:-200] ** 2)))
        for f in (1000, 6000)
    ]
    assert abs(rms[0] - 0.5**0.5) < 0.01 and rms[1] < 0.01


# ----------------------------------------------------------------------------- parity


def by_hand(clip_dir: Path, audio16k: torch.Tensor, prompts: list[str], seeded: bool):
    """The published path: resample_poly to the extractor's rate, ClapProcessor, ClapModel,
    normalise, cosine. ``seeded``: featurise clip by clip with NumPy seeded to 0 (clips longer
    than the window get the extractor's random crop); otherwise one batched processor call."""
    from scipy.signal import resample_poly
    from transformers import ClapModel, ClapProcessor

    model = ClapModel.from_pretrained(str(clip_dir)).eval()
    proc = ClapProcessor.from_pretrained(str(clip_dir))
    x = resample_poly(audio16k.double().numpy(), 1, 2, axis=-1)
    if seeded:
        feats = []
        for w in x:
            np.random.seed(0)
            feats.append(proc(audio=w, sampling_rate=SR, return_tensors="pt").input_features)
        feats = torch.cat(feats)
    else:
        feats = proc(audio=list(x), sampling_rate=SR, return_tensors="pt").input_features
    tok = proc(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        a = model.get_audio_features(input_features=feats)
        t = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        full = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, input_features=feats)
    a, t = getattr(a, "pooler_output", a), getattr(t, "pooler_output", t)
    a, t = a / a.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    return (a * t).sum(-1), full.logits_per_audio.diag(), tok


@pytest.mark.parametrize(
    "samples, seeded", [(6000, False), (20000, True)], ids=["short-repeatpad", "long-crop"]
)
def test_clap_score_parity_with_processor_and_model(clap, tiny_clap, samples, seeded):
    """16 kHz input into the 8 kHz extractor: 6000 samples -> 3000 (repeat-padded to the 1 s
    window), 20000 -> 10000 (cropped to it). Scores are the cosine, ``logit`` the diagonal of
    ``ClapModel``'s ``logits_per_audio``; the long prompt is cut to 77 tokens."""
    audio = waves(4, samples, seed=1)
    cos, logits, tok = by_hand(tiny_clap, audio, PROMPTS, seeded)
    assert tok.input_ids.shape[1] == 77
    out = clap(audio, PROMPTS, sample_rate=16000)
    torch.testing.assert_close(out.scores, cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sub["logit"], logits, atol=1e-4, rtol=1e-5)
    assert out.scores.abs().max() <= 1


def test_resampling_path_equals_resampling_first(clap):
    """16 kHz input == the same clip resampled by hand and given at the extractor's 8 kHz; the
    rate matters (the same samples declared as 8 kHz score differently)."""
    from scipy.signal import resample_poly

    audio = waves(2, 9000, seed=2)
    at16 = clap(audio, PROMPTS[:2], sample_rate=16000).scores
    at8 = torch.from_numpy(resample_poly(audio.double().numpy(), 1, 2, axis=-1))
    torch.testing.assert_close(at16, clap(at8, PROMPTS[:2], sample_rate=SR).scores, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(at16, clap(audio, PROMPTS[:2], sample_rate=SR).scores, atol=1e-4)


def test_crops_are_deterministic_batch_invariant_and_leave_numpy_alone(clap):
    audio = waves(4, 24000, seed=3)  # 12000 samples at 8 kHz: the extractor crops 8000 at random
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = clap(audio, PROMPTS, sample_rate=16000).scores
    assert (np.random.get_state()[1] == before).all()
    torch.testing.assert_close(clap(audio, PROMPTS, sample_rate=16000).scores, a, atol=0, rtol=0)
    clap.batch_size = 1
    try:
        one = clap(audio, PROMPTS, sample_rate=16000).scores
    finally:
        clap.batch_size = 4
    torch.testing.assert_close(one, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        clap(audio[2:3], PROMPTS[2:3], sample_rate=16000).scores, a[2:3], atol=1e-5, rtol=1e-5
    )


def test_integral_sample_rate_types_are_accepted(clap):
    audio = waves(2, 8000, seed=7)
    ref = clap(audio, PROMPTS[:2], sample_rate=16000).scores
    for sr in (np.int64(16000), 16000.0):
        torch.testing.assert_close(clap(audio, PROMPTS[:2], sample_rate=sr).scores, ref, atol=0, rtol=0)


def test_prompts_and_audio_change_the_score(clap):
    audio = waves(1, 8000, seed=4).expand(4, -1)
    by_prompt = clap(audio, PROMPTS, sample_rate=16000).scores
    assert by_prompt.unique().numel() == 4
    by_audio = clap(waves(4, 8000, seed=5), [PROMPTS[0]] * 4, sample_rate=16000).scores
    assert by_audio.unique().numel() == 4


def test_is_longer_matches_the_extractor_without_its_forcing():
    """With one truly long clip in the batch the fusion extractor reports the true flags; the
    formula must agree (8010 samples: longer, yet the same frame count as the 8000 window)."""
    from transformers import ClapFeatureExtractor

    from diffalign.rewards.clap import is_longer

    fe = ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=SR,
        hop_length=32,
        max_length_s=1,
        fft_window_size=256,
        frequency_max=3600,
        truncation="fusion",
    )
    lengths = [5000, 8000, 8010, 8040]
    np.random.seed(0)
    got = (
        fe([np.zeros(n) + 0.1 for n in lengths], sampling_rate=SR, return_tensors="np")
        .is_longer[:, 0]
        .tolist()
    )
    assert got == [is_longer(n, 8000, 32) for n in lengths] == [False, False, False, True]


# ----------------------------------------------------------------------------- contract


AUDIO_BUILDERS: dict[str, Callable] = {
    "clap": lambda clip_dir: REWARDS.get("clap")(str(clip_dir)),
}


def test_every_audio_reward_has_a_tiny_builder():
    assert AUDIO_BUILDERS.keys() == set(AUDIO_REWARDS) and "clap" in AUDIO_REWARDS
    assert getattr(REWARDS.get("clap"), "modality", "image") == "audio"


@pytest.fixture(scope="module", params=AUDIO_REWARDS)
def audio_reward(request, tiny_clap):
    return request.param, AUDIO_BUILDERS[request.param](tiny_clap)


def test_audio_contract(audio_reward):
    _, r = audio_reward
    audio = waves(6, 12000, seed=6)
    prompts = [PROMPTS[i % 4] for i in range(6)]
    out = r(audio, prompts, sample_rate=16000)
    assert out.scores.shape == (6,) and out.scores.dtype == torch.float32 and out.scores.device.type == "cpu"
    assert torch.isfinite(out.scores).all() and not out.scores.requires_grad
    assert all(v.shape == (6,) and v.device.type == "cpu" for v in out.sub.values())
    torch.testing.assert_close(r(audio, prompts, sample_rate=16000).scores, out.scores, atol=0, rtol=0)
    r.batch_size = 1
    one = r(audio, prompts, sample_rate=16000).scores
    r.batch_size = 32
    torch.testing.assert_close(one, out.scores, atol=1e-5, rtol=1e-5)
    params = list(r.model.parameters())
    assert params and all(p.device == r.device for p in params)
    assert out.scores.unique().numel() > 1


@pytest.mark.parametrize(
    "bad, prompts, sr, match",
    [
        (lambda x: x[None], PROMPTS[:2], 16000, r"\[B,S\] mono waveform tensor, got \(1, 2, 800\)"),
        (
            lambda x: (x * 32767).to(torch.int16),
            PROMPTS[:2],
            16000,
            "must be float in .* got dtype torch.int16",
        ),
        (lambda x: x * 4, PROMPTS[:2], 16000, r"must be in \[-1,1\], got values in"),
        (lambda x: x.clone().fill_(float("nan")), PROMPTS[:2], 16000, "NaN or inf"),
        (lambda x: x, PROMPTS[:3], 16000, "2 waveforms but 3 prompts"),
        (lambda x: x, [], 16000, "prompt list is empty"),
        (lambda x: x[:, :0], PROMPTS[:2], 16000, "0 samples"),
        (lambda x: x, PROMPTS[:2], 0, "sample_rate must be a positive integer"),
        (lambda x: x, PROMPTS[:2], -8000, "sample_rate must be a positive integer"),
        (lambda x: x, PROMPTS[:2], 16000.5, "sample_rate must be a positive integer"),
    ],
)
def test_bad_audio_is_one_line_config_error(clap, bad, prompts, sr, match):
    with pytest.raises(ConfigError, match=match) as e:
        clap(bad(waves(2, 800)), prompts, sample_rate=sr)
    assert "\n" not in str(e.value)


def test_missing_or_wrong_folder(tmp_path):
    from diffalign.rewards import CLAPScore

    with pytest.raises(ConfigError, match="does not exist"):
        CLAPScore(str(tmp_path / "no" / "such" / "clap"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        CLAPScore(str(tmp_path / "empty"))


def test_folder_without_safetensors_is_one_line_error(tiny_clap, tmp_path):
    import shutil

    from diffalign.rewards import CLAPScore

    d = tmp_path / "bin"
    shutil.copytree(tiny_clap, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="cannot load a CLAP model from folder") as e:
        CLAPScore(str(d))
    assert "\n" not in str(e.value)


def test_offline_hub_id_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from diffalign.rewards import CLAPScore

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(
        ConfigError,
        match="cannot get CLAP model 'laion/clap-htsat-unfused' from the hub with HF_HUB_OFFLINE set",
    ) as e:
        CLAPScore()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- tokenizer


def test_roberta_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer, RobertaTokenizer

    from diffalign.models.tokenizer import build_roberta_tokenizer

    words = ["a", "an", "cat", "at", "dog", "barking", "rain"]  # shared prefixes/suffixes must not clash
    tok = build_roberta_tokenizer(words, model_max_length=64)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == len(tok) - 1
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(again, RobertaTokenizer) and again.model_max_length == 64
    for w in words:  # one token as the first word and after a space ("Ġ" form)
        ids = again(f"{w} {w}").input_ids
        assert again.convert_ids_to_tokens(ids) == ["<s>", w, "Ġ" + w, "</s>"]
    text = "a zebra, at Café"
    ids = again(text).input_ids
    assert ids == tok(text).input_ids
    toks = again.convert_ids_to_tokens(ids)
    assert (
        toks[:3] == ["<s>", "a", "Ġ"] and "z" in toks and again.unk_token_id not in ids
    )  # bytes, never <unk>
    assert again.decode(ids, skip_special_tokens=True) == text
    batch = again(["a cat", "a dog barking in the rain"], padding=True)
    assert batch.input_ids[0][-1] == again.pad_token_id and batch.attention_mask[0][-1] == 0
