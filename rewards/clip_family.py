"""CLIP-family rewards on ``transformers.CLIPModel``: PickScore and CLIP score.

- **PickScore** (Kirstain et al. 2023; ``yuvalkirstain/PickScore_v1``, processor of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``): ``logit_scale.exp() * cos(image, text)``.
- **CLIP score** (Hessel et al. 2021, torchmetrics ``CLIPScore`` convention): ``100 * max(cos, 0)``.

Preprocessing follows the checkpoint's ``preprocessor_config.json`` (CLIPImageProcessor): resize
the shortest side to ``size`` (PIL's bicubic on the uint8 image, restated batched in torch by
``preprocess.pil_resize``), center crop to ``crop_size``, normalise with its mean/std. Text goes
through ``CLIPTokenizerFast`` (what ``CLIPProcessor`` uses) with padding and truncation to the text
tower's context (77 for real CLIP), a warning once per reward when prompts are cut; OpenCLIP
folders use open_clip's cleaning first (``text.py``). The toy ShapesWorld rewards are ``CLIPModel``
checkpoints too and load through the same classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import REWARDS, RewardOutput, batched, check_inputs
from .preprocess import normalise, pil_resize
from .text import PromptTokenizer, open_clip_clean, require_ftfy

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def load_clip(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """CLIPModel + tokenizer + preprocessing constants from a hub id or local folder.

    A folder holds either a transformers checkpoint (``config.json`` + safetensors) or an OpenCLIP
    one (``open_clip_config.json`` + ``open_clip_model.safetensors``/``open_clip_pytorch_model.bin``
    + tokenizer files), which is converted on load (see ``open_clip.py``). ``pre["text"]`` says
    whose prompt handling the checkpoint's recipe uses: ``"open_clip"`` or ``"hf"`` (``text.py``).
    The tokenizer is always ``CLIPTokenizerFast`` (transformers 4.x's ``CLIPTokenizer`` is the slow one)."""
    from transformers import CLIPModel
    from transformers import CLIPTokenizerFast as CLIPTokenizer

    from diffalign.errors import ConfigError

    from .base import is_local

    p = Path(path).expanduser()
    pre = {"size": 224, "crop": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD, "text": "hf"}
    if is_local(path) and not p.is_dir():
        raise ConfigError(
            f"reward model path {path!r} does not exist (expected a CLIPModel folder or a hub id)"
        )
    if is_local(path) and not (p / "config.json").exists():
        from .open_clip import clip_model_from_open_clip, load_open_clip_folder, read_state_dict

        cfg, weights = load_open_clip_folder(p)
        if cfg is None or weights is None:
            raise ConfigError(
                f"reward model path {path!r} has neither config.json (transformers CLIPModel) nor "
                "open_clip_config.json + open_clip_model.safetensors (OpenCLIP)"
            )
        tok = CLIPTokenizer.from_pretrained(str(p))
        model = clip_model_from_open_clip(read_state_dict(weights), cfg, tok.eos_token_id, tok.bos_token_id)
        size = cfg.get("model_cfg", cfg)["vision_cfg"]["image_size"]
        pc = cfg.get("preprocess_cfg", {})
        pre |= {
            "size": size,
            "crop": size,
            "mean": pc.get("mean", OPENAI_MEAN),
            "std": pc.get("std", OPENAI_STD),
            "text": "open_clip",
        }
        return model.to(device=device, dtype=dtype), tok, pre
    model = CLIPModel.from_pretrained(path, use_safetensors=True).to(device=device, dtype=dtype).eval()
    tok = CLIPTokenizer.from_pretrained(path)
    cfg_file = p / "preprocessor_config.json"
    if not cfg_file.exists() and not p.exists():
        from huggingface_hub import hf_hub_download

        cfg_file = Path(hf_hub_download(path, "preprocessor_config.json"))
    if cfg_file.exists():
        c = json.loads(cfg_file.read_text())
        size, crop = c.get("size", 224), c.get("crop_size", 224)
        pre["size"] = size.get("shortest_edge", size) if isinstance(size, dict) else size
        pre["crop"] = crop.get("height", crop) if isinstance(crop, dict) else crop
        pre["mean"], pre["std"] = c.get("image_mean", pre["mean"]), c.get("image_std", pre["std"])
    return model, tok, pre


def clip_resize_size(H: int, W: int, size: int) -> tuple[int, int]:
    """CLIPImageProcessor / torchvision geometry: short side = size, long side
    ``int(size * long / short)``."""
    return (size, int(size * W / H)) if H <= W else (int(size * H / W), size)


def clip_preprocess(images: Tensor, size: int, crop: int, mean: list[float], std: list[float]) -> Tensor:
    """``[B,3,H,W]`` in [0,1] -> normalised ``[B,3,crop,crop]``: CLIPImageProcessor's resize (shortest
    side, PIL bicubic on uint8), center crop (offset ``(side - crop) // 2``), rescale, normalise."""
    images = pil_resize(images, clip_resize_size(*images.shape[-2:], size))  # [B,3,h,w] on the 1/255 grid
    H, W = images.shape[-2:]
    top, left = (H - crop) // 2, (W - crop) // 2
    return normalise(images[..., top : top + crop, left : left + crop], mean, std)


class ClipReward:
    uses_text = True
    """False for rewards that ignore the prompt (the aesthetic predictor): no truncation warning."""

    def __init__(
        self,
        path: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        self.model, self.tokenizer, self.pre = load_clip(path, device, dtype)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        if self.pre.get("text") == "open_clip":
            require_ftfy(self.name)

    @property
    def name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)

    @property
    def prompts(self) -> PromptTokenizer:
        """The reward's prompt tokenisation (made on first use, so subclasses with their own
        ``__init__`` get it too): cut to the text tower's context (77 for CLIP), whatever the
        tokenizer file says; open_clip's cleaning for OpenCLIP checkpoints."""
        if getattr(self, "_prompts", None) is None:
            ctx = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
            clean = None
            if self.pre.get("text") == "open_clip":
                require_ftfy(self.name)
                clean = open_clip_clean
            self._prompts = PromptTokenizer(self.tokenizer, ctx, self.name, clean=clean)
        return self._prompts

    def preprocess(self, images: Tensor) -> Tensor:
        return clip_preprocess(images, self.pre["size"], self.pre["crop"], self.pre["mean"], self.pre["std"])

    def image_features(self, px: Tensor) -> Tensor:
        img = self.model.get_image_features(pixel_values=px.to(self.dtype))
        # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
        return getattr(img, "pooler_output", img).float()

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        px = self.preprocess(images.to(self.device, torch.float32))  # [B,3,crop,crop]
        tok = self.prompts(prompts)  # input_ids, attention_mask [B,L], L <= 77
        img = self.image_features(px)
        txt = self.model.get_text_features(
            input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device)
        )
        txt = getattr(txt, "pooler_output", txt)
        return F.cosine_similarity(img, txt.float(), dim=-1)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        check_inputs(images, prompts)
        if self.uses_text:
            self.prompts.check(prompts)
        return RewardOutput(batched(self.score, images, list(prompts), self.batch_size))


@REWARDS.register("pickscore")
class PickScore(ClipReward):
    """PickScore: ``logit_scale.exp() * cos`` of CLIP-H embeddings (default ``yuvalkirstain/PickScore_v1``)."""  # noqa: E501 (`diffalign ls rewards` prints this line whole)

    def __init__(self, path: str = "yuvalkirstain/PickScore_v1", **kw) -> None:
        super().__init__(path, **kw)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)


@REWARDS.register("clip_score")
class CLIPScore(ClipReward):
    """CLIP score, torchmetrics convention ``100 * max(cos, 0)`` (default ``openai/clip-vit-large-patch14``)."""  # noqa: E501 (`diffalign ls rewards` prints this line whole)

    def __init__(self, path: str = "openai/clip-vit-large-patch14", **kw) -> None:
        super().__init__(path, **kw)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return 100.0 * self.cosine(images, prompts).clamp(min=0)
