"""CLAP score: text-audio agreement of a CLAP model (Wu et al. 2023, LAION-CLAP, arXiv 2211.06687).

The metric of the AudioLDM / Tango 2 evaluations: the cosine similarity of the projected,
L2-normalised audio and text embeddings of a CLAP model, here ``transformers.ClapModel`` with its
``ClapProcessor`` (``ClapFeatureExtractor`` + RoBERTa tokenizer); default checkpoint
``laion/clap-htsat-unfused``. Only safetensors weights are loaded.

Preprocessing, per clip:

- resample to the feature extractor's ``sampling_rate`` (48 kHz for the LAION checkpoints) with a
  band-limited polyphase filter, ``scipy.signal.resample_poly`` at the reduced ``up/down`` ratio
  (its default Kaiser window, beta 5);
- the checkpoint's ``ClapFeatureExtractor`` with its own ``truncation``/``padding`` settings (log-mel
  spectrogram; clips shorter than ``max_length_s`` are repeated then zero padded, "repeatpad").
  Longer clips are cropped at random by the extractor ("rand_trunc"), or cut into three random
  chunks plus a shrunk whole ("fusion", fused checkpoints). To make the reward deterministic and
  independent of batch composition, every clip is featurised alone with NumPy's global generator
  seeded to ``crop_seed`` (its state is restored afterwards), so a clip always gets the same crop.
  The extractor also forces one clip of an all-short batch onto the fusion path (a LAION training
  device); we instead pass each clip's true ``is_longer`` flag, which only matters for fused
  checkpoints;
- text: the tokenizer with padding and truncation to ``max_text_tokens`` (77, LAION-CLAP's text
  context; ``None``: the tokenizer/model limit, 512 for RoBERTa); longer prompts warn once per reward.

Scores: ``scores`` = raw cosine in [-1, 1]; sub-score ``"logit"`` = ``logit_scale_a.exp() * cos``
(the diagonal of ``ClapModel``'s ``logits_per_audio``). Some papers report ``100 * max(cos, 0)``;
convert if needed.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.errors import ConfigError

from .base import REWARDS, RewardOutput, batched, check_audio_inputs, is_local
from .text import PromptTokenizer

DEFAULT_CLAP = "laion/clap-htsat-unfused"
LAION_TEXT_TOKENS = 77


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling along the last axis: ``scipy.signal.resample_poly`` with the
    reduced ratio (16 kHz -> 48 kHz is up 3, down 1). Float64 out; a no-op copy at equal rates."""
    from scipy.signal import resample_poly

    audio = np.asarray(audio, dtype=np.float64)
    if orig_sr == target_sr:
        return audio.copy()
    g = math.gcd(int(orig_sr), int(target_sr))
    return resample_poly(audio, int(target_sr) // g, int(orig_sr) // g, axis=-1)


@contextlib.contextmanager
def seeded_numpy(seed: int):
    """Seed NumPy's global generator for the block (the feature extractor draws its crops there),
    then put the caller's state back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def is_longer(n_samples: int, max_samples: int, hop_length: int) -> bool:
    """The extractor's own "longer than the window" test for fusion truncation, without its
    random forcing: more samples than ``max_samples`` *and* more spectrogram frames than the
    window's (``1 + n // hop`` frames with centred framing)."""
    return n_samples > max_samples and n_samples // hop_length != max_samples // hop_length


def load_clap(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``ClapModel`` (safetensors only, eval mode) + ``ClapProcessor`` from a hub id or a folder."""
    from transformers import ClapModel, ClapProcessor

    p = Path(path).expanduser()
    local = is_local(path)
    if local and not p.is_dir():
        raise ConfigError(
            f"reward model path {path!r} does not exist (expected a ClapModel folder or a hub id)"
        )
    if local and not (p / "config.json").exists():
        raise ConfigError(
            f"reward model path {path!r} has no config.json (expected a transformers ClapModel folder)"
        )
    src = str(p) if local else path
    try:
        model = ClapModel.from_pretrained(src, use_safetensors=True)
        processor = ClapProcessor.from_pretrained(src)
    except (OSError, ValueError, TypeError, KeyError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if local:
            raise ConfigError(f"cannot load a CLAP model from folder {path!r}: {why}") from None
        from huggingface_hub import constants

        offline = " with HF_HUB_OFFLINE set" if constants.HF_HUB_OFFLINE else ""
        raise ConfigError(
            f"cannot get CLAP model {path!r} from the hub{offline} ({type(e).__name__}); "
            f"download it elsewhere and pass the local path"
        ) from None
    if getattr(model.config, "model_type", None) != "clap":
        raise ConfigError(f"reward model {path!r} is a {model.config.model_type!r} model, not CLAP")
    return model.to(device=device, dtype=dtype).eval(), processor


def _pooled(out) -> Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
    return getattr(out, "pooler_output", out)


@REWARDS.register("clap")
class CLAPScore:
    """CLAP score: cosine of CLAP audio and text embeddings (default ``laion/clap-htsat-unfused``).

    Call with ``(audio [B,S] float in [-1,1], prompts, sample_rate)``; returns ``scores`` (cosine)
    and the sub-score ``"logit"`` (``logit_scale_a.exp() * cosine``)."""

    modality = "audio"

    def __init__(
        self,
        path: str = DEFAULT_CLAP,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        max_text_tokens: int | None = LAION_TEXT_TOKENS,
        crop_seed: int = 0,
    ) -> None:
        self.model, self.processor = load_clap(path, device, dtype)
        self.feature_extractor, self.tokenizer = self.processor.feature_extractor, self.processor.tokenizer
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.crop_seed = crop_seed
        tc = self.model.config.text_config
        # RoBERTa positions start after the pad id: 514 position embeddings hold 512 tokens
        limits = [self.tokenizer.model_max_length, tc.max_position_embeddings - (tc.pad_token_id or 0) - 1]
        self.text_tokens = min(limits + ([max_text_tokens] if max_text_tokens else []))
        self.prompts = PromptTokenizer(self.tokenizer, self.text_tokens, "clap")

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def features(self, audio: Tensor, sample_rate: int) -> tuple[Tensor, Tensor]:
        """``[B,S]`` waveforms -> (``input_features`` ``[B,C,T,F]``, ``is_longer`` ``[B,1]``), per clip."""
        fe = self.feature_extractor
        waves = resample(audio.detach().double().cpu().numpy(), sample_rate, self.sampling_rate)
        max_samples = int(fe.nb_max_samples)
        mels, longer = [], []
        for w in waves:
            with seeded_numpy(self.crop_seed):
                out = fe(w, sampling_rate=self.sampling_rate, return_tensors="np")
            mels.append(out["input_features"][0])
            longer.append(is_longer(w.shape[-1], max_samples, int(fe.hop_length)))
        feats = torch.from_numpy(np.stack(mels)).to(self.device, self.dtype)
        return feats, torch.tensor(longer, device=self.device).view(-1, 1)

    def audio_embeds(self, audio: Tensor, sample_rate: int) -> Tensor:
        feats, longer = self.features(audio, sample_rate)
        emb = _pooled(self.model.get_audio_features(input_features=feats, is_longer=longer))
        return F.normalize(emb.float(), dim=-1)

    def text_embeds(self, prompts: list[str]) -> Tensor:
        tok = self.prompts(list(prompts))  # input_ids, attention_mask [B,L], L <= text_tokens
        emb = _pooled(
            self.model.get_text_features(
                input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device)
            )
        )
        return F.normalize(emb.float(), dim=-1)

    def cosine(self, audio: Tensor, prompts: list[str], sample_rate: int) -> Tensor:
        return (self.audio_embeds(audio, sample_rate) * self.text_embeds(prompts)).sum(-1)

    @torch.inference_mode()
    def __call__(self, audio: Tensor, prompts: list[str], sample_rate: int) -> RewardOutput:
        check_audio_inputs(audio, prompts, sample_rate)
        self.prompts.check(list(prompts))
        sample_rate = int(sample_rate)
        cos = batched(partial(self.cosine, sample_rate=sample_rate), audio, list(prompts), self.batch_size)
        scale = self.model.logit_scale_a.detach().float().exp().cpu()
        return RewardOutput(cos, {"logit": scale * cos})


# ----------------------------------------------------------------------------- tiny test model


def build_tiny_clap(
    out_dir: str | Path,
    sampling_rate: int = 8000,
    seed: int = 0,
    words: list[str] | None = None,
    num_mel_bins: int = 16,
    hop_length: int = 32,
    fft_window_size: int = 256,
    max_length_s: int = 1,
) -> Path:
    """A random-weight ``ClapModel`` of the real (unfused HTSAT + RoBERTa) architecture, shrunk, with
    a ``ClapProcessor`` for ``sampling_rate``, saved like a hub checkpoint (safetensors).

    HTSAT geometry: ``freq_ratio = spec_size // num_mel_bins``; the log-mel ``[T, num_mel_bins]`` is
    stretched (bicubic) to ``spec_size * freq_ratio`` frames, folded into a ``spec_size`` square and
    patched with stride 4, so ``T = 1 + max_length_s * sampling_rate // hop_length`` must not exceed
    ``spec_size * freq_ratio``; the swin windows (4) must tile every stage's grid (16, then 8); the
    audio ``hidden_size`` is the last stage's width (``patch_embeds_hidden_size * 2**(stages-1)``)."""
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    from diffalign.models.tiny import WORDS
    from diffalign.models.tokenizer import build_roberta_tokenizer

    out = Path(out_dir)
    spec_size, patch, stem, depths = 4 * num_mel_bins, 4, 8, (1, 1)
    frames = 1 + max_length_s * sampling_rate // hop_length
    if frames > spec_size * (spec_size // num_mel_bins):
        raise ValueError(f"tiny CLAP: {frames} frames do not fit spec_size {spec_size}; raise hop_length")
    tok = build_roberta_tokenizer(list(words or WORDS) + "sound of dog barking rain car engine".split())
    text = ClapTextConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=82,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    audio = ClapAudioConfig(
        spec_size=spec_size,
        num_mel_bins=num_mel_bins,
        window_size=4,
        patch_size=patch,
        patch_stride=(patch, patch),
        patch_embeds_hidden_size=stem,
        depths=list(depths),
        num_attention_heads=[2, 4],
        hidden_size=stem * 2 ** (len(depths) - 1),
        enable_fusion=False,
        num_hidden_layers=len(depths),
    )
    torch.manual_seed(seed)
    model = ClapModel(
        ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=8)
    ).eval()
    with torch.no_grad():
        # the stock init (std 0.02) leaves a tiny text tower's first-token pooling blind to the prompt;
        # unit-scale weights make every token matter, as in a trained model
        for name, w in model.text_model.named_parameters():
            if w.ndim == 2:
                w.normal_(0.0, 1.0 if "embeddings" in name else w.shape[1] ** -0.5)
        for name, b in model.audio_model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                b.normal_(0.0, 0.5)
        bn = model.audio_model.audio_encoder.batch_norm  # running statistics of a log-mel (dB) input
        bn.running_mean.normal_(-10.0, 3.0)
        bn.running_var.uniform_(20.0, 60.0)
    fe = ClapFeatureExtractor(
        feature_size=num_mel_bins,
        sampling_rate=sampling_rate,
        hop_length=hop_length,
        max_length_s=max_length_s,
        fft_window_size=fft_window_size,
        frequency_min=50,
        frequency_max=0.45 * sampling_rate,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    fe.save_pretrained(
        str(out)
    )  # the hub layout of the LAION checkpoints: preprocessor_config.json + tokenizer files
    tok.save_pretrained(str(out))
    return out
