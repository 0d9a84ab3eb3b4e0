"""HPSv2 / HPSv2.1: Human Preference Score v2 (Wu et al. 2023, arXiv 2306.09341).

Reference implementation: ``tgxs002/HPSv2@866735e`` -- ``hpsv2/img_score.py`` (score),
``hpsv2/src/open_clip/transform.py`` (``ResizeMaxSize``, ``image_transform``),
``hpsv2/utils.py`` (checkpoint names). The model is OpenCLIP ViT-H-14 fine-tuned end to end, no
extra head; checkpoints ``HPS_v2_compressed.pt`` (v2.0) / ``HPS_v2.1_compressed.pt`` (v2.1) in
hub repo ``xswu/HPSv2`` hold an OpenCLIP state dict, loaded here with ``weights_only=True`` and
mapped onto ``transformers.CLIPModel`` (``open_clip.py``; no open_clip/torchvision needed).

Preprocessing (``preprocess_val`` with ``light_augmentation``), on the PIL image (so our float
input is first quantised to the uint8 grid): to tensor, resize the *longest*
side to 224 (bicubic, on the tensor), zero-pad the short side symmetrically
(left/top get ``pad // 2``), then OpenAI mean/std -- so pad pixels are black, not grey. The
resize is antialiased, as torchvision >= 0.17 does on tensors by default. One deviation: the
original skips the pad when the longest side is already 224, which would give the model a
non-square input and fail; we always pad to a square.

Score: ``cos(image, text)`` of the L2-normalised features (``img_score.score``: the diagonal of
``image_features @ text_features.T``), raw cosine about 0.2-0.35. ``scale="x100"`` (default)
multiplies by 100, the scale of the README tables and ``evaluation.py``; ``scale="cosine"``
returns the raw value that ``hpsv2.score`` and Diffusion-DPO's selector use. v2.0 and v2.1 scores
are not comparable; the default here is v2.1 (``hpsv2.evaluate``'s default).

Text: the fork's ``tokenize`` -- open_clip's cleaning (``ftfy.fix_text``, ``html.unescape`` twice,
whitespace runs to one space, lowercase; ``text.open_clip_clean``), then CLIP BPE cut to 77 tokens
with end-of-text last. ftfy is therefore required. Prompts over 77 tokens warn once per reward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.errors import ConfigError

from .base import REWARDS, hub_file, is_local
from .clip_family import OPENAI_MEAN, OPENAI_STD, ClipReward
from .preprocess import to_uint8

CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
TOKENIZER_HUB_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the same CLIP BPE, in transformers format


def pad_preprocess(images: Tensor, size: int, mean: list[float], std: list[float]) -> Tensor:
    """``[B,3,H,W]`` in [0,1] -> ``[B,3,size,size]``: quantised as the PIL image the reference reads
    (``round(255 x) / 255``), longest side to ``size`` (float bicubic, antialiased, unclamped, as
    torchvision's tensor resize), zero pad, normalise."""
    images = to_uint8(images).float().div_(255)  # [B,3,H,W] on the 1/255 grid
    H, W = images.shape[-2:]
    s = size / max(H, W)
    nh, nw = round(H * s), round(W * s)
    if (nh, nw) != (H, W):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    ph, pw = size - nh, size - nw
    images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images - m) / sd


def _tokenizer(source: str | None, folder: Path | None):
    # the fast tokenizer: under transformers 4.x ``CLIPTokenizer`` is the slow one (ftfy-dependent)
    from transformers import CLIPTokenizerFast as CLIPTokenizer

    from .open_clip import clip_tokenizer_from_bpe, open_clip_bpe_file

    if source is not None and source.endswith(".gz"):
        return clip_tokenizer_from_bpe(source)
    if (
        source is None
        and folder is not None
        and any((folder / f).exists() for f in ("tokenizer.json", "vocab.json"))
    ):
        source = str(folder)
    if source is None:
        bpe = open_clip_bpe_file()
        if bpe is not None:
            return clip_tokenizer_from_bpe(bpe)
        source = TOKENIZER_HUB_ID
    try:
        return CLIPTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"hpsv2: cannot load the CLIP tokenizer from {source!r} ({type(e).__name__}); pass "
            "tokenizer=<folder or bpe_simple_vocab_16e6.txt.gz> or install open_clip_torch"
        ) from None


@REWARDS.register("hpsv2")
class HPSv2(ClipReward):
    """HPSv2 / v2.1 on ``CLIPModel``; ``path``: hub id, a checkpoint file, or a folder holding one.

    A folder may also hold ``open_clip_config.json`` (another architecture than ViT-H-14, e.g. a
    shrunk one in tests) and tokenizer files; otherwise the tokenizer is ``tokenizer`` (a folder,
    hub id or CLIP ``.txt.gz`` BPE file), else open_clip's bundled BPE if installed, else
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s.
    """

    def __init__(
        self,
        path: str = "xswu/HPSv2",
        version: Literal["v2.0", "v2.1"] = "v2.1",
        scale: Literal["x100", "cosine"] = "x100",
        tokenizer: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        from .open_clip import VIT_H_14, clip_model_from_open_clip, read_state_dict
        from .text import require_ftfy

        require_ftfy("hpsv2")
        if version not in CHECKPOINTS:
            raise ConfigError(f"hpsv2: unknown version {version!r}; choose one of {sorted(CHECKPOINTS)}")
        if scale not in ("x100", "cosine"):
            raise ConfigError(f"hpsv2: unknown scale {scale!r}; choose 'x100' or 'cosine'")
        p = Path(path).expanduser()
        folder: Path | None = None
        if p.is_file():
            weights, folder = p, p.parent
        elif p.is_dir():
            folder = p
            names = [CHECKPOINTS[version], "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            found = [p / n for n in names if (p / n).exists()]
            if not found:
                raise ConfigError(f"hpsv2: {path} holds none of {names}")
            weights = found[0]
        elif is_local(path):
            raise ConfigError(f"hpsv2: checkpoint path {path!r} does not exist")
        else:
            weights = hub_file(path, CHECKPOINTS[version])
        cfg_file = folder / "open_clip_config.json" if folder else None
        cfg = json.loads(cfg_file.read_text()) if cfg_file and cfg_file.exists() else VIT_H_14
        self.tokenizer = _tokenizer(tokenizer, folder)
        model = clip_model_from_open_clip(
            read_state_dict(weights), cfg, self.tokenizer.eos_token_id, self.tokenizer.bos_token_id
        )
        self.model = model.to(device=device, dtype=dtype)
        size = cfg.get("model_cfg", cfg)["vision_cfg"]["image_size"]
        self.pre = {"size": size, "crop": size, "mean": OPENAI_MEAN, "std": OPENAI_STD, "text": "open_clip"}
        self.device, self.dtype, self.batch_size, self.scale = torch.device(device), dtype, batch_size, scale

    def preprocess(self, images: Tensor) -> Tensor:
        return pad_preprocess(images, self.pre["size"], self.pre["mean"], self.pre["std"])

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        cos = self.cosine(images, prompts)
        return 100.0 * cos if self.scale == "x100" else cos
