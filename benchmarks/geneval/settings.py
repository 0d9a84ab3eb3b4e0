"""``diffalign eval`` settings: the configuration, the sampling settings and the run folder's manifest.

Sampling settings (steps, guidance, image size, images per prompt, batch size) come, each on its own,
from the command line; else, when ``--out`` already holds the base model's images (``eval.json``) from
an earlier eval of the same model, from that eval (so ``--compare`` added later inherits the base run's
settings and the two are paired); else from the defaults: 20 steps and guidance 4 with ``--toy``, 50
steps and guidance 9 otherwise (GenEval's generation script), 4 images per prompt, batches of 16. The
demo samples at 15 steps and guidance 4: pass ``--steps 15 --guidance 4`` to judge its models as it
did. A value given on the command line that differs from the images already in ``--out`` is refused in
one line. ``--per-prompt`` and ``--batch`` are among them because they set the fixed grid of batches
the images are generated on (see ``generation.py``): a rerun on another grid would mix images made in
other batches, which differ at bit level. A model folder recorded before they were (no ``per_prompt``
/ ``batch`` in its entry) is not checked on them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...files import write_json_atomic
from .detectors import Thresholds

LABELS = ("model", "compare")
SAMPLING_DEFAULTS = {
    "toy": {"steps": 20, "guidance": 4.0, "per_prompt": 4, "batch": 16},
    "geneval": {"steps": 50, "guidance": 9.0, "per_prompt": 4, "batch": 16},
}
SAMPLING_KEYS = ("steps", "guidance", "size", "per_prompt", "batch")
GRID_KEYS = ("per_prompt", "batch")  # recorded since the batch grid was; older entries lack them
FLAGS = {k: "--" + k.replace("_", "-") for k in SAMPLING_KEYS}


@dataclass
class EvalConfig:
    model: str
    out: str
    compare: str | None = None
    metadata: str | None = None
    """GenEval ``evaluation_metadata.jsonl``."""
    toy: str | None = None
    """ShapesWorld split: 'train' or 'heldout'."""
    templates: int | None = None
    """GenEval-style suite from templates: draws per tag (GenEval: 100)."""
    prompts: list[str] = field(default_factory=list)
    """Plain prompt files (reward-only evaluation)."""
    n_prompts: int | None = None
    prompt_seed: int | None = None
    per_prompt: int | None = None
    """Default: the base model's earlier eval in ``out``, else 4 (GenEval)."""
    steps: int | None = None
    """Default: the base model's earlier eval in ``out``, else 20 for --toy, 50 otherwise."""
    guidance: float | None = None
    """Default: the base model's earlier eval in ``out``, else 4.0 for --toy, 9.0 otherwise."""
    size: int | None = None
    """Default: the base model's earlier eval in ``out``, else the pipeline's own size."""
    seed: int = 0
    detector: str | None = None
    """'shapes' (default for --toy), 'mask2former' or 'mask2former=PATH' (default otherwise)."""
    color_clip: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    rewards: list[str] = field(default_factory=list)
    pairing: str = "all"
    batch: int | None = None
    """Images per generation (and scoring) batch. Default: the base model's earlier eval in ``out``,
    else 16. Part of the sampling settings: it sets the batch grid the images are made on."""
    device: str | None = None
    n_boot: int = 2000
    report: bool = True


