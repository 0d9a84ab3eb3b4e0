"""Load a pipeline (hub id or local folder) and wrap it in its family's adapter.

``from_pretrained`` is the real diffusers path for real checkpoints and for the tiny/toy
pipelines alike. ``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub; a missing local folder or
an uncached hub id in offline mode gives a one-line ``ModelLoadError`` instead of a traceback.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ModelConfig
from .base import Adapter, Family, Modality, PredictionType

PIPELINE_FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "AnimateDiffPipeline": "animatediff",
    "TextToVideoSDPipeline": "text2video",
    "AudioLDMPipeline": "audioldm",
    "FluxPipeline": "flux",
    "WanPipeline": "wan",
    "QwenImagePipeline": "qwenimage",
}
FAMILY_PIPELINE: dict[Family, str] = {f: c for c, f in PIPELINE_FAMILIES.items()}
FAMILY_MODALITY: dict[Family, Modality] = {
    "sd": "image",
    "sdxl": "image",
    "sd3": "image",
    "animatediff": "video",
    "text2video": "video",
    "audioldm": "audio",
    "flux": "image",
    "wan": "video",
    "qwenimage": "image",
}
FLOW_FAMILIES: tuple[Family, ...] = ("sd3", "flux", "wan", "qwenimage")
"""Rectified-flow families: velocity target ``eps - x0``, sigma-indexed timesteps."""
# the trainable module's class per family (full fine-tuning export / reload)
DENOISER_CLASS: dict[Family, tuple[str, str]] = {
    "sd": ("unet", "UNet2DConditionModel"),
    "sdxl": ("unet", "UNet2DConditionModel"),
    "sd3": ("transformer", "SD3Transformer2DModel"),
    "animatediff": ("unet", "UNetMotionModel"),
    "text2video": ("unet", "UNet3DConditionModel"),
    "audioldm": ("unet", "UNet2DConditionModel"),
    "flux": ("transformer", "FluxTransformer2DModel"),
    "wan": ("transformer", "WanTransformer3DModel"),
    "qwenimage": ("transformer", "QwenImageTransformer2DModel"),
}


class ModelLoadError(ConfigError):
    """The model path cannot be resolved or loaded."""


def default_device(device: str | None = None) -> str:
    """``device`` when given, else CUDA when there is one, else the CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def read_model_index(path: str, revision: str | None = None) -> dict[str, Any]:
    """``model_index.json`` of a local folder or a hub repo (honours ``HF_HUB_OFFLINE``)."""
    p = Path(path).expanduser()
    if p.exists():
        f = p / "model_index.json"
        if not f.is_file():
            raise ModelLoadError(
                f"model.path {path!r} has no model_index.json: not a diffusers pipeline folder"
            )
        return json.loads(f.read_text())
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelLoadError(
            f"model.path {path!r} does not exist (expected a local diffusers folder or a hub id 'org/name')"
        )
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "model_index.json", revision=revision)).read_text())
    except Exception as e:  # offline, not cached, no such repo, gated ...
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else type(e).__name__
        raise ModelLoadError(f"model.path {path!r}: cannot fetch model_index.json ({why})") from None


def resolve_family(mcfg: ModelConfig) -> Family:
    index = read_model_index(mcfg.path, mcfg.revision)
    cls = index.get("_class_name", "")
    family = PIPELINE_FAMILIES.get(cls)
    if mcfg.family != "auto":
        if family is not None and family != mcfg.family:
            raise ModelLoadError(f"model.family: {mcfg.family!r} but {mcfg.path} is a {cls} ({family!r})")
        return mcfg.family
    if family is None:
        raise ModelLoadError(
            f"model.path {mcfg.path!r} is a {cls or 'unknown pipeline'}; "
            f"supported: {', '.join(PIPELINE_FAMILIES)}"
        )
    return family


def _check_prediction_type(mcfg: ModelConfig, family: Family, scheduler: Any) -> PredictionType:
    if family in FLOW_FAMILIES:
        found: PredictionType = "flow_matching"
    else:
        found = scheduler.config.prediction_type
        if found not in ("epsilon", "v_prediction"):
            raise ModelLoadError(
                f"{mcfg.path}: scheduler prediction_type {found!r} is not supported (epsilon, v_prediction)"
            )
    if mcfg.prediction_type not in ("auto", found):
        raise ModelLoadError(
            f"model.prediction_type: {mcfg.prediction_type!r} but {mcfg.path} is trained for {found!r} "
            f"(scheduler config); remove the override or set it to {found!r}"
        )
    return found


