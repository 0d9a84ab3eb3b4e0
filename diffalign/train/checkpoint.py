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

import errno
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from ..files import sha256_file, write_atomic


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any],
    scheduler: Any,
    ema: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
    export: Callable[[Path], None],
    keep: int = 2,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """``extra``: more named tensor sets saved as ``<name>.safetensors`` (e.g. an online
    objective's reference snapshot), inside the same atomic commit. ``optimizer``: the optimizer or
    its state dict (a sharded run passes the consolidated one, ``engines.consolidated_optimizer``)."""
    from .guards import NumericError, count_non_finite

    bad = count_non_finite(trainable.values())
    if bad:  # never write (or export) weights a user would load as a finished model
        raise NumericError(
            f"step {step}: {bad} trainable weights are not finite; refusing to checkpoint/export them"
        )
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(
            {k: v.detach().float().contiguous().cpu() for k, v in trainable.items()},
            tmp / "trainable.safetensors",
        )
        if ema is not None:
            save_file({k: v.contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
        for name, tensors in (extra or {}).items():
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / f"{name}.safetensors"
            )
        opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        torch.save(opt_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        export(tmp / "export")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        (tmp / MANIFEST).write_text(json.dumps(file_digests(tmp), indent=1))  # what "complete" means
    except BaseException as e:  # a full disk, a kill signal turned exception: leave no half-written folder
        full = _disk_full(tmp) or (isinstance(e, OSError) and e.errno == errno.ENOSPC)
        shutil.rmtree(tmp, ignore_errors=True)
        if full and not isinstance(e, OSError):  # torch.save reports a full disk as a RuntimeError
            raise OSError(
                errno.ENOSPC, f"No space left on device while writing checkpoint step {step}", str(tmp)
            ) from e
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # the commit point
    write_atomic(run_dir / "checkpoints" / "latest", final.name)
    _prune(run_dir, keep)
    return final


def _disk_full(path: Path, margin: int = 1 << 20) -> bool:
    """Less than ``margin`` bytes left where ``path`` lives (checked after a failed write)."""
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free < margin
    except OSError:
        return False


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoint folders that were committed (renamed from ``.tmp``), oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))


def _prune(run_dir: Path, keep: int) -> None:
    done = complete_checkpoints(run_dir)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint a run continues from (``resume``: ``latest`` or a folder), or None for a fresh
    run, which must not mix with an earlier run in the same folder (checkpoints and appended metrics
    would interleave)."""
    if resume:
        found = find_checkpoint(run_dir, resume)
        if found is None:
            print(f"note: --resume: {run_dir} has no checkpoint yet; starting from step 0", file=sys.stderr)
        return found
    done = complete_checkpoints(run_dir)
    old = done[-1] if done else None
    if old is not None:
        raise ConfigError(
            f"train.output_dir {run_dir} already holds a run (checkpoint {old.name}); "
            "pass --resume to continue it, or choose another train.output_dir"
        )
    return None


MANIFEST = "manifest.json"


def file_digests(folder: Path) -> dict[str, list]:
    """``relative path -> [size, sha256]`` of every file under ``folder`` but the manifest."""
    return {
        str(f.relative_to(folder)): [f.stat().st_size, sha256_file(f)]
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is intact, else what is wrong (one phrase). Checkpoints written
    before manifests existed are checked by reading their state and weights."""
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            want = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            return "unreadable manifest"
        have = file_digests(path)
        for name, (size, digest) in want.items():
            if name not in have:
                return f"{name} is missing"
            if have[name][0] != size:
                return f"{name} has {have[name][0]} bytes, {size} were written"
            if have[name][1] != digest:
                return f"{name} is corrupt (checksum differs)"
        return None
    try:
        json.loads((path / "state.json").read_text())
        load_file(path / "trainable.safetensors")
    except Exception as e:  # any failure to read means: not usable
        return f"unreadable ({type(e).__name__})"
    return None


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """``resume`` is ``latest`` (the newest checkpoint of ``run_dir`` that verifies, or None) or a
    folder (which must verify). A damaged newest checkpoint is reported and skipped."""
    if resume == "latest":
        done = complete_checkpoints(run_dir)
        for p in reversed(done):
            problem = verify_checkpoint(p)
            if problem is None:
                return p
            print(f"warning: checkpoint {p}: {problem}; trying the one before it", file=sys.stderr)
        if done:
            raise ConfigError(
                f"--resume: no checkpoint of {run_dir} verifies (newest: {done[-1].name}); start anew"
            )
        return None
    p = Path(resume)
    if not (p / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume!r}: not a diffalign checkpoint folder (no state.json)")
    problem = verify_checkpoint(p)
    if problem is not None:
        raise ConfigError(
            f"--resume {resume!r}: {problem}; resume from another checkpoint (or --resume latest)"
        )
    return p


def checkpoint_step(path: Path | None) -> int:
    """The step a checkpoint was written at (0 for None: a fresh run)."""
    return 0 if path is None else int(json.loads((path / "state.json").read_text())["step"])


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, each copied to memory of its own. ``load_file`` maps them
    at their offsets in the file, which are not 64-byte aligned (a header of any length precedes
    them); kernels take other paths on unaligned inputs and can round differently, so a resumed run
    fed them (a rollout round's latents and embeddings straight into the model) would drift from the
    uninterrupted one, whose tensors were freshly allocated (aligned)."""
    return {k: v.clone() for k, v in load_file(file).items()}


def load_checkpoint(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "trainable": load_tensors(path / "trainable.safetensors"),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
        "ema": load_tensors(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None,
        # what save_checkpoint's ``extra`` wrote: a snapshot reference, a rollout source's state
        **{
            name: load_tensors(f) if (f := path / f"{name}.safetensors").exists() else None
            for name in ("reference", "source")
        },
    }
    return out
