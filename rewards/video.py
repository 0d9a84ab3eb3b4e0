"""Video reward on ``transformers.CLIPModel``: ``video_clip``.

Call with ``(videos [B,F,3,H,W] float in [0,1], prompts)``; returns ``scores`` ``[B]`` (float32, CPU).
The mode follows the checkpoint's vision tower:

- **frame CLIP** (an ordinary image CLIP, ``vision_config.num_channels == 3``): every frame is
  preprocessed and embedded like an image by the CLIP rewards (``clip_family``), and

      score = mean_f logit_scale.exp() * cos(frame_f, text)
              +  temporal_weight * mean_f cos(frame_f, frame_f+1)

  i.e. the frame-averaged PickScore-style CLIP score (the "CLIP-SIM" of video generation papers) plus
  a temporal-consistency term, the mean cosine of consecutive frames' image embeddings (a one-frame
  clip has nothing to change: its term is 1). Sub-scores ``"frames"`` and ``"temporal"`` (the
  unweighted term) are reported separately. A frame-level reward is blind to motion direction.
- **early-fusion video CLIP** (``vision_config.num_channels == 3 * F``): the ``F`` frames are
  preprocessed one by one (the same resize, crop and mean/std as an image), then stacked along
  channels frame-major (frame 0 RGB, frame 1 RGB, ...) into one ``[3F, crop, crop]`` input, one
  embedding per clip; ``score = logit_scale.exp() * cos(clip, text)`` (sub-score ``"cosine"``).
  The checkpoint fixes ``F``: clips with another frame count are refused.

Checkpoints load through :func:`.clip_family.load_clip` (hub id or local folder, safetensors only;
``preprocessor_config.json`` gives size, crop and mean/std).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.errors import ConfigError

from .base import REWARDS, RewardOutput
from .clip_family import ClipReward

DEFAULT_VIDEO_CLIP = "openai/clip-vit-large-patch14"


def check_video_inputs(videos: Tensor, prompts: list[str] | tuple[str, ...]) -> None:  # noqa: C901 (one branch per input check)
    """One-line errors for video rewards: ``videos`` is ``[B,F,3,H,W]`` float in [0,1], one prompt
    per clip."""
    if not isinstance(videos, Tensor) or videos.ndim != 5 or videos.shape[2] != 3:
        shape = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        hint = ""
        if isinstance(videos, Tensor) and videos.ndim == 5 and videos.shape[1] == 3:
            hint = " (channels before frames? use videos.permute(0, 2, 1, 3, 4))"
        elif isinstance(videos, Tensor) and videos.ndim == 5 and videos.shape[-1] == 3:
            hint = " (channels last? use videos.permute(0, 1, 4, 2, 3))"
        elif isinstance(videos, Tensor) and videos.ndim == 4:
            hint = " (a single clip or an image batch? add the batch or frame axis)"
        raise ConfigError(f"reward input: videos must be a [B,F,3,H,W] tensor, got {shape}{hint}")
    if not videos.is_floating_point():
        raise ConfigError(
            "reward input: videos must be float in [0,1], got "
            f"dtype {videos.dtype} (uint8 frames: divide by 255)"
        )
    if len(prompts) == 0:
        raise ConfigError("reward input: the prompt list is empty")
    if videos.shape[0] == 0:
        raise ConfigError("reward input: the video batch is empty")
    if videos.shape[1] == 0:
        raise ConfigError("reward input: the videos have no frames (F = 0)")
    if videos.shape[3] == 0 or videos.shape[4] == 0:
        raise ConfigError(f"reward input: the frames are empty ({videos.shape[3]}x{videos.shape[4]} pixels)")
    if not torch.isfinite(videos).all():
        raise ConfigError("reward input: videos hold NaN or inf values")
    lo, hi = float(videos.min()), float(videos.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ConfigError(
            "reward input: videos must be in [0,1], got values in "
            f"[{lo:.3f}, {hi:.3f}] (convert from [-1,1] with x/2+0.5)"
        )
    if len(prompts) != videos.shape[0]:
        raise ConfigError(f"reward input: {videos.shape[0]} videos but {len(prompts)} prompts")


@REWARDS.register("video_clip")
class VideoCLIPScore(ClipReward):
    """Video CLIP score: frame-averaged CLIP score + ``temporal_weight`` * frame-to-frame consistency
    for an image CLIP, or one clip embedding for an early-fusion video CLIP (see the module doc)."""

    modality = "video"

    def __init__(
        self,
        path: str = DEFAULT_VIDEO_CLIP,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        temporal_weight: float = 1.0,
    ) -> None:
        super().__init__(path, device=device, dtype=dtype, batch_size=batch_size)
        self.temporal_weight = float(temporal_weight)
        channels = int(self.model.config.vision_config.num_channels)
        if channels < 3 or channels % 3:
            raise ConfigError(
                f"video_clip: the vision tower of {path!r} takes {channels} channels; "
                "expected 3 (image CLIP, scored per frame) or 3 * frames (early-fusion video CLIP)"
            )
        self.fusion_frames = channels // 3 if channels > 3 else None
        """Frames an early-fusion checkpoint stacks along channels; ``None`` for an image CLIP."""

    @property
    def mode(self) -> str:
        return "frames" if self.fusion_frames is None else "fusion"

    def text_features(self, prompts: list[str]) -> Tensor:
        """Normalised text embeddings ``[B,D]`` (truncated to the text tower's context)."""
        tok = self.prompts(list(prompts))  # input_ids, attention_mask [B,L], L <= the context
        txt = self.model.get_text_features(
            input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device)
        )
        return F.normalize(getattr(txt, "pooler_output", txt).float(), dim=-1)

    def frame_pixels(self, videos: Tensor) -> Tensor:
        """``[B,F,3,H,W]`` in [0,1] -> per-frame CLIP preprocessing, ``[B,F,3,crop,crop]``."""
        B, Fr = videos.shape[:2]
        px = self.preprocess(videos.to(self.device, torch.float32).flatten(0, 1))
        return px.view(B, Fr, *px.shape[1:])

    def clip_scores(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Scores and sub-scores of one chunk, each ``[B]`` float32."""
        B, Fr = videos.shape[:2]
        px = self.frame_pixels(videos)
        txt = self.text_features(prompts)
        scale = self.model.logit_scale.exp().float()
        if self.fusion_frames is not None:
            # frame-major channel stack: [B,F,3,h,w] -> [B,3F,h,w] is frame 0 RGB, frame 1 RGB, ...
            emb = F.normalize(self.image_features(px.flatten(1, 2)), dim=-1)
            cos = (emb * txt).sum(-1)
            return {"scores": scale * cos, "cosine": cos}
        emb = F.normalize(self.image_features(px.flatten(0, 1)), dim=-1).view(B, Fr, -1)
        frames = scale * (emb * txt[:, None]).sum(-1).mean(1)
        if Fr > 1:
            temporal = (emb[:, 1:] * emb[:, :-1]).sum(-1).mean(1)
        else:
            temporal = torch.ones(B, device=emb.device)
        return {"scores": frames + self.temporal_weight * temporal, "frames": frames, "temporal": temporal}

    @torch.inference_mode()
    def __call__(self, videos: Tensor, prompts: list[str]) -> RewardOutput:
        check_video_inputs(videos, prompts)
        if self.fusion_frames is not None and videos.shape[1] != self.fusion_frames:
            raise ConfigError(
                f"reward input: this early-fusion video CLIP takes clips of {self.fusion_frames} frames, "
                f"got {videos.shape[1]}"
            )
        prompts = list(prompts)
        self.prompts.check(prompts)
        parts = [
            self.clip_scores(videos[i : i + self.batch_size], prompts[i : i + self.batch_size])
            for i in range(0, videos.shape[0], self.batch_size)
        ]
        out = {k: torch.cat([p[k] for p in parts]).float().cpu() for k in parts[0]}
        scores = out.pop("scores")
        return RewardOutput(scores, out)
