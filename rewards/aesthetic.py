"""LAION aesthetic predictor v2 ("improved aesthetic predictor", C. Schuhmann 2022).

Reference implementation: ``christophschuhmann/improved-aesthetic-predictor@6934dd8`` --
``simple_inference.py``; the same head is ``utils/aesthetics_model`` in Diffusion-DPO and
``trl-lib/ddpo-aesthetic-predictor`` (``aesthetic-model.pth``) on the hub, our default.

Score: the OpenAI CLIP ViT-L/14 image embedding (768-d, standard CLIP preprocessing: shortest
side to 224 bicubic, centre crop, OpenAI mean/std), **L2-normalised**, through the "linear" MLP
``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` (dropout 0.2/0.2/0.1 between, no activations; state-dict
keys ``layers.{0,2,4,6,7}``). The output regresses the AVA mean rating (1-10 scale); SD images
typically land around 5-6.5. The prompt is not used (it is still checked for count, so the
reward keeps the common calling convention).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffalign.errors import ConfigError

from .base import REWARDS, hub_file, is_local
from .clip_family import ClipReward, load_clip


def aesthetic_mlp(dim: int = 768) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


@REWARDS.register("aesthetic")
class AestheticV2(ClipReward):
    """``path``: the CLIP ViT-L/14 (hub id or folder); ``head``: the MLP weights, a local file or
    ``repo_id:filename`` on the hub (``.pth`` read with ``weights_only=True``, or safetensors)."""

    uses_text = False

    def __init__(
        self,
        path: str = "openai/clip-vit-large-patch14",
        head: str = "trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        from .open_clip import read_state_dict

        self.model, self.tokenizer, self.pre = load_clip(path, device, dtype)
        hp = Path(head).expanduser()
        if hp.is_file():
            file = hp
        elif is_local(head) or ":" not in head:
            raise ConfigError(
                f"aesthetic: head weights {head!r} not found (a "
                "local .pth/.safetensors file or 'repo_id:filename')"
            )
        else:
            repo, _, name = head.partition(":")
            file = hub_file(repo, name)
        sd = read_state_dict(file)
        sd = {k.removeprefix("layers."): v for k, v in sd.items()}
        dim = self.model.config.projection_dim
        self.head = aesthetic_mlp(dim)
        try:
            self.head.load_state_dict(sd)
        except RuntimeError as e:
            raise ConfigError(
                f"aesthetic: {file} does not fit the 768-1024-128-64-16-1 head on a {dim}-d CLIP: "
                f"{str(e).splitlines()[0]}"
            ) from None
        self.head = self.head.to(device=device).eval()
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        emb = self.image_features(self.preprocess(images.to(self.device, torch.float32)))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.head(emb).squeeze(-1)
