"""Flow-GRPO, GRPO for UNets and DiffusionNFT through the one training loop (rollout sources).

Behaviour, not formulas (those are in ``test_policy_gradient.py``): the first optimizer step after a
rollout sees a policy ratio of exactly 1 (the rollout and the training forward agree bit for bit);
later steps of the same round do not; a run stopped inside a round resumes to the same weights as
an uninterrupted one; refusals name what would work instead."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffalign.config import ConfigError, load_config
from diffalign.train import train

from conftest import accelerate_launch


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    f.write_text("a red circle\na blue square\ntwo green triangles\na yellow circle above a red square\n")
    return f


def rl_cfg(name, model, prompts, clip, out, *extra):
    return load_config(
        None,
        [
            f"model.path={model}",
            f"data.path={prompts}",
            f"train.output_dir={out}",
            "data.resolution=32",
            f"objective.name={name}",
            f"objective.rewards=clip_score={clip}",
            "objective.sample_steps=4",
            "objective.group_size=4",
            "train.batch_size=2",
            "train.lr=1e-2",
            "train.checkpoint_every=1",
            *extra,
        ],
    )


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_flow_grpo_ratio_is_one_on_the_first_step_of_each_round(
    tiny_models, tiny_clip, prompts_file, tmp_path
):
    out = tmp_path / "r"
    train(
        rl_cfg(
            "flow_grpo",
            tiny_models["sd3"],
            prompts_file,
            tiny_clip,
            out,
            "train.max_steps=4",
            "objective.updates_per_rollout=2",
            "objective.beta=0.04",
            "objective.clip_range=1e-2",
            "train.lr=3e-2",
        )
    )
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows[0::2]:  # a round's first step: the weights that sampled it are the ones training
        assert r["ratio"] == 1.0 and r["clipfrac"] == 0.0, r
    assert rows[0]["kl"] == 0.0  # LoRA B starts at zero: policy mean = reference mean
    assert any(r["ratio"] != 1.0 for r in rows[1::2])  # the second step sees moved weights
    assert rows[1]["kl"] > 0
    for r in rows:
        assert math.isfinite(r["loss"])
    assert all(math.isfinite(r["reward"]) for r in rows[0::2])  # rewards are logged by the sampling steps
    assert all("reward" not in r for r in rows[1::2])


def test_flow_grpo_resumes_inside_a_round_exactly(tiny_models, tiny_clip, prompts_file, tmp_path):
    from test_train import trainable

    args = ("train.max_steps=4", "objective.updates_per_rollout=2", "objective.clip_range=1e-2")
    full = train(rl_cfg("flow_grpo", tiny_models["sd3"], prompts_file, tiny_clip, tmp_path / "full", *args))
    # stopped after step 3: the middle of round 2, whose buffer only the checkpoint holds
    train(
        rl_cfg(
            "flow_grpo",
            tiny_models["sd3"],
            prompts_file,
            tiny_clip,
            tmp_path / "cut",
            *args,
            "train.halt_after_step=3",
        )
    )
    again = train(
        rl_cfg("flow_grpo", tiny_models["sd3"], prompts_file, tiny_clip, tmp_path / "cut", *args),
        resume="latest",
    )
    assert again["loss"] == full["loss"] and again["ratio"] == full["ratio"]
    a, b = trainable(tmp_path / "full"), trainable(tmp_path / "cut")
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert metrics(tmp_path / "full") == metrics(tmp_path / "cut")  # logs included


def test_flow_grpo_fast_window_trains_only_its_steps(tiny_models, tiny_clip, prompts_file, tmp_path):
    import diffalign.train.rollout as rollout

    seen = []
    real = rollout.GRPORollouts.terms

    def spy(self, model, batch):
        seen.append(batch["step_index"])
        return real(self, model, batch)

    rollout.GRPORollouts.terms = spy
    try:
        train(
            rl_cfg(
                "flow_grpo",
                tiny_models["sd3"],
                prompts_file,
                tiny_clip,
                tmp_path / "fast",
                "train.max_steps=2",
                "objective.sample_steps=6",
                "objective.sde_window=2",
                "objective.window_hi=4",
                "objective.beta=0",
            )
        )
    finally:
        rollout.GRPORollouts.terms = real
    # per step: 2 window steps x 1 micro-batch, policy only (beta 0: no reference forward)
    assert len(seen) == 4
    for first, second in (seen[0:2], seen[2:4]):
        assert second == first + 1 and 0 <= first <= 4 - 2


def test_grpo_for_unets_trains_with_ddim_log_probs(tiny_models, tiny_clip, prompts_file, tmp_path):
    from test_train import trainable

    out = tmp_path / "g"
    m = train(
        rl_cfg(
            "grpo",
            tiny_models["sd"],
            prompts_file,
            tiny_clip,
            out,
            "train.max_steps=2",
            "objective.guidance_scale=2",
            "objective.timestep_fraction=0.5",
        )
    )
    rows = metrics(out)
    assert rows[0]["ratio"] == 1.0 and math.isfinite(m["loss"])
    moved = [n for n, v in trainable(out).items() if "lora_B" in n and v.abs().sum() > 0]
    assert moved


def test_diffusion_nft_trains_and_updates_its_old_policy(tiny_models, tiny_clip, prompts_file, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "nft"
    m = train(
        rl_cfg(
            "diffusion_nft",
            tiny_models["sd3"],
            prompts_file,
            tiny_clip,
            out,
            "train.max_steps=2",
            "objective.guidance_scale=1",
        )
    )
    assert math.isfinite(m["loss"])
    src = load_file(out / "checkpoints/step-000002/source.safetensors")
    assert all(k.startswith("rank0.") for k in src)  # one process: its own state, under rank0.
    old = {k[len("rank0.") :]: v for k, v in src.items() if k.startswith("rank0.old.")}
    lora = load_file(out / "checkpoints/step-000002/trainable.safetensors")
    assert old and any(v.abs().sum() > 0 for k, v in old.items() if "lora_B" in k)  # moved toward theta
    assert any(not torch.equal(old["old." + k], v) for k, v in lora.items())  # but is not theta


@pytest.mark.parametrize(
    "name,family,match",
    [
        ("flow_grpo", "sd", "use objective.name=grpo"),
        ("grpo", "sd3", "use objective.name=flow_grpo"),
        ("diffusion_nft", "sd", "use objective.name=grpo"),
    ],
)
def test_policy_gradient_methods_refuse_the_wrong_model_kind(
    tiny_models, tiny_clip, prompts_file, tmp_path, name, family, match
):
    with pytest.raises(ConfigError, match=match):
        train(rl_cfg(name, tiny_models[family], prompts_file, tiny_clip, tmp_path / "x", "train.max_steps=1"))


def test_rollout_micro_batches_must_split_evenly(tiny_models, tiny_clip, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="equal micro-batches"):
        train(
            rl_cfg(
                "flow_grpo",
                tiny_models["sd3"],
                prompts_file,
                tiny_clip,
                tmp_path / "x",
                "train.max_steps=1",
                "objective.updates_per_rollout=3",
            )
        )


def test_overoptimisation_guard_logs_gold_keeps_best_and_does_not_change_training(
    tiny_models, tiny_clip, prompts_file, tmp_path
):
    from diffusers import DiffusionPipeline
    from test_train import trainable

    args = ("train.max_steps=3", "objective.clip_range=1e-2", "train.lr=3e-2")
    guard = (
        "train.guard_every=2",
        f"train.guard_prompts={prompts_file}",
        f"train.guard_gold=pickscore={tiny_clip}",
        "train.sample_steps=3",
        "train.sample_guidance=2",
    )
    train(rl_cfg("flow_grpo", tiny_models["sd3"], prompts_file, tiny_clip, tmp_path / "plain", *args))
    train(rl_cfg("flow_grpo", tiny_models["sd3"], prompts_file, tiny_clip, tmp_path / "g", *args, *guard))
    a, b = trainable(tmp_path / "plain"), trainable(tmp_path / "g")
    for n in a:
        assert torch.equal(a[n], b[n]), n  # sampling for the guard leaves the training stream alone
    rows = [r for r in metrics(tmp_path / "g") if "guard/gold" in r]
    assert [r["step"] for r in rows] == [0, 2, 3]  # the start, every 2 steps, the last
    for r in rows:
        assert {"guard/proxy", "guard/diversity", "guard/drift", "guard/gold/pickscore"} <= set(r)
    assert rows[0]["guard/drift"] == 0.0 and rows[0]["guard/diversity"] > 0
    best = max(rows, key=lambda r: r["guard/gold"])
    info = json.loads((tmp_path / "g/best_gold.json").read_text())
    assert info["step"] == best["step"]
    pipe = DiffusionPipeline.from_pretrained(str(tiny_models["sd3"]), text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "g/best_gold"))  # the best weights load in plain diffusers


def test_overoptimisation_warning_fires_when_gold_falls_while_proxy_rises():
    from diffalign.train.overopt import OverOptGuard

    g = OverOptGuard.__new__(OverOptGuard)
    g.run_dir, g.warned = Path("run"), False
    g.history = [{"step": 0.0, "guard/gold": 0.50, "guard/proxy": 1.0}]
    g.history.append({"step": 10.0, "guard/gold": 0.60, "guard/proxy": 1.2})
    assert g.check(10) is None  # improving: the best so far
    g.history.append({"step": 20.0, "guard/gold": 0.59, "guard/proxy": 1.5})
    assert g.check(20) is None  # within the tolerance
    g.history.append({"step": 30.0, "guard/gold": 0.40, "guard/proxy": 1.1})
    assert g.check(30) is None  # gold fell, but so did the proxy: not over-optimisation
    g.history.append({"step": 40.0, "guard/gold": 0.40, "guard/proxy": 1.9})
    msg = g.check(40)
    assert msg is not None and "0.600 (step 10) to 0.400" in msg and "1.200 to 1.900" in msg
    assert g.check(40) is None  # once per run


def test_max_minutes_stops_with_a_checkpoint_and_resume_goes_on(
    tiny_models, tiny_clip, prompts_file, tmp_path
):
    out = tmp_path / "t"
    args = ("train.max_steps=3", "objective.beta=0")
    m = train(
        rl_cfg("flow_grpo", tiny_models["sd3"], prompts_file, tiny_clip, out, *args, "train.max_minutes=1e-9")
    )
    assert json.loads((out / "summary.json").read_text())["steps"] == 1 and math.isfinite(m["loss"])
    assert (out / "checkpoints/step-000001/export").is_dir()
    train(rl_cfg("flow_grpo", tiny_models["sd3"], prompts_file, tiny_clip, out, *args), resume="latest")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_two_processes_equal_one_for_flow_grpo(tiny_models, tiny_clip, prompts_file, tmp_path):
    """accelerate launch --num_processes 2 (CPU, gloo) samples the same groups as one process at the
    same global group count (one global prompt draw per round, per-sample seeds from global indices,
    advantages over the gathered rewards) and ends with the same weights."""
    import os
    import subprocess

    from test_train import final_ckpt, trainable

    args = ["train.max_steps=2", "objective.clip_range=1e-2", "train.lr=3e-2", "objective.beta=0.04"]
    one = tmp_path / "one"
    train(
        rl_cfg(
            "flow_grpo",
            tiny_models["sd3"],
            prompts_file,
            tiny_clip,
            one,
            *args,
            "train.batch_size=2",
            "train.grad_accum=2",
        )
    )
    two = tmp_path / "two"
    cfg = rl_cfg("flow_grpo", tiny_models["sd3"], prompts_file, tiny_clip, two, *args, "train.batch_size=1")
    from diffalign.config import dump_config

    dump_config(cfg, tmp_path / "two.yaml")
    cmd = [*accelerate_launch(), "-m", "diffalign.cli", "train", str(tmp_path / "two.yaml")]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((final_ckpt(two) / "state.json").read_text())
    assert state["world_size"] == 2 and state["ranks_in_sync"] is True
    m1, m2 = metrics(one), metrics(two)
    for key in ("reward", "loss", "ratio", "kl", "advantage", "clipfrac"):  # step 1: the same groups
        assert m1[0][key] == pytest.approx(m2[0][key], rel=1e-5, abs=1e-7), key
    assert m1[1]["reward"] == pytest.approx(m2[1]["reward"], rel=1e-4)
    # Adam's first steps move every entry by about lr * sign(gradient): where a gradient entry is at
    # the float noise of the summation order (DDP all-reduce vs local accumulation, 1 vs 2 threads)
    # its sign can differ, so most entries agree to 1e-5 and the rest by at most 2 lr per step
    w1, w2 = trainable(one), trainable(two)
    diffs = torch.cat([(w1[n] - w2[n]).abs().flatten() for n in w1])
    assert (diffs <= 1e-5).float().mean() > 0.9 and diffs.max() <= 2 * 3e-2 * 2


def test_two_processes_resume_inside_a_round_with_their_own_buffers(
    tiny_models, tiny_clip, prompts_file, tmp_path
):
    """Each process holds its own samples of a round; a checkpoint inside a round keeps every
    process's buffer (``rank<r>.`` keys), so 2 gloo processes stopped after the round's first step
    and resumed end exactly where the uninterrupted 2-process run does (weights and logs). With only
    the main process's buffer saved, the second process would resume on the first one's samples."""
    import os
    import subprocess

    from safetensors.torch import load_file
    from test_train import final_ckpt, trainable

    from diffalign.config import dump_config

    args = [
        "train.max_steps=3",
        "objective.updates_per_rollout=2",  # steps 1-2: round 0, step 3: round 1
        "objective.clip_range=1e-2",
        "train.lr=3e-2",
        "train.batch_size=1",
    ]

    def launch(out: Path, *extra: str) -> None:
        cfg = rl_cfg("flow_grpo", tiny_models["sd3"], prompts_file, tiny_clip, out, *args)
        cfg_file = tmp_path / f"{out.name}.yaml"
        dump_config(cfg, cfg_file)
        cmd = [*accelerate_launch(), "-m", "diffalign.cli", "train", str(cfg_file), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(tmp_path / "full")
    launch(tmp_path / "cut", "train.halt_after_step=1")
    buffer = load_file(tmp_path / "cut" / "checkpoints" / "step-000001" / "source.safetensors")
    assert {k.split(".")[0] for k in buffer} == {"rank0", "rank1"}
    assert not torch.equal(buffer["rank0.advantage"], buffer["rank1.advantage"])  # their own samples
    launch(tmp_path / "cut", "--resume")
    a, b = trainable(tmp_path / "full"), trainable(tmp_path / "cut")
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert metrics(tmp_path / "full") == metrics(tmp_path / "cut")
    assert json.loads((final_ckpt(tmp_path / "cut") / "state.json").read_text())["world_size"] == 2
