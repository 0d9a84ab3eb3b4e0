"""``diffalign eval`` settings: the configuration, the sampling settings and the run folder's manifest.

Sampling settings (steps, guidance, image size) come, each on its own, from the command line; else,
when ``--out`` already holds the base model's images (``eval.json``) from an earlier eval of the same
model, from that eval (so ``--compare`` added later inherits the base run's settings and the two are
paired); else from the defaults: 20 steps and guidance 4 with ``--toy``, 50 steps and guidance 9
otherwise (GenEval's generation script). The demo samples at 15 steps and guidance 4: pass
``--steps 15 --guidance 4`` to judge its models as it did. A value given on the command line that
differs from the images already in ``--out`` is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from .detectors import Thresholds

LABELS = ("model", "compare")
SAMPLING_DEFAULTS = {"toy": {"steps": 20, "guidance": 4.0}, "geneval": {"steps": 50, "guidance": 9.0}}


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
    per_prompt: int = 4
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
    batch: int = 16
    device: str | None = None
    n_boot: int = 2000
    report: bool = True


def write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name and rename it (an interrupted write leaves the old file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def model_path(spec: str) -> str:
    """A model as recorded: a folder's resolved path (the same however it was written), else the hub id."""
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else str(spec)


def settings_for(cfg: EvalConfig, spec: str, steps: int, guidance: float, size: int | None = None) -> dict:
    """What a model's images depend on: its weights (a run's checkpoint pinned) and sampling settings."""
    p = Path(spec).expanduser()
    out = {"path": model_path(spec), "steps": steps, "guidance": guidance, "size": size, "seed": cfg.seed}
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
    """``steps``, ``guidance``, ``size``, ``seed`` and ``source`` (per setting: 'given', 'inherited'
    from the base model's earlier eval in this folder, or 'default'); see the module docstring."""
    defaults = SAMPLING_DEFAULTS["toy" if cfg.toy is not None else "geneval"]
    base = manifest.get("models", {}).get("model")
    if base is not None and base.get("path") != model_path(cfg.model):
        base = None  # another base model: nothing to inherit (its images are refused anyway)
    out: dict[str, Any] = {"source": {}}
    for key in ("steps", "guidance", "size"):
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
    """One line, e.g. ``50 steps (default), guidance 9 (default), size: the pipeline's (default), seed 0``."""
    src = s["source"]
    size = f"{s['size']} px" if s["size"] is not None else "the pipeline's"
    return (
        f"{s['steps']} steps ({src['steps']}), guidance {s['guidance']:g} ({src['guidance']}), "
        f"size {size} ({src['size']}), seed {s['seed']}"
    )


def check_and_record(
    root: Path, cfg: EvalConfig, models: dict[str, str], sampling: dict[str, Any], manifest: dict[str, Any]
) -> dict[str, Any]:
    """Refuse (one line) when ``root`` holds images of a model made with other settings; record them."""
    for label, spec in models.items():
        new = settings_for(cfg, spec, sampling["steps"], sampling["guidance"], sampling["size"])
        old = manifest["models"].get(label)
        if old is not None and old != new:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])
            raise ConfigError(
                f"{root} holds {label} images made with other settings ({diff}); use another --out"
                + (
                    " (or leave out --steps/--guidance/--size to inherit the earlier ones)"
                    if any(
                        sampling["source"][k] == "given" and old.get(k) != new[k] for k in sampling["source"]
                    )
                    else ""
                )
            )
        manifest["models"][label] = new
    return manifest
