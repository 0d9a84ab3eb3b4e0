"""Rewards in a separate process (``train.reward_process``, ``diffalign.rewards.process``): the same
scores bit for bit as in the training process, errors as one line naming the reward (never a hang),
the child stopped with its owner, and a tiny Flow-GRPO run that trains exactly as without it."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffalign.errors import ConfigError
from diffalign.rewards import load_rewards
from diffalign.rewards.process import RemoteReward, RewardProcess, score_rewards


@pytest.fixture(autouse=True, scope="module")
def toy_rewards():
    """The deterministic toy rewards, registered when these tests run, not when they are collected
    (``test_rewards.py`` parametrizes over every reward registered at collection)."""
    import rl_test_rewards  # noqa: F401


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """The prompts of ``test_online_rl``: two of the four name a circle."""
    f = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    f.write_text("a red circle\na blue square\ntwo green triangles\na yellow circle above a red square\n")
    return f


def judge_inputs(tmp_path):
    """Rendered ShapesWorld scenes, each judged against its own prompt or a neighbour's: strict
    scores 0 and 1, partial credit in between."""
    import diffalign.benchmarks.toyworlds.judge_reward  # noqa: F401  (registers the judges)
    from diffalign.benchmarks.geneval.rules import TAGS
    from diffalign.benchmarks.toyworlds.shapes import render, sample_scene

    rng = np.random.default_rng(0)
    scenes = [sample_scene(TAGS[i % len(TAGS)], rng) for i in range(12)]
    path = tmp_path / "meta.jsonl"
    path.write_text("".join(json.dumps(s.metadata) + "\n" for s in scenes))
    imgs = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    texts = [s.caption if i % 2 else scenes[(i + 1) % len(scenes)].caption for i, s in enumerate(scenes)]
    return path, imgs, texts


def test_scores_are_bit_identical_to_scoring_in_process(tmp_path, tiny_clip):
    meta, imgs, texts = judge_inputs(tmp_path)
    specs = [f"shapes_judge={meta}", f"shapes_partial={meta}", "pixel_mean_test", f"clip_score={tiny_clip}"]
    here = load_rewards(specs)
    proc = RewardProcess(specs, "cpu", timeout=120)
    try:
        assert proc.names == list(here) and all(isinstance(r, RemoteReward) for r in proc.rewards.values())
        local, remote = score_rewards(here, imgs, texts), score_rewards(proc.rewards, imgs, texts)
        assert list(local) == list(remote) == list(here)
        for n in here:
            assert remote[n].dtype == local[n].dtype == torch.float32
            assert torch.equal(remote[n], local[n]), n
        strict, partial = local["shapes_judge"], local["shapes_partial"]
        assert set(strict.tolist()) == {0.0, 1.0} and ((partial > 0) & (partial < 1)).any()  # mixed scores
        # one reward alone, called like the reward itself
        assert torch.equal(proc.rewards["shapes_partial"](imgs, texts).scores, partial)
        # uint8 images travel unchanged (a reward that takes them scores them alike)
        u8 = (imgs * 255).round().to(torch.uint8)
        got = proc.score(u8, texts, ["pixel_mean_test"])["pixel_mean_test"]
        assert torch.equal(got, here["pixel_mean_test"](u8, texts).scores)
        # a reward called inside the training autocast runs under the same autocast in the child
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = score_rewards({"clip_score": here["clip_score"]}, imgs, texts)["clip_score"]
            b = score_rewards({"clip_score": proc.rewards["clip_score"]}, imgs, texts)["clip_score"]
        assert torch.equal(a, b)
        # local and remote rewards mixed: the caller's order, one request for the remote ones
        mixed = {"pixel_mean_test": here["pixel_mean_test"], "clip_score": proc.rewards["clip_score"]}
        assert list(score_rewards(mixed, imgs, texts)) == ["pixel_mean_test", "clip_score"]
    finally:
        proc.close()
    assert proc.proc.exitcode == 0  # closed on request, not killed
    proc.close()  # idempotent


def test_errors_name_the_reward_in_one_line_and_never_hang(tmp_path):
    imgs, texts = torch.rand(2, 3, 8, 8), ["a", "b"]
    with pytest.raises(ConfigError, match="unknown reward 'pixl_mean_test'"):
        RewardProcess(["pixl_mean_test"], "cpu")  # before any process starts
    with pytest.raises(ConfigError) as e:
        RewardProcess(["misbehaving_test=load"], "cpu", timeout=120)
    assert str(e.value) == (
        "reward process: could not load misbehaving_test: ConfigError: misbehaving_test: cannot load 'load'"
    )

    def fails(mode: str, timeout: float = 120):
        proc = RewardProcess(["pixel_mean_test", f"misbehaving_test={mode}"], "cpu", timeout=120)
        proc.timeout = timeout  # for the requests (start-up on a busy machine takes seconds)
        assert torch.equal(proc.rewards["pixel_mean_test"](imgs, texts).scores, imgs.flatten(1).mean(1))
        t0 = time.monotonic()
        with pytest.raises((RuntimeError, ConfigError)) as e:
            score_rewards(proc.rewards, imgs, texts)
        msg = str(e.value)
        assert "\n" not in msg
        assert not proc.proc.is_alive()  # stopped after an error
        with pytest.raises(RuntimeError, match="already stopped"):
            proc.score(imgs, texts)
        return e.type, msg, time.monotonic() - t0

    kind, msg, _ = fails("raise")
    assert kind is RuntimeError
    assert msg == "reward 'misbehaving_test' (in the reward process): ValueError: boom on image 0"
    kind, msg, _ = fails("config")
    assert kind is ConfigError and msg.endswith("ConfigError: misbehaving_test: prompt not known")
    kind, msg, took = fails("exit")
    assert kind is RuntimeError and "reward process: exited (code 3) while scoring 2 images" in msg
    assert took < 30
    kind, msg, took = fails("hang", timeout=3)
    assert kind is RuntimeError and "no answer after 3 s while scoring 2 images" in msg
    assert took < 30


def test_the_child_stops_with_its_owner_and_with_a_killed_parent(tmp_path):
    proc = RewardProcess(["pixel_mean_test"], "cpu", timeout=120)
    child = proc.proc
    assert child.is_alive() and child.daemon
    del proc
    gc.collect()
    child.join(20)
    assert child.exitcode == 0  # garbage collection of the owner closed it on request

    # a parent killed with SIGKILL runs no finaliser: the child sees its pipe close and exits
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import rl_test_rewards\n"
        "from diffalign.rewards.process import RewardProcess\n"
        "if __name__ == '__main__':\n"
        "    p = RewardProcess(['pixel_mean_test'], 'cpu', timeout=120)\n"
        "    print(p.proc.pid, flush=True)\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr[-2000:]
    pid = int(out.stdout.split()[0])
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, 9)
        pytest.fail("the reward process outlived its killed parent")


@pytest.mark.parametrize("objective", ["flow_grpo", "online_dpo"])  # RolloutSource.score, group_pairs
def test_training_with_a_reward_process_is_exactly_as_without(
    tiny_models, tiny_clip, prompts_file, tmp_path, objective
):
    import multiprocessing

    from test_online_rl import metrics, rl_cfg
    from test_train import trainable

    from diffalign.train import train

    args = ("train.max_steps=3", "train.lr=3e-2")
    if objective == "flow_grpo":  # the guard's proxy score goes through the reward process too
        args += (
            "train.guard_every=2",
            f"train.guard_prompts={prompts_file}",
            f"train.guard_gold=pickscore={tiny_clip}",
        )
    train(rl_cfg(objective, tiny_models["sd3"], prompts_file, tiny_clip, tmp_path / "here", *args))
    train(
        rl_cfg(
            objective,
            tiny_models["sd3"],
            prompts_file,
            tiny_clip,
            tmp_path / "child",
            *args,
            "train.reward_process=true",
        )
    )
    gc.collect()
    assert not [p for p in multiprocessing.active_children() if p.name == "diffalign-rewards"]
    assert metrics(tmp_path / "here") == metrics(tmp_path / "child")
    assert objective != "flow_grpo" or "guard/proxy" in metrics(tmp_path / "child")[0]
    a, b = trainable(tmp_path / "here"), trainable(tmp_path / "child")
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_the_loop_stops_the_reward_process_when_training_ends(tiny_models, tiny_clip, prompts_file, tmp_path):
    """The loop closes its source on the way out (``Source.close``), so the child is gone when
    ``train`` returns, not whenever garbage collection finds the reward objects' reference cycle
    (collection is off here: with the loop leaving it to collection, the child would still run)."""
    import multiprocessing

    from test_online_rl import rl_cfg

    from diffalign.train import train

    def children() -> list:
        return [p for p in multiprocessing.active_children() if p.name == "diffalign-rewards"]

    gc.collect()
    assert not children()
    gc.disable()
    try:
        cfg = rl_cfg(
            "flow_grpo",
            tiny_models["sd3"],
            prompts_file,
            tiny_clip,
            tmp_path / "r",
            "train.max_steps=1",
            "train.reward_process=true",
        )
        train(cfg)
        assert not children()
    finally:
        gc.enable()