def load_adapter(
    mcfg: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    denoiser_dtype: torch.dtype | None = None,
) -> Adapter:
    """Load the pipeline named by ``mcfg`` and return its adapter on ``device``.

    Weights load as fp32 whatever their stored precision (fp16 files, like the shipped toy models,
    are upcast), then the frozen parts are cast to ``dtype``.
    ``dtype`` applies to the frozen parts (VAE, text encoders); the denoiser stays fp32 unless
    ``denoiser_dtype`` says otherwise: the loop passes the mixed-precision dtype for LoRA runs (a
    low-precision frozen base under fp32 adapters; cast on the way to the device, so a 12B FLUX
    transformer never sits on the GPU in fp32), and nothing for full fine-tuning (fp32 master weights)."""
    family = resolve_family(mcfg)
    kw: dict[str, Any] = {"revision": mcfg.revision, "variant": mcfg.variant}
    # components saved as null (e.g. SD3 without T5) must be passed as None explicitly
    index = read_model_index(mcfg.path, mcfg.revision)
    nulls = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    if family == "sd":
        nulls |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = pipeline_class(family, mcfg.path).from_pretrained(
        mcfg.path, torch_dtype=torch.float32, **nulls, **kw
    )
    sched = training_scheduler(family, pipe, mcfg.path, kw)
    cls = adapter_class(family)
    pred = _check_prediction_type(mcfg, family, sched)
    sampling = mcfg.timestep_sampling
    if sampling == "auto":  # each family's training-script default (see the adapters' docstrings)
        sampling = "logit_normal" if family == "sd3" else "uniform"
    extra: dict[str, Any] = {}
    if family == "audioldm":
        from .audio import MelConfig

        extra["mel"] = MelConfig(**model_settings(mcfg.path).get("mel", {}))
    adapter = cls(pipe, sched, pred, sampling, mcfg.logit_mean, mcfg.logit_std, **extra)
    length = pipeline_call_defaults(mcfg.path).get("max_sequence_length", mcfg.max_sequence_length)
    if length is not None:  # else the adapter keeps its family pipeline's default (see ModelConfig)
        adapter.max_sequence_length = length
    for m in adapter.frozen_modules():
        m.requires_grad_(False)
        m.eval()
    adapter.to(device, dtype, denoiser_dtype)
    return adapter


def training_scheduler(family: Family, pipe: Any, path: str, kw: dict[str, Any]) -> Any:
    """The scheduler whose grid training draws from: DDPM for epsilon/v families; the checkpoint's
    ``FlowMatchEulerDiscreteScheduler`` for SD3/FLUX/Qwen-Image (static shift applied, dynamic shift
    not: see ``flux.py``); for Wan, whose pipeline samples with UniPC, a flow-matching grid with the
    checkpoint's static ``flow_shift`` (``wan.py``)."""
    import diffusers

    if family not in FLOW_FAMILIES:
        return diffusers.DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    if family == "wan" and not isinstance(pipe.scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
        cfg = pipe.scheduler.config
        return diffusers.FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=cfg.num_train_timesteps, shift=cfg.get("flow_shift") or 1.0
        )
    return diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw)


def model_settings(path: str | Path) -> dict[str, Any]:
    """A model folder's ``diffalign.json`` (empty for ordinary checkpoints): ``call_defaults`` for
    sampling (the toy SD3 model, trained without T5, wants ``max_sequence_length=0``) and, for
    audio models, the ``mel`` front end (see ``models/audio.py``)."""
    f = Path(path) / "diffalign.json"
    return json.loads(f.read_text()) if f.is_file() else {}


ADAPTER_CLASSES: dict[Family, tuple[str, str]] = {
    "sd": ("sd", "SDAdapter"),
    "sdxl": ("sdxl", "SDXLAdapter"),
    "sd3": ("sd3", "SD3Adapter"),
    "animatediff": ("video", "VideoAdapter"),
    "text2video": ("video", "TextToVideoAdapter"),
    "audioldm": ("audio", "AudioLDMAdapter"),
    "flux": ("flux", "FluxAdapter"),
    "wan": ("wan", "WanAdapter"),
    "qwenimage": ("qwenimage", "QwenImageAdapter"),
}
"""family -> (module of ``diffalign.models``, adapter class)."""


