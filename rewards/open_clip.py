"""OpenCLIP checkpoints served by ``transformers.CLIPModel``.

HPSv2 (and Diffusion-DPO's "CLIP" selector, GenEval's colour classifier) ship OpenCLIP state
dicts. Installing ``open_clip_torch`` drags in torchvision, whose wheels must match the torch
build exactly; the architecture itself is plain CLIP, so we map the state dict onto
``CLIPModel`` instead and keep one CLIP code path for every CLIP-family reward.

OpenCLIP ``VisionTransformer`` / text tower -> ``CLIPModel`` (open_clip ``model.py``,
``transformer.py``; the correspondence is the one the HF LAION checkpoints were converted with):

    visual.conv1                        -> vision_model.embeddings.patch_embedding (no bias)
    visual.class_embedding              -> vision_model.embeddings.class_embedding
    visual.positional_embedding         -> vision_model.embeddings.position_embedding
    visual.ln_pre / ln_post             -> vision_model.pre_layrnorm / post_layernorm
    visual.proj            [width, D]   -> visual_projection.weight [D, width] (transposed)
    token_embedding / positional_embedding -> text_model.embeddings.*
    ln_final                            -> text_model.final_layer_norm
    text_projection        [width, D]   -> text_projection.weight [D, width] (transposed)
    *.transformer.resblocks.i.ln_1/ln_2 -> *.encoder.layers.i.layer_norm1/2
    *.attn.in_proj_{weight,bias} [3w..] -> self_attn.{q,k,v}_proj (split in q, k, v order)
    *.attn.out_proj                     -> self_attn.out_proj
    *.mlp.c_fc / c_proj                 -> mlp.fc1 / fc2
    logit_scale                         -> logit_scale

Pooling agrees: OpenCLIP takes the class token after ``ln_post`` (LayerNorm is per token, so
CLIPModel's ``post_layernorm(x[:, 0])`` is the same) and the text feature at ``argmax(ids)``, the
end-of-text token, which CLIPModel finds as the first ``eos_token_id``. OpenCLIP applies only a
causal mask to text; CLIPModel's extra padding mask touches positions after end-of-text only.
The activation is exact GELU unless the config says ``quick_gelu`` (OpenAI weights).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffalign.errors import ConfigError

# open_clip/model_configs/ViT-H-14.json (HPSv2's fork has the same numbers)
VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
# open_clip/model_configs/ViT-L-14.json, used with quick_gelu for the OpenAI weights
VIT_L_14: dict[str, Any] = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
}


def clip_config_from_open_clip(cfg: dict[str, Any], eos_token_id: int = 49407, bos_token_id: int = 49406):
    """An OpenCLIP model config (``model_cfg`` of ``open_clip_config.json`` or a bare one) ->
    ``CLIPConfig``."""
    from transformers import CLIPConfig

    cfg = cfg.get("model_cfg", cfg)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    for bad in (
        "timm_model_name",
        "hf_model_name",
        "ls_init_value",
        "attentional_pool",
        "no_ln_pre",
        "no_causal_mask",
        "final_ln_after_pool",
        "output_tokens",
    ):
        if v.get(bad) or t.get(bad):
            raise ConfigError(
                f"OpenCLIP config uses {bad}; only the plain ViT + text transformer CLIP maps onto CLIPModel"
            )
    for key, ok in (("pool_type", ("tok", "argmax", None)),):
        if v.get(key) not in ok[:1] + (None,) or t.get(key) not in ok[1:]:
            raise ConfigError(
                f"OpenCLIP config sets {key}={v.get(key) or t.get(key)!r}; CLIPModel pools the class token "
                f"(vision) and the end-of-text token (text)"
            )
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    vw, tw = v["width"], t["width"]
    return CLIPConfig(
        projection_dim=cfg["embed_dim"],
        vision_config={
            "image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "hidden_size": vw,
            "intermediate_size": int(vw * v.get("mlp_ratio", 4.0)),
            "num_hidden_layers": v["layers"],
            "num_attention_heads": vw // v.get("head_width", 64),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
        text_config={
            "vocab_size": t["vocab_size"],
            "hidden_size": tw,
            "intermediate_size": int(tw * t.get("mlp_ratio", 4.0)),
            "num_hidden_layers": t["layers"],
            "num_attention_heads": t["heads"],
            "max_position_embeddings": t["context_length"],
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "eos_token_id": eos_token_id,
            "bos_token_id": bos_token_id,
            "pad_token_id": 0,
        },
    )


def _blocks(sd: dict[str, Tensor], src: str, dst: str, layers: int) -> dict[str, Tensor]:
    out = {}
    for i in range(layers):
        s, d = f"{src}.{i}.", f"{dst}.{i}."
        q, k, v = sd[s + "attn.in_proj_weight"].chunk(3, dim=0)
        qb, kb, vb = sd[s + "attn.in_proj_bias"].chunk(3, dim=0)
        out |= {
            d + "self_attn.q_proj.weight": q,
            d + "self_attn.k_proj.weight": k,
            d + "self_attn.v_proj.weight": v,
            d + "self_attn.q_proj.bias": qb,
            d + "self_attn.k_proj.bias": kb,
            d + "self_attn.v_proj.bias": vb,
        }
        for a, b in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            out[d + b + ".weight"], out[d + b + ".bias"] = sd[s + a + ".weight"], sd[s + a + ".bias"]
    return out


def convert_open_clip_state_dict(
    sd: dict[str, Tensor], vision_layers: int, text_layers: int
) -> dict[str, Tensor]:
    """OpenCLIP state dict -> ``CLIPModel`` state dict (see the module docstring for the map)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    need = [
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.proj",
        "token_embedding.weight",
        "positional_embedding",
        "text_projection",
        "ln_final.weight",
        "logit_scale",
    ]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ConfigError(
            f"not an OpenCLIP ViT checkpoint: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}"
        )
    out = {
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    out |= _blocks(sd, "visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers)
    out |= _blocks(sd, "transformer.resblocks", "text_model.encoder.layers", text_layers)
    # every source tensor must have been used: layer scale (ls_1/ls_2), attention pooling, extra
    # layers... would otherwise load without error and score wrongly
    used = set(need) | {
        "visual.ln_pre.weight",
        "visual.ln_pre.bias",
        "visual.ln_post.weight",
        "visual.ln_post.bias",
        "ln_final.bias",
        "attn_mask",
        "position_ids",
    }
    for tower, n in (("visual.transformer.resblocks", vision_layers), ("transformer.resblocks", text_layers)):
        for i in range(n):
            used |= {
                f"{tower}.{i}.{a}.{w}"
                for a in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj", "attn.out_proj")
                for w in ("weight", "bias")
            } | {f"{tower}.{i}.attn.in_proj_weight", f"{tower}.{i}.attn.in_proj_bias"}
    left = sorted(k for k in sd if k not in used)
    if left:
        raise ConfigError(
            f"OpenCLIP checkpoint has tensors this CLIPModel mapping does not cover (e.g. {left[:3]}); "
            f"only plain ViT + text transformer CLIPs (HPSv2, ViT-B/L/H) are supported"
        )
    return out


def read_state_dict(file: Path) -> dict[str, Tensor]:
    """safetensors, or a torch pickle read with ``weights_only=True``; unwraps ``{'state_dict': ...}``."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickles with code objects are refused on purpose)
        raise ConfigError(
            f"{file}: cannot be read as weights only ({type(e).__name__}); convert it to safetensors"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"{file}: expected a state dict, found {type(obj).__name__}")
    return obj


def clip_model_from_open_clip(
    sd: dict[str, Tensor], cfg: dict[str, Any], eos_token_id: int = 49407, bos_token_id: int = 49406
):
    """Build a ``CLIPModel`` with the OpenCLIP config and load the converted weights strictly."""
    from transformers import CLIPModel

    config = clip_config_from_open_clip(cfg, eos_token_id, bos_token_id)
    model = CLIPModel(config)
    conv = convert_open_clip_state_dict(
        sd, config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers
    )
    missing, unexpected = model.load_state_dict(conv, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ConfigError(
            f"OpenCLIP checkpoint does not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()


def open_clip_bpe_file() -> Path | None:
    """``bpe_simple_vocab_16e6.txt.gz`` shipped inside ``open_clip_torch`` (located, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        f = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
        if f.exists():
            return f
    return None


def clip_tokenizer_from_bpe(bpe_file: str | Path, context_length: int = 77):
    """The genuine CLIP tokenizer (OpenCLIP's ``SimpleTokenizer`` vocabulary) as a ``CLIPTokenizer``.

    Vocabulary order as in CLIP: 256 byte symbols, the same with ``</w>``, one token per merge
    (the first 48894 merge lines), then ``<|startoftext|>`` and ``<|endoftext|>`` (49406, 49407).
    """
    from transformers import CLIPTokenizer

    from diffalign.models.tokenizer import byte_symbols

    lines = gzip.open(bpe_file, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1] if m.strip()]
    # bytes_to_unicode lists printable bytes first, then the others as chr(256 + n): ordering the
    # 256 symbols by code point gives CLIP's vocabulary order, not byte order
    symbols = sorted(byte_symbols(), key=ord)
    vocab = (
        symbols
        + [s + "</w>" for s in symbols]
        + ["".join(m) for m in merges]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=[(a, b) for a, b in merges],
        model_max_length=context_length,
        pad_token="<|endoftext|>",
    )


def load_open_clip_folder(path: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """(model config, weights file) from a folder in the hub layout of OpenCLIP models."""
    cfg = (
        json.loads((path / "open_clip_config.json").read_text())
        if (path / "open_clip_config.json").exists()
        else None
    )
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if (path / name).exists():
            return cfg, path / name
    return cfg, None
