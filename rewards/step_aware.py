"""Step-aware preference model (SPM) of SPO (Liang et al., CVPR 2025).

Reference implementation: RockeyCoss/SPO@27a8642 ``step_aware_preference_model/trainer/models/
time_conditioned_clip.py`` (model) and ``trainer/criterions/spm_criterion.py`` (training).

A CLIP preference model (PickScore-initialised in the paper) whose vision tower is conditioned on
the diffusion timestep, so it can judge the *predicted x0* of a noisy latent: a DiT-style
``TimestepEmbedder`` (sinusoidal 256 -> MLP -> hidden) feeds, in every vision encoder layer, an
``adaLN_modulation`` producing (shift, scale, gate) for the attention and the MLP branch
(``modulate(LN(x)) -> branch -> * gate``), plus (shift, scale) on the pooled output after
``post_layernorm``. Score: ``logit_scale.exp() * cos(image(t), text)`` as PickScore.

Here the modulation is attached to an unmodified ``transformers.CLIPModel`` with forward hooks
on ``layer_norm1``/``self_attn``/``layer_norm2``/``mlp``/``post_layernorm`` (same arithmetic as
the reference's rewritten layer, without copying the CLIP code). Deviation: the reference
initialises every adaLN bias to 1 (shift = scale = gate = 1, so at init the model computes
``2 LN(x) + 1`` and differs from PickScore); we initialise shift = scale = 0 and gate = 1, so an
untrained SPM equals its CLIP exactly (``test_rewards``), which is what "initialised from
PickScore" intends.

Saved as a folder: the CLIP checkpoint (config.json, safetensors, tokenizer, preprocessor config)
plus ``spm_time.safetensors`` (embedder + modulations) and ``spm.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from diffalign.errors import ConfigError

from .base import REWARDS, RewardOutput, check_inputs
from .clip_family import ClipReward, load_clip

TIME_FILE, META_FILE = "spm_time.safetensors", "spm.json"


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t (``dim`` frequencies, max period 10000) -> 2-layer SiLU MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def _adaln(hidden: int, chunks: int, gates: tuple[int, ...]) -> nn.Sequential:
    lin = nn.Linear(hidden, chunks * hidden)
    nn.init.zeros_(lin.weight)
    bias = torch.zeros(chunks * hidden)
    for g in gates:  # gates start at 1: identity at init
        bias[g * hidden : (g + 1) * hidden] = 1.0
    lin.bias = nn.Parameter(bias)
    return nn.Sequential(nn.SiLU(), lin)


class TimeConditioning(nn.Module):
    """The trainable time modules; ``attach`` hooks them into a CLIPModel's vision tower."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = TimestepEmbedder(hidden)
        self.layers = nn.ModuleList([_adaln(hidden, 6, gates=(2, 5)) for _ in range(layers)])
        self.post = _adaln(hidden, 2, gates=())
        self._mods: list[tuple[Tensor, ...]] | None = None
        self._post: tuple[Tensor, Tensor] | None = None

    def set_time(self, t: Tensor) -> None:
        c = self.embed(t)
        self._mods = [m(c).chunk(6, dim=-1) for m in self.layers]
        self._post = self.post(c).chunk(2, dim=-1)

    def attach(self, clip: nn.Module) -> None:
        vision = clip.vision_model
        for i, layer in enumerate(vision.encoder.layers):

            def mod(which: int, i: int = i):
                def hook(_m, _inp, out):
                    shift, scale = self._mods[i][3 * which], self._mods[i][3 * which + 1]
                    return out * (1 + scale[:, None]) + shift[:, None]

                return hook

            def gate(which: int, i: int = i):
                def hook(_m, _inp, out):
                    g = self._mods[i][3 * which + 2][:, None]
                    return (out[0] * g, *out[1:]) if isinstance(out, tuple) else out * g

                return hook

            layer.layer_norm1.register_forward_hook(mod(0))
            layer.self_attn.register_forward_hook(gate(0))
            layer.layer_norm2.register_forward_hook(mod(1))
            layer.mlp.register_forward_hook(gate(1))

        def post(_m, _inp, out):
            shift, scale = self._post
            return out * (1 + scale) + shift

        vision.post_layernorm.register_forward_hook(post)


@REWARDS.register("step_aware")
class StepAwarePM(ClipReward):
    """SPM: ``path`` is a saved SPM folder, or a CLIP folder/hub id (untrained time modules,
    i.e. exactly that CLIP until ``diffalign train-spm`` trains them). ``t`` is a call argument
    (default 0: clean images)."""

    def __init__(
        self,
        path: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        self.model, self.tokenizer, self.pre = load_clip(path, device, dtype)
        vc = self.model.config.vision_config
        self.time = TimeConditioning(vc.hidden_size, vc.num_hidden_layers)
        f = Path(path) / TIME_FILE
        if f.exists():
            from safetensors.torch import load_file

            missing, unexpected = self.time.load_state_dict(load_file(str(f)), strict=False)
            if missing or unexpected:
                raise ConfigError(
                    f"{f}: does not fit this CLIP (missing {missing[:2]}, unexpected {unexpected[:2]})"
                )
        self.time.to(device=device, dtype=dtype)
        self.time.attach(self.model)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size

    def logits(self, images: Tensor, prompts: list[str], t: Tensor) -> Tensor:
        """``logit_scale.exp() * cos`` with gradients (for training); t ``[B]``."""
        self.time.set_time(t.to(self.device))
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)

    @staticmethod
    def _times(t: Tensor | int | float | None, B: int) -> Tensor:
        """``t``: None (clean images), one number for all, or one per image -> float ``[B]``."""
        if t is None:
            return torch.zeros(B)
        tt = torch.as_tensor(t, dtype=torch.float32).flatten()
        if tt.numel() == 1:
            return tt.expand(B).clone()
        if tt.numel() != B:
            raise ConfigError(
                f"step_aware: {tt.numel()} timesteps for {B} images (give one, or one per image)"
            )
        return tt

    def score(self, images: Tensor, prompts: list[str], t: Tensor | None = None) -> Tensor:
        tt = torch.zeros(images.shape[0]) if t is None else t
        return self.logits(images, prompts, tt)

    @torch.inference_mode()
    def __call__(self, images: Tensor, prompts: list[str], t: Tensor | int | None = None) -> RewardOutput:
        check_inputs(images, prompts)
        self.prompts.check(prompts)
        B = images.shape[0]
        tt = self._times(t, B)
        out = [
            self.score(
                images[i : i + self.batch_size],
                list(prompts[i : i + self.batch_size]),
                tt[i : i + self.batch_size],
            )
            for i in range(0, B, self.batch_size)
        ]
        return RewardOutput(torch.cat(out).float().cpu())

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        self.model.save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))
        (folder / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_processor_type": "CLIPImageProcessor",
                    "size": {"shortest_edge": self.pre["size"]},
                    "crop_size": {"height": self.pre["crop"], "width": self.pre["crop"]},
                    "image_mean": self.pre["mean"],
                    "image_std": self.pre["std"],
                    "do_resize": True,
                    "do_center_crop": True,
                    "do_normalize": True,
                    "resample": 3,
                }
            )
        )
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.time.state_dict().items()},
            str(folder / TIME_FILE),
        )
        (folder / META_FILE).write_text(
            json.dumps({"kind": "step_aware_preference_model", "base": "CLIPModel"})
        )
        return folder
