"""Numeric guards: non-finite steps are skipped and counted, too many in a row stop the run in one
line, and non-finite weights are never checkpointed or exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.objectives.diffusion_dpo import DiffusionDPO
from diffalign.train import train
from diffalign.train.guards import NumericError

from conftest import tiny_train_config


def _cfg(model: Path, data: Path, out: Path, *extra: str):
    return tiny_train_config(model, data, out, "train.keep_checkpoints=10", *extra)


def _poison(monkeypatch, bad_calls: set[int]) -> None:
    """DiffusionDPO's loss becomes NaN on the given (1-based) calls: a step with non-finite gradients."""
    original = DiffusionDPO.__call__
    calls = {"n": 0}

    def poisoned(self, policy_err, ref_err, batch):
        calls["n"] += 1
        out = original(self, policy_err, ref_err, batch)
        if calls["n"] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DiffusionDPO, "__call__", poisoned)


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")


def test_a_nan_step_is_skipped_and_counted(tiny_models, pairs_parquet, tmp_path, monkeypatch):
    _poison(monkeypatch, {2})
    out = tmp_path / "run"
    train(_cfg(tiny_models["sd"], pairs_parquet, out, "train.max_steps=3"))
    w1, w2, w3 = (_weights(out, s) for s in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the poisoned step changed nothing
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # training went on after it
    assert all(torch.isfinite(v).all() for v in w3.values())
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/bad_steps"] for r in rows] == [0, 1, 1]


def test_too_many_bad_steps_in_a_row_stop_the_run(tiny_models, pairs_parquet, tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3, 4, 5})
    out = tmp_path / "run"
    with pytest.raises(NumericError) as e:
        train(_cfg(tiny_models["sd"], pairs_parquet, out, "train.max_steps=6", "train.max_bad_steps=3"))
    msg = str(e.value)
    assert "step 4" in msg and "3 steps in a row" in msg and "\n" not in msg
    # steps 2 and 3 were skipped (weights unchanged, checkpoints of finite weights); none after step 3
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [
        "step-000001",
        "step-000002",
        "step-000003",
    ]


def test_an_update_to_non_finite_weights_is_refused_and_never_exported(
    tiny_models, pairs_parquet, tmp_path, monkeypatch
):
    """An optimizer step that leaves a weight infinite (as an overflowing update would) stops the run
    at that step, before its checkpoint: nothing non-finite is ever saved or exported."""
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def overflowing_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    out = tmp_path / "run"
    with pytest.raises(NumericError) as e:
        train(_cfg(tiny_models["sd"], pairs_parquet, out, "train.max_steps=3"))
    assert str(e.value).startswith("step 2: the update made 1 trainable weights non-finite")
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001"]


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    from diffalign.train.checkpoint import save_checkpoint

    p = torch.nn.Parameter(torch.tensor([1.0, float("inf")]))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(NumericError, match="1 trainable weights are not finite"):
        save_checkpoint(tmp_path, 1, {"w": p}, opt, sched, None, {}, lambda folder: None)
    assert not list(tmp_path.rglob("*.safetensors"))
