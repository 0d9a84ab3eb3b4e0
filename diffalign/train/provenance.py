"""Run provenance: one run folder holds one run, trained with the settings it records.

- **Lock.** A run holds ``<output_dir>/.lock`` (an OS file lock, released by the kernel when the
  process dies, so a killed run never leaves a stale lock) while it writes; a second run into the
  same folder is refused in one line.
- **Config on resume.** ``config.yaml`` is written once, when the run starts, and never overwritten.
  A resume compares the resolved config with it and refuses any change that alters the training
  trajectory, naming the keys; ``--allow-config-change`` accepts it and records it in
  ``config_changes.jsonl`` (step, old and new values), as do changes of bookkeeping keys.
- **Metrics on resume.** ``metrics.jsonl`` is cut back to the resumed checkpoint's step (rows of
  steps after it were written by the killed process and are written again), and TensorBoard is
  opened with ``purge_step`` so its events of those steps are dropped too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, dump_config, to_dict
from ..errors import ConfigError
from ..files import write_atomic

BOOKKEEPING_KEYS = frozenset(
    {
        "train.output_dir",  # a moved run folder
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.log_every",
        "train.report_to",
        "train.sample_prompts",
        "train.sample_steps",
        "train.sample_guidance",
        "train.halt_after_step",
        "train.max_minutes",  # where a run pauses, not what it computes
        "train.guard_every",  # the guard samples with a forked RNG (tested: the same weights)
        "train.guard_prompts",
        "train.guard_gold",
        "train.guard_images",
        "train.max_bad_steps",
        "train.divergence_window",  # only decides when the warning fires
        "data.num_workers",  # the same batches in workers or not (tested)
        "train.precompute_reference",  # bit-identical to a live reference (tested)
        "train.reward_process",  # bit-identical scores in a child process (tested)
        "train.reward_timeout",
    }
)
"""Keys that do not change which weights the run produces; everything else does."""

_SCHEDULES_WITHOUT_HORIZON = ("constant", "constant_with_warmup")


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{sec}.{k}": v for sec, vals in d.items() for k, v in vals.items()}


def trajectory_keys(old: dict[str, Any], new: dict[str, Any]) -> set[str]:
    """Flattened keys whose change alters the weights. ``train.max_steps`` only does when the LR
    schedule depends on the horizon (linear, cosine): extending a constant-LR run is a plain
    continuation. ``data.cache_dir`` does not in fp32 (cached and uncached training are identical,
    tested); under bf16/fp16 the uncached path encodes with low-precision VAE and text encoders.
    ``model.path`` always does: another base model (or a moved one: allow and record it)."""
    free = set(BOOKKEEPING_KEYS)
    if old.get("train.lr_scheduler") in _SCHEDULES_WITHOUT_HORIZON:
        free.add("train.max_steps")
    if old.get("train.mixed_precision", "no") == "no":
        free.add("data.cache_dir")
    return (set(old) | set(new)) - free


def resolved(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config dict with the objective's hyperparameter defaults filled in, so that writing a
    default value out, or leaving it out, is no change, and adding a non-default one is."""
    from ..objectives import OBJECTIVES

    obj = dict(cfg.get("objective") or {})
    name = obj.get("name")
    if name not in OBJECTIVES.names():
        return cfg
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(OBJECTIVES.get(name))
        if f.default is not dataclasses.MISSING
    }
    return {**cfg, "objective": {**defaults, **obj}}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (old, new)`` for every flattened key that differs (a missing key reads as None)."""
    a, b = _flat(resolved(old)), _flat(resolved(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def record_config(
    run_dir: Path,
    cfg: Config,
    start_step: int,
    allow_change: bool,
    write: bool = True,
    checkpoint: Path | None = None,
) -> None:
    """At start: write ``config.yaml`` for a new run; on a resume, compare with the config of the
    run the ``checkpoint`` belongs to (refusing changes that alter the trajectory unless
    ``allow_change``) and log what changed. A resume from another run folder's checkpoint starts
    this folder's record with that run's config. ``write``: this process writes (the main one);
    every process checks, so all of them stop alike."""
    stored = run_dir / "config.yaml"
    source = checkpoint.parent.parent / "config.yaml" if checkpoint is not None else stored
    if start_step == 0 or not source.is_file():  # nothing trained yet, or a run from before records
        if write and (start_step == 0 or not stored.is_file()):
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, stored)
        return
    if write and not stored.is_file():  # resumed from another folder: keep how the first steps went
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(stored, source.read_text())
    stored = source
    try:
        old = yaml.safe_load(stored.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{stored}: unreadable ({type(e).__name__}); the run's record is damaged") from None
    changes = config_changes(old, to_dict(cfg))
    if not changes:
        return
    altering = sorted(set(changes) & trajectory_keys(_flat(old), _flat(to_dict(cfg))))
    if altering and not allow_change:
        shown = ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in altering[:3])
        more = f" and {len(altering) - 3} more" if len(altering) > 3 else ""
        raise ConfigError(
            f"--resume: the run in {run_dir} was trained with other settings ({shown}{more}); resume with "
            f"the stored {stored.name}, or pass --allow-config-change to continue and record the change"
        )
    if not write:
        return
    with (run_dir / "config_changes.jsonl").open("a") as f:
        f.write(json.dumps({"step": start_step, "changes": {k: list(v) for k, v in changes.items()}}) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (atomically); a torn last line goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a killed process was writing
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    write_atomic(path, "".join(ln + "\n" for ln in kept))


_HELD_FDS: set[int] = set()


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) must not keep the run's lock alive after a kill -9 of
    the trainer: it closes its copies of the lock descriptors."""
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """An exclusive lock on ``<run_dir>/.lock`` for as long as the run writes there."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"train.output_dir {folder} is a file; choose a folder path")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # read-only, no permission, a file somewhere above it
            raise ConfigError(
                f"train.output_dir {folder}: cannot write there ({e.strerror or type(e).__name__}); "
                f"choose a writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"train.output_dir {self.path.parent} is in use by another run "
                f"(pid {holder}); wait for it or choose another train.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        _HELD_FDS.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            _HELD_FDS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
