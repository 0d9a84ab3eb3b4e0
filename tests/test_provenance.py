"""Run provenance: a resume refuses changed settings (naming them) unless allowed and recorded,
metrics files are cut back to the resumed step, a damaged newest checkpoint falls back to the one
before it, and a run folder has one writer at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffalign.config import ConfigError
from diffalign.train import train
from diffalign.train.provenance import RunLock

from conftest import newest_weights, tiny_train_config


def _cfg(model: Path, data: Path, out: Path, *extra: str):
    return tiny_train_config(model, data, out, "train.keep_checkpoints=5", "train.max_steps=3", *extra)


_final = newest_weights


def test_resume_refuses_a_changed_run_and_records_an_allowed_change(tiny_models, pairs_parquet, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_models["sd"], pairs_parquet, out, "train.halt_after_step=1"))
    first = (out / "config.yaml").read_text()
    for change, key in [
        ("train.lr=2e-2", "train.lr"),
        ("objective.beta=50", "objective.beta"),
        ("train.seed=1", "train.seed"),
    ]:
        with pytest.raises(ConfigError) as e:
            train(_cfg(tiny_models["sd"], pairs_parquet, out, change), resume="latest")
        assert key in str(e.value) and "--allow-config-change" in str(e.value) and "\n" not in str(e.value)
    # bookkeeping keys are no trajectory change: accepted, and logged
    train(
        _cfg(tiny_models["sd"], pairs_parquet, out, "train.halt_after_step=2", "train.log_every=2"),
        resume="latest",
    )
    # an allowed change goes on, keeps the first config.yaml and records what changed at which step
    train(
        _cfg(tiny_models["sd"], pairs_parquet, out, "train.lr=2e-2"),
        resume="latest",
        allow_config_change=True,
    )
    assert (out / "config.yaml").read_text() == first
    records = [json.loads(ln) for ln in (out / "config_changes.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and "train.log_every" in records[0]["changes"]
    assert records[-1]["step"] == 2 and records[-1]["changes"]["train.lr"] == [0.01, 0.02]


def test_metrics_are_cut_back_to_the_resumed_step(tiny_models, pairs_parquet, tmp_path):
    ref = tmp_path / "ref"
    train(_cfg(tiny_models["sd"], pairs_parquet, ref))
    out = tmp_path / "run"
    train(_cfg(tiny_models["sd"], pairs_parquet, out, "train.halt_after_step=2"))
    # as if killed after logging step 3 but before its checkpoint, mid-way through a line
    ck3 = out / "checkpoints" / "step-000002"
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n" + '{"step": 4, "lo')
    assert ck3.is_dir()
    train(_cfg(tiny_models["sd"], pairs_parquet, out), resume="latest")
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    a = [json.loads(ln) for ln in (ref / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # identical to the uninterrupted run


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(
    tiny_models, pairs_parquet, tmp_path, capfd
):
    ref = tmp_path / "ref"
    train(_cfg(tiny_models["sd"], pairs_parquet, ref))
    out = tmp_path / "run"
    train(_cfg(tiny_models["sd"], pairs_parquet, out, "train.halt_after_step=2"))
    victim = out / "checkpoints" / "step-000002" / "trainable.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte in the weights: still loads, wrong numbers
    victim.write_bytes(bytes(raw))
    train(_cfg(tiny_models["sd"], pairs_parquet, out), resume="latest")
    assert "step-000002" in capfd.readouterr().err  # the skip is reported
    a, b = _final(ref), _final(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 1: same weights as uninterrupted


def test_one_writer_per_run_folder(tmp_path):
    held = RunLock(tmp_path / "run").acquire()
    try:
        with pytest.raises(ConfigError, match="in use by another run"):
            RunLock(tmp_path / "run").acquire()
    finally:
        held.release()
    RunLock(tmp_path / "run").acquire().release()  # free again once released
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        RunLock(tmp_path / "file").acquire()


def test_objective_defaults_count_as_written_and_added_keys_as_changes():
    from diffalign.train.provenance import config_changes, trajectory_keys

    base = {"objective": {"name": "diffusion_dpo"}, "train": {"lr": 1e-3, "lr_scheduler": "constant"}}
    flat = {"objective.name": "diffusion_dpo", "train.lr": 1e-3, "train.lr_scheduler": "constant"}
    added = {**base, "objective": {"name": "diffusion_dpo", "beta": 50.0}}
    changes = config_changes(base, added)
    assert changes == {"objective.beta": (5000.0, 50.0)}  # the default stands for the unwritten key
    assert "objective.beta" in trajectory_keys(flat, {**flat, "objective.beta": 50.0})
    assert config_changes(base, {**base, "objective": {"name": "diffusion_dpo", "beta": 5000.0}}) == {}
    # a moved model is a change to allow and record; a cache only changes the numbers in low precision
    assert "model.path" in trajectory_keys(flat, flat | {"model.path": "x"})
    assert "data.cache_dir" not in trajectory_keys(flat | {"train.mixed_precision": "no"}, flat)
    assert "data.cache_dir" in trajectory_keys(
        flat | {"train.mixed_precision": "bf16", "data.cache_dir": None}, flat
    )


def test_resuming_another_folders_checkpoint_compares_with_and_keeps_that_runs_config(
    tiny_models, pairs_parquet, tmp_path
):
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(tiny_models["sd"], pairs_parquet, a, "train.halt_after_step=1"))
    ck = str(a / "checkpoints" / "step-000001")
    with pytest.raises(ConfigError, match="train.lr"):
        train(_cfg(tiny_models["sd"], pairs_parquet, b, "train.lr=5e-2"), resume=ck)
    train(_cfg(tiny_models["sd"], pairs_parquet, b), resume=ck)
    assert (b / "config.yaml").read_text() == (a / "config.yaml").read_text()
    # b's later resumes are checked against that record too
    with pytest.raises(ConfigError, match="train.seed"):
        train(_cfg(tiny_models["sd"], pairs_parquet, b, "train.seed=3", "train.max_steps=4"), resume="latest")


def test_a_forked_child_does_not_keep_a_killed_runs_lock(tmp_path):
    """DataLoader workers are forked children of the trainer: after kill -9 of the trainer while a
    worker lives on, the folder must be free for the resume at once."""
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    script = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from diffalign.train.provenance import RunLock\n"
        f"RunLock(Path({str(run)!r})).acquire()\n"
        "if os.fork() == 0:\n"
        "    time.sleep(30); os._exit(0)\n"
        "print('locked', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.wait(timeout=60)
    time.sleep(0.2)
    RunLock(run).acquire().release()  # the child still sleeps, yet the lock is free


def test_divergence_monitor_state_round_trips():
    from diffalign.train.stability import DivergenceMonitor

    rows = [
        {
            "err/policy_w": 0.1 + 0.05 * i,
            "err/ref_w": 0.1,
            "err/policy_l": 0.1 + 0.05 * i,
            "err/ref_l": 0.1,
            "implicit_acc": 0.5,
        }
        for i in range(12)
    ]
    whole, cut = DivergenceMonitor(8), DivergenceMonitor(8)
    a = [whole.update(r) for r in rows]
    b = [cut.update(r) for r in rows[:5]]
    resumed = DivergenceMonitor(8)
    resumed.restore(cut.state())
    b += [resumed.update(r) for r in rows[5:]]
    assert a == b and any(a)
