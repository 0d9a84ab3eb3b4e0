"""Performance paths change speed and memory, never the numbers: channels-last trains the same model
(precomputed reference errors: tests/test_precompute_reference.py)."""

from __future__ import annotations

import json

import pytest
from test_train import run


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_channels_last_trains_the_same(tiny_models, pairs_parquet, tmp_path):
    run(tiny_models["sd"], pairs_parquet, tmp_path / "a", "train.max_steps=2", "train.batch_size=2")
    run(
        tiny_models["sd"],
        pairs_parquet,
        tmp_path / "b",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.channels_last=true",
    )
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-6)
