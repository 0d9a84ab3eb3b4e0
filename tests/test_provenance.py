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