def adapter_class(family: Family) -> type[Adapter]:
    """The family's adapter class, its module imported when first asked for: a run loads its own
    family's module (and the diffusers pipeline and model code it pulls in), not all nine (the audio
    module alone pulls in AudioLDM and CLAP, 1-2 s of every start-up)."""
    module, name = ADAPTER_CLASSES[family]
    return getattr(importlib.import_module(f".{module}", __package__), name)


def pipeline_class(family: Family, path: str | Path) -> type:
    """The diffusers pipeline class of ``family``; an AudioLDM folder whose ``diffalign.json`` says
    ``"text_conditioning": "tokens"`` loads as :class:`~diffalign.models.audio.TokenAudioLDMPipeline`."""
    import diffusers

    cond = model_settings(path).get("text_conditioning", "pooled")
    if family == "audioldm" and cond != "pooled":
        if cond != "tokens":
            raise ModelLoadError(
                f"{Path(path) / 'diffalign.json'}: text_conditioning {cond!r}; valid choices: pooled, tokens"
            )
        from .audio import TokenAudioLDMPipeline

        return TokenAudioLDMPipeline
    return getattr(diffusers, FAMILY_PIPELINE[family])


def pipeline_call_defaults(path: str | Path) -> dict[str, Any]:
    return model_settings(path).get("call_defaults", {})


def load_pipeline(
    path: str | Path, device: torch.device | str = "cpu", **components: Any
) -> tuple[Any, dict[str, Any]]:
    """Any supported pipeline folder or hub id -> (pipeline, extra keyword arguments for calling it).
    ``components`` replace pipeline parts (e.g. ``unet=...``)."""

    index = read_model_index(str(path))
    family = PIPELINE_FAMILIES.get(index.get("_class_name", ""))
    if family is None:
        raise ModelLoadError(
            f"{path}: unsupported pipeline {index.get('_class_name')!r}; "
            f"supported: {', '.join(PIPELINE_FAMILIES)}"
        )
    kw: dict[str, Any] = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    if family == "sd":
        kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = (
        pipeline_class(family, path)
        .from_pretrained(str(path), torch_dtype=torch.float32, **{**kw, **components})
        .to(device)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipeline_call_defaults(path)


def load_trained_pipeline(path: str | Path, device: torch.device | str = "cpu") -> Any:
    """A diffusers pipeline with trained weights applied, from a run folder (its latest
    checkpoint) or a checkpoint folder. LoRA runs load through ``pipe.load_lora_weights``; full
    fine-tuning runs replace the denoiser with the exported one."""
    import diffusers

    p = Path(path)
    if (p / "checkpoints").is_dir():
        latest = p / "checkpoints" / "latest"
        if not latest.exists():
            raise ModelLoadError(f"{p}: run folder has no complete checkpoint yet")
        p = p / "checkpoints" / latest.read_text().strip()
    if not (p / "state.json").is_file():
        raise ModelLoadError(f"{path}: not a diffalign run or checkpoint folder (no state.json)")
    state = json.loads((p / "state.json").read_text())
    export = p / "export"
    if state["lora"]:
        pipe, _ = load_pipeline(state["model_path"], device)
        if (export / "lora.safetensors").is_file():  # pipelines without diffusers' LoRA loader
            from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
            from safetensors.torch import load_file

            den = getattr(pipe, DENOISER_CLASS[state["family"]][0])
            inject_adapter_in_model(LoraConfig(**json.loads((export / "lora_config.json").read_text())), den)
            set_peft_model_state_dict(den, load_file(str(export / "lora.safetensors")))
            return pipe.to(device)
        pipe.load_lora_weights(str(export))
        return pipe
    name, den_name = DENOISER_CLASS[state["family"]]
    den_cls = getattr(diffusers, den_name)
    pipe, _ = load_pipeline(
        state["model_path"], device, **{name: den_cls.from_pretrained(str(export / name))}
    )
    return pipe.to(device)
