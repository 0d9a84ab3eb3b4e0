"""Typed configs: YAML files plus ``key=value`` overrides, validated before any model loads.

A config is a tree of dataclasses. ``load_config`` reads YAML (``yaml.safe_load``), applies dotted
overrides, and converts the result into dataclasses, rejecting unknown keys (with close-match
suggestions) and values outside a ``Literal``'s choices. ``validate`` then runs the semantic
checks that need no model: the objective exists and accepts the given hyperparameters, the data
path exists and has the needed columns, option combinations are coherent.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .registry import suggest


@dataclass
class ModelConfig:
    path: str = ""
    """Hub id (``org/name``) or a local diffusers pipeline folder (with ``model_index.json``)."""
    family: Literal[
        "auto", "sd", "sdxl", "sd3", "animatediff", "text2video", "audioldm", "flux", "wan", "qwenimage"
    ] = "auto"
    """``auto`` reads the pipeline class from ``model_index.json``."""
    prediction_type: Literal["auto", "epsilon", "v_prediction", "flow_matching"] = "auto"
    """``auto`` reads it from the scheduler config; an explicit value must agree with it."""
    revision: str | None = None
    variant: str | None = None
    timestep_sampling: Literal["auto", "uniform", "logit_normal"] = "auto"
    """``auto``: uniform for DDPM-family models, logit-normal for flow matching (SD3 recipe)."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    max_sequence_length: int | None = None
    """Text tokens of the long text encoder (SD3/3.5 and FLUX T5, Qwen-Image, Wan UMT5); unset: the
    family pipeline's own default (SD3 256; FLUX, Qwen-Image and Wan 512), so training encodes prompts
    as sampling does. Pipelines without T5 (the toy models) train and sample with 0 (their
    ``diffalign.json``) so no constant padding tokens enter the joint attention."""


@dataclass
class LoraConfig:
    rank: int = 8
    """LoRA rank; 0 means full fine-tuning of the denoiser."""
    alpha: float | None = None
    """LoRA alpha; ``None`` uses ``alpha = rank`` (the diffusers DPO scripts' choice)."""
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    init: Literal["gaussian", "default"] = "gaussian"


@dataclass
class ObjectiveConfig:
    name: str = "diffusion_dpo"
    """Registered objective name (``diffalign ls objectives``)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Hyperparameters of the objective; in YAML write them next to ``name``."""


