"""Fault tests: ``kill -9`` at three points, then a rerun, gives the same final artefacts as an
uninterrupted run (weights, metrics.jsonl and TensorBoard scalars for training; images, judgements
and summaries for evaluation)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import tb_scalars

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "diffalign" / "assets"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffalign.cli", *args]


def kill_three_times(
    first: list[str], again: list[str], progress: Callable[[], int], timeout: float = 180
) -> int:
    """Start ``first``, SIGKILL it as soon as ``progress()`` grows, restart with ``again`` and kill
    it the same way, three kills in all; then run ``again`` to the end. Returns how many of the three
    processes were really killed mid-run (a process that finished first is not counted)."""
    killed = 0
    for i in range(3):
        have = progress()
        proc = subprocess.Popen(
            first if i == 0 else again, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + timeout
        while time.time() < deadline and progress() <= have and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(0.05 * i)  # land at a different point of the next unit of work each time
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
    done = subprocess.run(again, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return killed


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    done = sorted((out / "checkpoints").glob("step-*"))
    return load_file(done[-1] / "trainable.safetensors")


def _train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model}",
        f"data.path={data}",
        f"train.output_dir={out}",
        "data.resolution=32",
        "train.lr=1e-2",
        "train.max_steps=12",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=10",
        *extra,
    ]


def _checkpoints(out: Path) -> Callable[[], int]:
    return lambda: len([p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp")])


def _assert_same_run(ref: Path, cut: Path) -> None:
    a, b = _weights(ref), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(ref) == _metrics(cut)  # each step once, with the same values
    assert tb_scalars(ref / "tb") == tb_scalars(cut / "tb")
    assert not list(cut.rglob("*.tmp"))


def test_train_killed_three_times_equals_uninterrupted(tiny_models, pairs_parquet, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("objective:\n  name: diffusion_dpo\n  beta: 100\n")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    done = subprocess.run(
        _cli("train", str(cfg), *_train_args(tiny_models["sd"], pairs_parquet, ref)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first = _cli("train", str(cfg), *_train_args(tiny_models["sd"], pairs_parquet, cut))
    killed = kill_three_times(first, [*first, "--resume"], _checkpoints(cut))
    assert killed >= 2  # the run is long enough for the kills to land mid-run
    _assert_same_run(ref, cut)


def test_online_run_killed_three_times_equals_uninterrupted(tiny_models, tiny_clip, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\na yellow circle\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    extra = [
        "objective.name=online_dpo",
        f"objective.rewards=pickscore={tiny_clip}",
        "objective.sample_steps=3",
        "objective.group_size=3",
        "train.batch_size=2",
        "train.max_steps=9",
    ]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref_args = _cli("train", str(cfg), *_train_args(tiny_models["sd3"], prompts, ref), *extra)
    done = subprocess.run(ref_args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first = _cli("train", str(cfg), *_train_args(tiny_models["sd3"], prompts, cut), *extra)
    kill_three_times(first, [*first, "--resume"], _checkpoints(cut))
    _assert_same_run(ref, cut)


def test_eval_killed_three_times_equals_uninterrupted(tmp_path):
    def args(out: Path) -> list[str]:
        return _cli(
            "eval",
            "--model",
            str(ASSETS / "toy-sd"),
            "--toy",
            "train",
            "--n-prompts",
            "24",
            "--per-prompt",
            "2",
            "--steps",
            "3",
            "--out",
            str(out),
        )

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    done = subprocess.run(args(ref), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    images = lambda: len(list(cut.rglob("samples/*.png")))  # noqa: E731
    kill_three_times(args(cut), args(cut), images)
    names = sorted(p.relative_to(ref) for p in ref.rglob("samples/*.png"))
    assert names == sorted(p.relative_to(cut) for p in cut.rglob("samples/*.png")) and len(names) == 48
    assert all((ref / n).read_bytes() == (cut / n).read_bytes() for n in names)
    assert (ref / "model" / "results.jsonl").read_text() == (cut / "model" / "results.jsonl").read_text()
    a, b = (json.loads((d / "model" / "summary.json").read_text()) for d in (ref, cut))
    for s in (a, b):
        s.pop("seconds", None)
        s.pop("timing", None)
    assert a == b


def test_flow_grpo_killed_three_times_equals_uninterrupted(tiny_models, tiny_clip, tmp_path):
    """Rounds of two optimizer steps and a checkpoint every 3: kills land inside rounds, whose
    buffers only the checkpoints hold."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\na yellow circle\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    extra = [
        "objective.name=flow_grpo",
        f"objective.rewards=clip_score={tiny_clip}",
        "objective.sample_steps=3",
        "objective.group_size=4",
        "objective.updates_per_rollout=2",
        "objective.clip_range=1e-2",
        "train.batch_size=2",
        "train.max_steps=9",
    ]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref_args = _cli("train", str(cfg), *_train_args(tiny_models["sd3"], prompts, ref), *extra)
    done = subprocess.run(ref_args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first = _cli("train", str(cfg), *_train_args(tiny_models["sd3"], prompts, cut), *extra)
    kill_three_times(first, [*first, "--resume"], _checkpoints(cut))
    _assert_same_run(ref, cut)


def test_resumed_tensors_sit_in_aligned_memory_of_their_own(tmp_path):
    """``load_file`` maps a checkpoint's tensors at their file offsets (not 64-byte aligned); fed to
    the model as they are, a resumed run's forwards rounded differently from the uninterrupted run's
    (a rollout round's embeddings into a GEMM: the 2-process in-round resume test drifted by ~1e-7 in a
    ratio, then ~1e-4 in the weights). ``load_tensors`` gives each tensor fresh memory."""
    from safetensors.torch import save_file

    from diffalign.train.checkpoint import load_tensors

    tensors = {f"t{i}": torch.randn(3, i + 1) for i in range(7)}  # odd sizes shift the offsets
    save_file(tensors, tmp_path / "s.safetensors")
    mapped = load_file(tmp_path / "s.safetensors")
    assert any(v.data_ptr() % 64 for v in mapped.values())  # what the bug fed the model
    loaded = load_tensors(tmp_path / "s.safetensors")
    assert loaded.keys() == tensors.keys()
    for k, v in loaded.items():
        assert v.data_ptr() % 64 == 0, k
        assert torch.equal(v, tensors[k])