def _bad_number(value: Any, lo: float, hi: float | None, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return True
    if integer and not isinstance(value, int):
        return True
    return not math.isfinite(value) or value < lo or (hi is not None and value > hi)


def check_options(cfg: EvalConfig) -> None:
    """Every option's range, in one line naming the option, before any folder, model or prompt is
    touched (``None`` means "the default" and is always fine)."""
    t = cfg.thresholds
    # option, value, lowest, highest (None: unbounded), must be an integer, what it is
    checks: list[tuple[str, Any, float, float | None, bool, str]] = [
        ("--per-prompt", cfg.per_prompt, 1, None, True, "images per prompt"),
        ("--n-prompts", cfg.n_prompts, 1, None, True, "prompts to use"),
        ("--geneval-templates", cfg.templates, 1, None, True, "draws per tag"),
        ("--steps", cfg.steps, 1, None, True, "sampling steps"),
        ("--guidance", cfg.guidance, 0, None, False, "a CFG scale; 1 or less is no guidance"),
        ("--size", cfg.size, 8, None, True, "image height and width in pixels"),
        ("--seed", cfg.seed, 0, None, True, "a seed"),
        ("--prompt-seed", cfg.prompt_seed, 0, None, True, "a seed"),
        ("--batch", cfg.batch, 1, None, True, "images per batch"),
        ("--bootstrap", cfg.n_boot, 1, None, True, "bootstrap resamples"),
        ("--threshold", t.score, 0, 1, False, "a detection confidence"),
        ("--counting-threshold", t.counting, 0, 1, False, "a detection confidence"),
        ("--max-objects", t.max_objects, 1, None, True, "objects per class"),
        ("--position-threshold", t.position, 0, 1, False, "a fraction of the image"),
    ]
    for flag, value, lo, hi, integer, what in checks:
        if value is not None and _bad_number(value, lo, hi, integer):
            span = f"in [{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
            kind = "an integer" if integer else "a finite number"
            raise ConfigError(f"{flag}: must be {kind} {span} ({what}), got {value!r}")
    if cfg.size is not None and cfg.size % 8:
        raise ConfigError(f"--size: must be a multiple of 8 (VAE downsampling), got {cfg.size}")
    if cfg.pairing not in ("all", "seed"):
        raise ConfigError(f"--pairing must be 'all' or 'seed', got {cfg.pairing!r}")
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {cfg.out!r} is a file, not a folder; give a folder for the eval run")
    for flag, spec in (("--model", cfg.model), ("--compare", cfg.compare)):
        if spec is not None:
            _check_model_spec(flag, spec)


def _check_model_spec(flag: str, spec: str) -> None:
    """A local model exists and is a pipeline or a diffalign run; anything else looks like a hub id."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if not any((p / n).exists() for n in ("model_index.json", "checkpoints", "state.json")):
            raise ConfigError(
                f"{flag} {spec!r}: neither a diffusers pipeline folder (model_index.json) nor a diffalign "
                "run or checkpoint folder"
            )
    elif p.exists():
        raise ConfigError(f"{flag} {spec!r} is a file; give a pipeline folder, a run folder or a hub id")
    elif spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ConfigError(
            f"{flag} {spec!r} does not exist (expected a pipeline folder, a diffalign run folder or a hub "
            "id 'org/name')"
        )


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (an interrupted write leaves the old file); values JSON lacks as str."""
    write_json_atomic(path, obj, default=str)


def model_path(spec: str) -> str:
    """A model as recorded: a folder's resolved path (the same however it was written), else the hub id."""
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else str(spec)


def settings_for(
    cfg: EvalConfig,
    spec: str,
    steps: int,
    guidance: float,
    size: int | None = None,
    per_prompt: int | None = None,
    batch: int | None = None,
) -> dict:
    """What a model's images depend on: its weights (a run's checkpoint pinned) and sampling settings,
    the batch grid (images per prompt, batch size) included."""
    p = Path(spec).expanduser()
    out = {"path": model_path(spec), "steps": steps, "guidance": guidance, "size": size, "seed": cfg.seed}
    out.update(per_prompt=per_prompt, batch=batch)
    latest = p / "checkpoints" / "latest"
    if latest.is_file():  # a diffalign run: pin the checkpoint, so a run that trained further is not mixed in
        ck = p / "checkpoints" / latest.read_text().strip()
        state = ck / "state.json"
        out["checkpoint"] = ck.name
        out["checkpoint_state_sha1"] = (
            hashlib.sha1(state.read_bytes()).hexdigest() if state.exists() else None
        )
    return out


def read_manifest(root: Path) -> dict[str, Any]:
    f = root / "eval.json"
    return json.loads(f.read_text()) if f.is_file() else {"models": {}}


def resolve_sampling(cfg: EvalConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """``steps``, ``guidance``, ``size``, ``per_prompt``, ``batch``, ``seed`` and ``source`` (per setting:
    'given', 'inherited' from the base model's earlier eval in this folder, or 'default'); see the
    module docstring."""
    defaults = SAMPLING_DEFAULTS["toy" if cfg.toy is not None else "geneval"]
    base = manifest.get("models", {}).get("model")
    if base is not None and base.get("path") != model_path(cfg.model):
        base = None  # another base model: nothing to inherit (its images are refused anyway)
    out: dict[str, Any] = {"source": {}}
    for key in SAMPLING_KEYS:
        given = getattr(cfg, key)
        if given is not None:
            out[key], out["source"][key] = given, "given"
        elif base is not None and key in base:
            out[key], out["source"][key] = base[key], "inherited"
        else:
            out[key], out["source"][key] = defaults.get(key), "default"
    out["seed"] = cfg.seed
    return out


def sampling_line(s: dict[str, Any]) -> str:
    """One line, e.g. ``50 steps (default), guidance 9 (default), size the pipeline's (default), seed 0,
    4 images per prompt (default) in batches of 16 (default)``."""
    src = s["source"]
    size = f"{s['size']} px" if s["size"] is not None else "the pipeline's"
    line = (
        f"{s['steps']} steps ({src['steps']}), guidance {s['guidance']:g} ({src['guidance']}), "
        f"size {size} ({src['size']}), seed {s['seed']}"
    )
    if "batch" in s:  # summaries written before the batch grid was recorded lack it
        n = s["per_prompt"]
        line += (
            f", {n} image{'s' if n != 1 else ''} per prompt ({src['per_prompt']}) "
            f"in batches of {s['batch']} ({src['batch']})"
        )
    return line


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings that differ; an entry recorded before the batch grid was (no ``per_prompt`` /
    ``batch``) is not compared on those."""
    keys = [*new, *(k for k in old if k not in new)]
    return [k for k in keys if old.get(k) != new.get(k) and (k in old or k not in GRID_KEYS)]


def check_and_record(
    root: Path, cfg: EvalConfig, models: dict[str, str], sampling: dict[str, Any], manifest: dict[str, Any]
) -> dict[str, Any]:
    """Refuse (one line) when ``root`` holds images of a model made with other settings; record them."""
    for label, spec in models.items():
        new = settings_for(cfg, spec, *(sampling[k] for k in SAMPLING_KEYS))
        old = manifest["models"].get(label)
        changed = _changed(old, new) if old is not None else []
        if changed:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            given = any(sampling["source"].get(k) == "given" for k in changed)
            raise ConfigError(
                f"{root} holds {label} images made with other settings ({diff}); use another --out"
                + (f" (or leave out {'/'.join(FLAGS.values())} to inherit the earlier ones)" if given else "")
            )
        manifest["models"][label] = new
    return manifest