@dataclass
class DataConfig:
    path: str = ""
    """Parquet file/folder (Pick-a-Pic schema), a JSONL file, a pairs folder, or a ``datasets`` id."""
    format: Literal["auto", "parquet", "jsonl", "folder", "hf", "ranked"] = "auto"
    """``ranked``: Syn-Pic style parquet, one row per prompt with k images, ``phi`` and ``rank``."""
    split: str = "train"
    resolution: int = 512
    center_crop: bool = True
    """False: random crop (the crop offset feeds SDXL's micro-conditioning)."""
    random_flip: bool = False
    drop_ties: bool = True
    """Drop ``label_0 == 0.5`` pairs (official Diffusion-DPO); False keeps them as ``jpg_0`` wins."""
    max_pairs: int | None = None
    score_column: str | None = None
    """Per-image reward scores for objectives that use them (SmPO): parquet columns
    ``<name>_0``/``<name>_1`` (e.g. ``ps_score``) or ``score_0.<name>``/``score_1.<name>``
    (``diffalign label``)."""
    caption_dropout: float = 0.0
    """Probability of training a pair unconditionally; applied identically to both images."""
    cache_dir: str | None = "auto"
    """Folder written by ``diffalign cache``: latents and text embeddings, so the VAE and text encoders
    do no work during training. ``auto`` (default): a cache kept under ``$DIFFALIGN_CACHE_HOME``
    (default ``~/.cache/diffalign``) per data and model, reused by every later run over the same data,
    built at start-up when the run reads every row anyway (``data.cache.auto_cache``); off, with the
    reason printed, under random crops/flips, for objectives that read reward scores, or when it
    would not pay. ``null``: never cache."""
    allow_outside_paths: bool = False
    """JSONL image paths must lie inside the JSONL file's folder (``../`` and absolute paths are
    refused, naming the line); true reads them wherever they point."""
    num_workers: int = 0
    """DataLoader worker processes decoding and augmenting upcoming batches while the model trains
    (0: in the training process). The batches are identical either way."""
    allow_incomplete: bool = False
    """``format: ranked`` on a Syn-Pic folder: train on the shards that verify when the set is not
    complete (no valid ``index.json``, or shards that do not match it), saying how many were left
    out. False refuses such a set, naming the folder and the fix (rerun ``diffalign synpic``)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 1
    """Pairs per process per micro-step."""
    grad_accum: int = 1
    lr: float = 1e-5
    scale_lr: bool = False
    """Multiply ``lr`` by batch_size * grad_accum * num_processes (the official launchers' ``--scale_lr``)."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 0
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping (the norm is still logged)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"
    ema_decay: float = 0.0
    """EMA of the trainable weights; 0 disables. The exported final weights are the EMA weights."""
    reference: Literal["auto", "lora_off", "copy", "none"] = "auto"
    """auto: adapter-off with LoRA, frozen copy for full fine-tuning, none for reference-free objectives."""
    precompute_reference: bool = False
    """Compute every reference error the run will use (same pairs, noise and t) in a pre-pass with
    the base weights, then train with no reference model in memory and no reference forwards."""
    compile: bool = False
    """``torch.compile`` the denoiser (the first steps pay the compile time)."""
    channels_last: bool = False
    """Channels-last memory format for UNet denoisers (faster convolutions on GPUs)."""
    auto_beta_target: float = 0.0
    """Stability: adapt beta so the mean gradient factor sigmoid(-margin) stays near this value
    (e.g. 0.3); 0 disables. See ``diffalign.train.stability``."""
    auto_beta_rate: float = 0.05
    margin_cap: float = 0.0
    """Stability: pairs whose margin exceeds this get no loss (0 disables)."""
    divergence_window: int = 50
    """Stability: steps over which the divergence warning looks for rising policy errors (0 disables)."""
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 1
    max_bad_steps: int = 3
    """A step whose gradients are not finite is skipped (counted as ``train/bad_steps``); this many
    in a row stop the run with an error, as do non-finite weights after an update."""
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """Where metrics go besides ``metrics.jsonl`` (always written): TensorBoard under
    ``<output_dir>/tb``, Weights & Biases (``pip install wandb``; project = the run folder's name), or
    nowhere else."""
    sample_prompts: list[str] = field(default_factory=list)
    """At every checkpoint, sample these prompts with the current weights (same seeds each time)
    into ``<output_dir>/samples/step-N.png`` and the tracker; empty: off."""
    sample_steps: int = 20
    sample_guidance: float = 5.0
    max_minutes: float = 0.0
    """Wall-clock budget in minutes: the first step that ends past it is checkpointed and training
    stops there (resume with the same config to go on towards ``max_steps``); 0: no budget."""
    guard_every: int = 0
    """Over-optimisation guard (``train.overopt``): every this many steps (and at the last), sample
    ``guard_prompts`` with the current weights and score them with the ``guard_gold`` rewards (a
    scorer other than the training reward) and the training reward; 0: off."""
    guard_prompts: str = ""
    """Held-out prompts file (one per line, or JSONL with ``prompt``) for the guard."""
    guard_gold: str = ""
    """Gold reward specs for the guard, comma-separated ``name=path`` (e.g. another reward model, or
    the exact judge in the toy worlds)."""
    guard_images: int = 2
    """Images per guard prompt (fixed seeds: every evaluation sees the same noise)."""
    reward_process: bool = False
    """Rollout objectives (online_dpo, flow_grpo, grpo, diffusion_nft): score ``objective.rewards`` in
    a separate process that loads the reward models once (``diffalign.rewards.process``, spawned;
    each DDP process starts its own, on its device); the training process sends it the decoded
    images. Scores are bit-identical to scoring in the training process. The guard's gold rewards
    stay in the training process."""
    reward_timeout: float = 600.0
    """Seconds the training process waits for its reward process to load the rewards, or to score
    one request, before it stops it and ends with an error (``train.reward_process`` only)."""
    halt_after_step: int | None = None
    """Testing aid: stop right after this step's checkpoint, as a killed job would."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- dict -> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, key: str) -> Any:  # noqa: C901 (one branch per annotation kind)
    """Check ``value`` against the annotation ``tp``; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}: {value!r} is not a valid choice; valid choices: {', '.join(map(str, choices))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: {value!r} is invalid")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML reads .inf / .nan as floats; no option means either
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with suggestions."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    data = dict(data)
    if cls is ObjectiveConfig:
        # objective hyperparameters sit next to `name` in YAML: {name: diffusion_dpo, beta: 5000}
        params = dict(data.pop("params", None) or {})
        params.update({k: data.pop(k) for k in list(data) if k != "name"})
        data["params"] = params
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"unknown config key {full!r}.{suggest(k, names)}")
        kwargs[k] = coerce(v, hints[k], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    # flatten objective params back next to the name, the way users write it
    if "objective" in d:
        obj = d["objective"]
        d["objective"] = {"name": obj["name"], **obj["params"]}
    return d


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=1e-5)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, return a type-checked ``Config``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {str(p)!r} is a folder; give the YAML file inside it")
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(
                f"{p}{where}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__})"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections (model, data, train, ...)")
        data = loaded or {}
    for ov in overrides:
        keys, value = parse_override(ov)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return from_dict(Config, _yamlish_floats(data))


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _yamlish_floats(d: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; users mean a number."""
    if isinstance(d, dict):
        return {k: _yamlish_floats(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_yamlish_floats(v) for v in d]
    if isinstance(d, str) and _SCI.match(d):
        return float(d)
    return d


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- semantic checks


def validate(cfg: Config, *, check_data: bool = True) -> None:  # noqa: C901 (one branch per config rule)
    """Checks that need no model weights. Raises ``ConfigError`` naming the key."""
    from .objectives import build_objective

    objective = build_objective(cfg.objective)  # unknown name / unknown or mistyped hyperparameter
    from .train.stability import check_reports_margin, check_supports_beta

    if cfg.train.auto_beta_target:
        check_supports_beta(objective, cfg.objective.name)
    if cfg.train.margin_cap:
        check_reports_margin(objective, cfg.objective.name)
    if not cfg.model.path:
        raise ConfigError("model.path is empty: give a hub id (org/name) or a local diffusers folder")
    t = cfg.train
    for key, value, lo in [
        ("train.max_steps", t.max_steps, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.grad_accum", t.grad_accum, 1),
        ("train.checkpoint_every", t.checkpoint_every, 1),
        ("train.log_every", t.log_every, 1),
        ("data.resolution", cfg.data.resolution, 8),
        ("lora.rank", cfg.lora.rank, 0),
        ("train.warmup_steps", t.warmup_steps, 0),
        ("train.keep_checkpoints", t.keep_checkpoints, 1),
        ("train.max_bad_steps", t.max_bad_steps, 1),
        ("train.max_minutes", t.max_minutes, 0.0),
        ("train.guard_every", t.guard_every, 0),
        ("train.guard_images", t.guard_images, 1),
        ("train.divergence_window", t.divergence_window, 0),
        ("train.lr", t.lr, 0.0),
        ("train.weight_decay", t.weight_decay, 0.0),
        ("train.max_grad_norm", t.max_grad_norm, 0.0),
        ("data.num_workers", cfg.data.num_workers, 0),
        ("data.max_pairs", 1 if cfg.data.max_pairs is None else cfg.data.max_pairs, 1),
    ]:
        if value < lo:
            raise ConfigError(f"{key}: must be >= {lo}, got {value}")
    # optimizer settings that torch would only reject once the model is loaded
    for key, value in [("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)]:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}: must be in [0, 1), got {value}")
    if t.lr > 1.0:  # also keeps the optimizer's fp32 arithmetic from overflowing (lr 1e39 crashes AdamW)
        raise ConfigError(
            f"train.lr: must be <= 1, got {t.lr:g} (diffusion fine-tuning uses about 1e-8 to 1e-3)"
        )
    if t.adam_eps <= 0:
        raise ConfigError(f"train.adam_eps: must be > 0, got {t.adam_eps}")
    if cfg.lora.alpha is not None and cfg.lora.alpha <= 0:
        raise ConfigError(f"lora.alpha: must be > 0 (or unset: = rank), got {cfg.lora.alpha}")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.data.resolution % 8:
        raise ConfigError(
            f"data.resolution: must be a multiple of 8 (VAE downsampling), got {cfg.data.resolution}"
        )
    if not 0.0 <= cfg.data.caption_dropout < 1.0:
        raise ConfigError(f"data.caption_dropout: must be in [0, 1), got {cfg.data.caption_dropout}")
    if t.auto_beta_target and not 0.0 < t.auto_beta_target < 0.5:
        raise ConfigError(f"train.auto_beta_target: must be in (0, 0.5) or 0 (off), got {t.auto_beta_target}")
    if t.margin_cap < 0 or t.auto_beta_rate <= 0:
        raise ConfigError("train.margin_cap must be >= 0 and train.auto_beta_rate > 0")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {t.ema_decay}")
    if t.guard_every and not (t.guard_prompts and t.guard_gold):
        raise ConfigError(
            "train.guard_every: the over-optimisation guard needs train.guard_prompts (held-out prompts) "
            "and train.guard_gold (reward specs other than the training reward)"
        )
    from .rewards import check_reward_names

    if cfg.objective.params.get("rewards"):
        check_reward_names(str(cfg.objective.params["rewards"]), "objective.rewards")
    if t.guard_gold:
        check_reward_names(t.guard_gold, "train.guard_gold")
    if t.guard_every and not Path(t.guard_prompts).is_file():
        raise ConfigError(f"train.guard_prompts: {t.guard_prompts!r} does not exist")
    if t.reward_timeout <= 0:
        raise ConfigError(f"train.reward_timeout: must be > 0 seconds, got {t.reward_timeout:g}")
    if t.reward_process and not hasattr(objective, "rewards"):
        raise ConfigError(
            f"train.reward_process: objective {cfg.objective.name!r} scores no rewards (only rollout "
            "objectives with objective.rewards do); set train.reward_process=false"
        )
    if t.reference == "none" and objective.needs_reference and not t.precompute_reference:
        raise ConfigError(
            f"train.reference: 'none' but objective {cfg.objective.name!r} needs a reference model; "
            f"use 'auto', "
            f"or train.precompute_reference=true to train without one in memory"
        )
    if t.report_to == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "train.report_to: 'wandb' is not installed (pip install wandb); use 'tensorboard' or 'none'"
            )
    if t.sample_prompts and t.sample_steps < 1:
        raise ConfigError(
            f"train.sample_steps: must be >= 1 when train.sample_prompts is set, got {t.sample_steps}"
        )
    if t.reference == "lora_off" and cfg.lora.rank == 0:
        raise ConfigError(
            "train.reference: 'lora_off' needs LoRA (lora.rank > 0); use 'copy' for full fine-tuning"
        )
    if cfg.data.cache_dir and cfg.data.cache_dir != "auto" and cfg.data.random_flip:  # auto: uncached
        raise ConfigError(
            "data.random_flip: cannot flip cached latents; set data.random_flip=false or drop data.cache_dir"
        )
    if t.attention == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ConfigError(
                "train.attention: 'xformers' is not installed (pip install 'diffalign[xformers]'); use 'sdpa'"
            )
    if t.optimizer == "adamw8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("train.optimizer: 'adamw8bit' needs bitsandbytes (pip install bitsandbytes)")
    if check_data and objective.source == "rollout":  # data.path is a prompts file
        from .synpic import read_prompts

        read_prompts(cfg.data.path)
    elif check_data:
        from .data.pairs import check_source

        check_source(cfg.data)
