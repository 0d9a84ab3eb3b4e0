"""Atomic checkpoints and exports.

A checkpoint folder ``checkpoints/step-000123/`` holds everything a resume needs:

    trainable.safetensors   trainable parameters by name (LoRA or full denoiser), fp32
    ema.safetensors         EMA shadow of the same (when enabled)
    optimizer.pt            optimizer state   (torch.save; read back with weights_only=True)
    scheduler.pt            LR scheduler state
    state.json              step, global batch, reference fingerprint, metrics
    export/                 the weights in diffusers format: ``pytorch_lora_weights.safetensors``
                            (``pipe.load_lora_weights``) or ``unet/`` / ``transformer/`` folders

It is written to ``step-000123.tmp/`` and renamed into place, so a folder without ``.tmp`` is
always complete; ``checkpoints/latest`` names the newest one. No RNG state is needed: every
random draw is derived from (seed, stream position), see ``diffalign.data.sampler``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
    export: Callable[[Path], None],
    keep: int = 2,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """``extra``: more named tensor sets saved as ``<name>.safetensors`` (e.g. an online
    objective's reference snapshot), inside the same atomic commit."""
    from .guards import NumericError, count_non_finite

    bad = count_non_finite(trainable.values())
    if bad:  # never write (or export) weights a user would load as a finished model
        raise NumericError(
            f"step {step}: {bad} trainable weights are not finite; refusing to checkpoint/export them"
        )
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().float().contiguous().cpu() for k, v in trainable.items()},
        tmp / "trainable.safetensors",
    )
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
    for name, tensors in (extra or {}).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    export(tmp / "export")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # the commit point
    write_atomic_text(run_dir / "checkpoints" / "latest", final.name)
    _prune(run_dir / "checkpoints", keep)
    return final


def _prune(folder: Path, keep: int) -> None:
    done = sorted(p for p in folder.glob("step-*") if not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint a run continues from (``resume``: ``latest`` or a folder), or None for a fresh
    run, which must not mix with an earlier run in the same folder (checkpoints and appended metrics
    would interleave)."""
    if resume:
        return find_checkpoint(run_dir, resume)
    old = find_checkpoint(run_dir, "latest")
    if old is not None:
        raise ConfigError(
            f"train.output_dir {run_dir} already holds a run (checkpoint {old.name}); "
            "pass --resume to continue it, or choose another train.output_dir"
        )
    return None


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """``resume`` is ``latest`` (newest complete checkpoint of ``run_dir``, or None) or a folder."""
    if resume == "latest":
        pointer = run_dir / "checkpoints" / "latest"
        if pointer.exists():
            p = run_dir / "checkpoints" / pointer.read_text().strip()
            if p.is_dir():
                return p
        done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
        return done[-1] if done else None
    p = Path(resume)
    if not (p / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume!r}: not a diffalign checkpoint folder (no state.json)")
    return p


def load_checkpoint(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "trainable": load_file(path / "trainable.safetensors"),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
        "ema": load_file(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None,
        "reference": load_file(path / "reference.safetensors")
        if (path / "reference.safetensors").exists()
        else None,
    }
    return out
