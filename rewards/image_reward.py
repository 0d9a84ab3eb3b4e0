"""ImageReward (Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation", NeurIPS 2023) rebuilt on transformers' BLIP modules.

**Reference implementation.** ``THUDM/ImageReward`` at commit ``c1392c6``: ``ImageReward/ImageReward.py``
(``ImageReward.score``, ``MLP``, the 224 px transform), ``ImageReward/utils.py`` (``load``: a plain state
dict ``ImageReward.pt`` plus ``med_config.json`` from the hub repo ``THUDM/ImageReward``),
``ImageReward/models/BLIP/blip_pretrain.py`` (``BLIP_Pretrain`` with ``vit='large'``),
``models/BLIP/blip.py`` (``create_vit``, ``init_tokenizer``), ``models/BLIP/vit.py`` (the ViT) and
``models/BLIP/med.py`` (the BERT text encoder with cross-attention).

**What the score is.** The prompt and the image go through BLIP's image-grounded text encoder; the hidden
state of the first token ([CLS]; ``score()`` does *not* swap it for [ENC]) is the 768-d joint feature,
which the paper's reward head (an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout between the first
layers and no activation functions) maps to a scalar ``r``. The returned score is the *normalised*
reward ``(r - 0.16717362830052426) / 1.0333394966054072``, the convention of the official ``score()``:
over the authors' reference set it is roughly standard normal, higher is better, and it is unbounded.

Code names versus the paper: ``vision`` is BLIP's image encoder (``blip.visual_encoder``, a ViT-L/16 at
224 px), ``text`` is BLIP's image-grounded text encoder (``blip.text_encoder``, "MED" in BLIP, a BERT-base
whose every layer adds cross-attention to the image tokens), ``mlp`` is the reward head f(·) of the
paper (``mlp.layers`` in the checkpoint). BLIP's contrastive projections (``blip.vision_proj``,
``blip.text_proj``) are in the checkpoint but unused by the score and therefore not loaded.

**How it is assembled from transformers.**

- ``BlipVisionModel`` matches BLIP's ``VisionTransformer`` layer for layer: 16x16 patch conv, a learned
  class token and absolute position embedding, pre-norm blocks with one fused ``qkv`` linear (bias on)
  and an output ``projection``, exact-erf GELU MLP with ratio 4, and a final LayerNorm. Its
  ``last_hidden_state`` is ``post_layernorm`` applied to every token, which is exactly BLIP's
  ``self.norm(x)`` output (transformers re-normalises only the pooled token, which is not used). BLIP's
  ViT LayerNorms use ``eps=1e-6`` (transformers' default is 1e-5, so it is set explicitly). The fused qkv
  is kept fused: the two layouts are the same ``[3*D, D]`` matrix split as (q, k, v).
- ``BlipTextModel`` is transformers' port of the same ``med.py``: embeddings are word + absolute position
  (no token types) then LayerNorm; each layer runs self-attention -> add & norm -> cross-attention to
  the image tokens -> add & norm -> GELU feed-forward -> add & norm. Parameter names are identical to
  the checkpoint's. The cross-attention blocks exist only when the config has ``is_decoder=True``; the
  forward pass is called with ``is_decoder=False`` so self-attention is bidirectional, as in the
  official encoder mode. Cross-attention keys/values take ``encoder_hidden_size`` = the ViT width (BLIP
  overwrites ``encoder_width`` with the vision width in the same way). ``add_pooling_layer=False``.
  Padding keys are masked with the dtype minimum instead of med.py's -10000; both give exactly zero
  attention weight after the softmax in float32/16.
- The head is an ``nn.Sequential`` with the same indices as the official ``MLP.layers`` (linear layers
  at 0, 2, 4, 6, 7), kept in float32 (the official ``score()`` casts the feature to float).

**Preprocessing** (in torch, on the whole batch), the torchvision ``Resize(224, BICUBIC)`` ->
``CenterCrop(224)`` -> CLIP mean/std of the official transform, which runs on the PIL image: the
shorter side goes to 224 and the longer to ``int(224 * long / short)`` (truncated, as torchvision
computes it), PIL's bicubic on the uint8 image (``preprocess.pil_resize``: quantised, resized with
PyTorch's uint8 port of PIL's filter, within 1/255 of PIL); the crop offset is
``int(round((side - 224) / 2))``. Text uses BERT's ``bert-base-uncased`` WordPiece tokenizer with
BLIP's extra tokens (bos ``[DEC]``, additional ``[ENC]``), ``padding='max_length', truncation=True,
max_length=35``, no other cleaning (as ``ImageReward.score``); prompts over 35 tokens warn once per
reward.

**Loading.** ``path`` is a hub id (default ``THUDM/ImageReward``; files fetched with
``huggingface_hub.hf_hub_download``, which honours ``HF_HUB_OFFLINE``) or a local folder holding
``ImageReward.pt`` (a state dict in the official naming; a ``.safetensors`` file with the same keys is
used when there is no ``.pt``) and optionally ``med_config.json`` (the text config; bert-base with a
30524-token vocabulary otherwise) and ``vocab.txt`` (the tokenizer; ``bert-base-uncased`` otherwise).
``convert_imagereward_state_dict`` renames the official keys to this module's names.

**Shrunk architectures (tests).** A folder may also hold ``diffalign_image_reward.json`` of the form
``{"vision_config": {...}, "text_config": {...}}``: ``vision_config`` entries override the ViT-L/16
defaults (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``patch_size``,
``image_size``, ``intermediate_size`` = 4 x hidden unless given, ...) and ``text_config`` entries
override ``med_config.json`` (``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``, ``intermediate_size``, ``max_position_embeddings``, ...). The constructor's
``vision_config`` / ``text_config`` keyword arguments override both. The preprocessing size follows
``vision_config["image_size"]``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from diffalign.errors import ConfigError

from .base import REWARDS, RewardOutput, batched, check_inputs, hub_file, is_local
from .open_clip import read_state_dict
from .preprocess import normalise, pil_resize
from .text import PromptTokenizer

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
OVERRIDE_FILE = "diffalign_image_reward.json"
HEAD_WIDTHS = (1024, 128, 64, 16)
HEAD_DROPOUTS = (0.2, 0.2, 0.1)

VISION_DEFAULTS = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 16,
    "image_size": 224,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
}
"""BLIP ``create_vit('large', 224)``: ViT-L/16, mlp ratio 4, LayerNorm eps 1e-6."""
TEXT_DEFAULTS = {
    "vocab_size": 30524,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
"""``med_config.json`` of ImageReward: bert-base plus [DEC] and [ENC] (30522 + 2 tokens)."""
_TEXT_KEYS = (*TEXT_DEFAULTS, "position_embedding_type")

# (official fragment, this module's fragment), applied to the name after the component prefix
_VISION_RULES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.", r"encoder.layers.\1.mlp.\2."),
    (r"^norm\.", "post_layernorm."),
)
_VISION_RULES_BACK = (
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
)


def _apply(rules, name: str) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return None


def convert_imagereward_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official ImageReward names -> :class:`ImageRewardNet` names; keys the score does not use are dropped.

    ``blip.visual_encoder.*`` -> ``vision.*`` (renamed to ``BlipVisionModel``; ``attn.qkv`` stays fused),
    ``blip.text_encoder.*`` -> ``text.*`` (same names in ``BlipTextModel``),
    ``mlp.layers.N.*`` -> ``mlp.N.*``.
    Dropped: ``blip.vision_proj``/``blip.text_proj``, any other head or momentum encoder, ``position_ids``.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith("blip.visual_encoder."):
            new = _apply(_VISION_RULES, key[len("blip.visual_encoder.") :])
            if new is not None:
                out["vision." + new] = value
        elif key.startswith("blip.text_encoder."):
            rest = key[len("blip.text_encoder.") :]
            if not rest.endswith("position_ids") and not rest.startswith("pooler."):
                out["text." + rest] = value
        elif key.startswith("mlp.layers."):
            out["mlp." + key[len("mlp.layers.") :]] = value
    return out


def official_name(name: str) -> str:
    """Inverse of :func:`convert_imagereward_state_dict` for one key (used in error messages)."""
    if name.startswith("vision."):
        return "blip.visual_encoder." + (
            _apply(_VISION_RULES_BACK, name[len("vision.") :]) or name[len("vision.") :]
        )
    if name.startswith("text."):
        return "blip.text_encoder." + name[len("text.") :]
    if name.startswith("mlp."):
        return "mlp.layers." + name[len("mlp.") :]
    return name


def imagereward_preprocess(images: Tensor, size: int = 224) -> Tensor:
    """``[B,3,H,W]`` in [0,1] -> normalised ``[B,3,size,size]``: torchvision's Resize (PIL bicubic on the
    uint8 image) and CenterCrop geometry."""
    H, W = images.shape[-2:]
    short, long = (W, H) if W <= H else (H, W)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if W <= H else (new_long, new_short)
    images = pil_resize(images, (new_h, new_w))  # [B,3,new_h,new_w] on the 1/255 grid
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return normalise(images[..., top : top + size, left : left + size], CLIP_MEAN, CLIP_STD)


class ImageRewardNet(nn.Module):
    """BLIP ViT + image-grounded BERT + reward head; ``forward`` returns the normalised reward ``[B]``."""

    def __init__(self, vision_config: dict, text_config: dict) -> None:
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        vcfg = BlipVisionConfig(**vision_config)
        tcfg = BlipTextConfig(
            **text_config,
            encoder_hidden_size=vcfg.hidden_size,
            is_decoder=True,
            use_cache=False,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        vcfg._attn_implementation = tcfg._attn_implementation = "eager"
        self.vision = BlipVisionModel(vcfg)
        self.text = BlipTextModel(tcfg, add_pooling_layer=False)
        widths = (tcfg.hidden_size, *HEAD_WIDTHS)
        layers: list[nn.Module] = []
        for i in range(len(HEAD_WIDTHS)):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(HEAD_DROPOUTS):
                layers.append(nn.Dropout(HEAD_DROPOUTS[i]))
        layers.append(nn.Linear(widths[-1], 1))
        self.mlp = nn.Sequential(*layers)  # linear layers at 0, 2, 4, 6, 7 like the official MLP.layers

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        hidden = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
            return_dict=True,
        ).last_hidden_state
        raw = self.mlp(hidden[:, 0, :].float()).squeeze(-1)
        return (raw - REWARD_MEAN) / REWARD_STD


def _resolve(path: str) -> tuple[Path, Path | None, Path | None]:
    """(checkpoint file, folder for optional files or None for the hub, med_config file or None)."""

    expected = (
        f"{CHECKPOINT} (or a .safetensors state dict) and optionally {MED_CONFIG}, vocab.txt, {OVERRIDE_FILE}"
    )
    if is_local(path):
        p = Path(path).expanduser()
        if p.is_file() and p.suffix in (".pt", ".pth", ".safetensors"):
            ckpt, p = p, p.parent
        elif not p.is_dir():
            raise ConfigError(
                f"image_reward: path {path!r} does not exist (expected a folder with {expected}, or a hub id)"
            )
        else:
            ckpt = p / CHECKPOINT
            if not ckpt.is_file():
                st = sorted(p.glob("*.safetensors"))
                if not st:
                    raise ConfigError(
                        f"image_reward: folder {path!r} has no checkpoint (expected {expected})"
                    )
                ckpt = p / "ImageReward.safetensors" if (p / "ImageReward.safetensors").is_file() else st[0]
        med = p / MED_CONFIG
        return ckpt, p, med if med.is_file() else None

    ckpt = hub_file(path, CHECKPOINT)
    try:
        med = hub_file(path, MED_CONFIG)
    except ConfigError:
        med = None
    return ckpt, None, med


def load_image_reward(
    path: str = "THUDM/ImageReward", vision_config: dict | None = None, text_config: dict | None = None
):
    """(:class:`ImageRewardNet` in eval mode on the CPU in float32, tokenizer, vision image size)."""
    from transformers import BertTokenizer
    from transformers.initialization import no_init_weights

    ckpt, folder, med = _resolve(path)
    vcfg, tcfg = dict(VISION_DEFAULTS), dict(TEXT_DEFAULTS)
    if med is not None:
        tcfg.update({k: v for k, v in json.loads(med.read_text()).items() if k in _TEXT_KEYS})
    if folder is not None and (folder / OVERRIDE_FILE).is_file():
        over = json.loads((folder / OVERRIDE_FILE).read_text())
        vcfg.update(over.get("vision_config", {}))
        tcfg.update(over.get("text_config", {}))
    vcfg.update(vision_config or {})
    tcfg.update(text_config or {})
    vcfg.setdefault("intermediate_size", 4 * vcfg["hidden_size"])
    if tcfg.pop("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(
            f"image_reward: {med} asks for relative position embeddings; only 'absolute' is supported"
        )

    source = str(folder) if folder is not None and (folder / "vocab.txt").is_file() else "bert-base-uncased"
    try:
        # uncased, as bert-base-uncased: stated, since transformers 5.0 did not lowercase a folder
        # holding only vocab.txt
        tok = BertTokenizer.from_pretrained(source, do_lower_case=True)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"image_reward: cannot load the BERT tokenizer from {source!r} ({type(e).__name__}); put "
            f"bert-base-uncased's vocab.txt next to {CHECKPOINT}"
        ) from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    if len(tok) > tcfg["vocab_size"]:
        raise ConfigError(
            f"image_reward: the tokenizer has {len(tok)} tokens but the text encoder only "
            f"{tcfg['vocab_size']} embeddings (vocab_size)"
        )
    # cosmetic for an encoder (generation is never run); keeps the config consistent with the vocabulary
    tcfg.update(bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)

    with no_init_weights():
        model = ImageRewardNet(vcfg, tcfg)
    sd = convert_imagereward_state_dict(read_state_dict(ckpt))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        names = ", ".join(official_name(k) for k in missing[:6]) + (
            f", ... ({len(missing)} in all)" if len(missing) > 6 else ""
        )
        raise ConfigError(f"image_reward: checkpoint {str(ckpt)!r} lacks keys the reward needs: {names}")
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        k, got, want = bad[0]
        raise ConfigError(
            f"image_reward: checkpoint {str(ckpt)!r} key {official_name(k)} has shape {got}, the configured "
            f"architecture wants {want} ({len(bad)} mismatches; check med_config.json/{OVERRIDE_FILE})"
        )
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
    return model.eval(), tok, int(vcfg["image_size"])


@REWARDS.register("image_reward")
class ImageReward:
    """ImageReward (Xu et al. 2023), normalised score ~N(0,1), higher is better (default ``THUDM/ImageReward``).

    ``vision_config`` / ``text_config`` override the architecture (see the module docstring).
    """  # noqa: E501 (the first line is long: `diffalign ls rewards` prints it whole)

    def __init__(
        self,
        path: str = "THUDM/ImageReward",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        vision_config: dict | None = None,
        text_config: dict | None = None,
    ) -> None:
        model, self.tokenizer, self.image_size = load_image_reward(path, vision_config, text_config)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        model.to(device=self.device, dtype=dtype)
        model.mlp.float()
        self.model = model
        self.prompts = PromptTokenizer(self.tokenizer, MAX_LENGTH, "image_reward", padding="max_length")

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        px = imagereward_preprocess(images.to(self.device, torch.float32), self.image_size).to(self.dtype)
        tok = self.prompts(prompts)  # input_ids, attention_mask [B,35]
        return self.model(px, tok.input_ids.to(self.device), tok.attention_mask.to(self.device))

    @torch.inference_mode()
    def __call__(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        check_inputs(images, prompts)
        self.prompts.check(prompts)
        return RewardOutput(batched(self.score, images, list(prompts), self.batch_size))
