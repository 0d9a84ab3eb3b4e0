"""Zero-advantage groups left out of Flow-GRPO / GRPO rounds (``objective.drop_zero_advantage``).

The layout (``train.rollout.zero_advantage_layout``) decides per process which samples a round trains
and with what weight; the weights (``objectives.grpo.weigh_samples``) make the loop's plain means the
means over the kept samples wherever they were trained. Checked here: the layout and the weights in
isolation (every process count gives the kept mean), then tiny runs: the first step of every round
still sees a ratio of exactly 1 (repacked samples get their old log-probs recomputed), a run stopped
inside a repacked round resumes exactly, the gradient is the kept samples' mean, a round with nothing
kept trains nothing, GRPO on a UNet takes the option too, and 2 gloo processes equal one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_online_rl import metrics, rl_cfg
from torch import Tensor

from diffalign.objectives.grpo import flat_groups, group_advantages, grpo_loss, weigh_samples
from diffalign.train import train
from diffalign.train.rollout import ZERO_ADV_REPACK, zero_advantage_layout

from conftest import accelerate_launch


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


# ----------------------------------------------------------------------------- pure pieces


def test_flat_groups_are_the_groups_with_all_zero_advantages():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.5], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0 + 1e-6]])
    flat = flat_groups(r)
    assert flat.tolist() == [True, False, True, False]
    adv = group_advantages(r)
    assert (adv[flat] == 0).all() and (adv[~flat].abs().sum(1) > 0).all()
    assert adv[1, 2] == 0  # a sample at its group's mean is 0 too, but its group has signal: kept


def loop_mean(values: list[Tensor], micro: int) -> float:
    """The loop's reduction of a per-sample quantity: per process, the entries of its micro-batches
    (``micro`` equal ones) averaged, then the mean over processes (DDP / ``accelerator.reduce``)."""
    per_rank = [torch.stack([c.double().mean() for c in v.chunk(micro)]).mean() for v in values]
    return float(torch.stack(per_rank).mean())


@pytest.mark.parametrize("world,micro", [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 2)])
@pytest.mark.parametrize("p_flat", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_layout_gives_the_kept_mean_for_any_process_count(world, micro, p_flat):
    g = torch.Generator().manual_seed(world * 100 + micro * 10 + int(p_flat * 10))
    G, groups = 4, 8  # 32 samples per round over all processes
    flat = torch.rand(groups, generator=g) < p_flat
    keep = (~flat).repeat_interleave(G).view(world, -1)  # [world, n]
    n = keep.shape[1]
    loss = torch.randn(world, n, generator=g)  # a per-sample loss (or any metric)
    values, trained = [], 0
    repacked = []
    for rank in range(world):
        order, w = zero_advantage_layout(keep, rank, micro)
        assert len(order) % micro == 0 and len(order) >= micro  # equal micro-batches, none empty
        assert (order.diff() > 0).all() and w.dtype == torch.float32
        mine = keep[rank]
        assert mine[order].sum() == mine.sum()  # every kept sample is trained
        assert (w[~mine[order]] == 0).all()  # padding / left-out samples weigh nothing
        b, chunk = len(order) // micro, n // micro
        bs = [max(1, -(-int(keep[p].sum()) // micro)) for p in range(world)]
        repacked.append(b < chunk)
        if b < chunk:  # repacked: the fewest micro-batch slots, padding under one per micro-batch
            assert b == bs[rank] and max(bs) <= ZERO_ADV_REPACK * chunk
        else:
            assert torch.equal(order, torch.arange(n))  # the sampled chunks, nothing recomputed
            assert max(bs) > ZERO_ADV_REPACK * chunk
        values.append(w * loss[rank][order])
        trained += len(order)
    assert len(set(repacked)) == 1  # decided alike on every process (they run the same forwards)
    K = int(keep.sum())
    if K == 0:
        assert all((v == 0).all() for v in values) and trained == world * micro  # one pad per micro-batch
    else:
        assert loop_mean(values, micro) == pytest.approx(float(loss[keep].double().mean()), rel=1e-6)
    if K == keep.numel():  # nothing left out: exactly the old behaviour
        assert all(torch.equal(zero_advantage_layout(keep, r, micro)[1], torch.ones(n)) for r in range(world))


def test_weighted_metrics_keep_their_neutral_values_exactly():
    lp = torch.tensor([-1.2, -0.7, -3.0], requires_grad=True)
    loss, m = grpo_loss(lp, lp.detach(), torch.tensor([0.5, -1.0, 2.0]), 1e-4)
    for w in (torch.tensor([0.3, 0.0, 7.0]), torch.tensor([2.0 / 9, 2.0 / 9, 0.0])):
        wl, wm = weigh_samples(loss, m, w)
        assert (wm["ratio"] == 1.0).all()  # a first-step ratio of 1 reads 1 whatever the weights
        assert torch.equal(wm["advantage"], w * m["advantage"])
        assert torch.equal(wl, loss * w) and wl.requires_grad
    wl, wm = weigh_samples(loss, m, torch.ones(3))
    assert torch.equal(wl, loss) and all(torch.equal(wm[k], m[k]) for k in m)  # weight 1: unchanged


# ----------------------------------------------------------------------------- tiny runs


def drop_cfg(tiny_models, tiny_clip, prompts, out, *extra, model="sd3", name="flow_grpo"):
    return rl_cfg(
        name, tiny_models[model], prompts, tiny_clip, out, "objective.rewards=flat_circles_test", *extra
    )


def test_left_out_rounds_keep_ratio_one_and_resume_exactly(tiny_models, tiny_clip, prompts_file, tmp_path):
    """Seed 0 draws no circle prompt in round 0 and one of two in round 1: round 1 trains its 4 kept
    samples in 2 micro-batches of 2 (sampled in chunks of 4: old log-probs recomputed)."""
    from test_train import trainable

    import diffalign.train.rollout as rollout

    sizes = []
    real = rollout.GRPORollouts.terms

    def spy(self, model, batch):
        sizes.append(batch["x"].shape[0])
        return real(self, model, batch)

    args = (
        "train.max_steps=4",
        "objective.updates_per_rollout=2",
        "objective.clip_range=1e-2",
        "objective.beta=0",
    )
    rollout.GRPORollouts.terms = spy
    try:
        train(drop_cfg(tiny_models, tiny_clip, prompts_file, tmp_path / "full", *args, "train.lr=3e-2"))
    finally:
        rollout.GRPORollouts.terms = real
    rows = metrics(tmp_path / "full")
    assert [r.get("rollout/zero_adv_frac") for r in rows] == [0.0, None, 0.5, None]
    assert [r.get("rollout/empty_rounds") for r in rows] == [0.0, None, 0.0, None]
    for r in rows[0::2]:
        assert r["ratio"] == 1.0 and r["clipfrac"] == 0.0, r  # repacked round 1 included
    assert rows[3]["ratio"] != 1.0
    T = 3  # trained steps: int(4 * 0.99)
    # round 0: 2 steps x 1 chunk of 4 x T; round 1: T recomputes x 2 micro-batches, then 2 steps x 2 x T
    assert sizes == [4] * (2 * T) + [2] * (2 * T) + [2] * (2 * T)
    assert all(math.isfinite(r["loss"]) for r in rows)

    cut = tmp_path / "cut"
    train(
        drop_cfg(tiny_models, tiny_clip, prompts_file, cut, *args, "train.lr=3e-2", "train.halt_after_step=3")
    )
    train(drop_cfg(tiny_models, tiny_clip, prompts_file, cut, *args, "train.lr=3e-2"), resume="latest")
    a, b = trainable(tmp_path / "full"), trainable(cut)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert metrics(tmp_path / "full") == metrics(cut)


def test_the_gradient_is_the_mean_over_kept_samples(tiny_models, tiny_clip, prompts_file, tmp_path):
    """Seed 1, round 0: one circle prompt of two. At beta 0 a left-out sample's loss and gradient
    are 0, so training all 8 samples gives half of the kept samples' mean: loss and gradient norm
    with the option are twice those without."""
    args = ("train.seed=1", "train.max_steps=1", "objective.beta=0")
    on = drop_cfg(tiny_models, tiny_clip, prompts_file, tmp_path / "on", *args)
    off = drop_cfg(
        tiny_models, tiny_clip, prompts_file, tmp_path / "off", *args, "objective.drop_zero_advantage=false"
    )
    train(on)
    train(off)
    (a,), (b,) = metrics(tmp_path / "on"), metrics(tmp_path / "off")
    assert a["rollout/zero_adv_frac"] == b["rollout/zero_adv_frac"] == 0.5
    assert "rollout/empty_rounds" not in b
    assert a["ratio"] == b["ratio"] == 1.0
    assert a["loss"] == pytest.approx(2 * b["loss"], rel=1e-4, abs=1e-9)
    assert a["grad_norm"] == pytest.approx(2 * b["grad_norm"], rel=1e-4) and b["grad_norm"] > 0
    assert a["advantage"] == pytest.approx(2 * b["advantage"], rel=1e-4, abs=1e-7)  # kept mean vs all


def test_a_round_with_nothing_kept_trains_nothing(tiny_models, tiny_clip, prompts_file, tmp_path):
    from test_train import trainable

    out = tmp_path / "flat"
    train(
        rl_cfg(
            "flow_grpo",
            tiny_models["sd3"],
            prompts_file,
            tiny_clip,
            out,
            "objective.rewards=constant_test",
            "train.max_steps=2",
            "objective.beta=0.04",
        )
    )
    rows = metrics(out)
    assert [r["rollout/empty_rounds"] for r in rows] == [1.0, 2.0]
    for r in rows:
        assert r["rollout/zero_adv_frac"] == 1.0
        assert r["loss"] == 0.0 and r["grad_norm"] == 0.0 and r["kl"] == 0.0 and r["advantage"] == 0.0
        assert r["ratio"] == 1.0 and all(math.isfinite(v) for v in r.values())
    lora_b = [v for n, v in trainable(out).items() if "lora_B" in n]
    assert lora_b and all((v == 0).all() for v in lora_b)  # nothing learned


def test_grpo_on_a_unet_leaves_zero_advantage_groups_out(tiny_models, tiny_clip, prompts_file, tmp_path):
    out = tmp_path / "g"
    train(
        drop_cfg(
            tiny_models,
            tiny_clip,
            prompts_file,
            out,
            "train.seed=1",
            "train.max_steps=1",
            "objective.guidance_scale=2",
            "objective.timestep_fraction=0.5",
            "objective.drop_zero_advantage=true",
            model="sd",
            name="grpo",
        )
    )
    (row,) = metrics(out)
    assert row["rollout/zero_adv_frac"] == 0.5 and row["ratio"] == 1.0 and math.isfinite(row["loss"])


def test_two_processes_equal_one_with_left_out_groups(tiny_models, tiny_clip, prompts_file, tmp_path):
    """Seed 1, round 0: one process's group is flat, the other's is not (one process: both in one
    round of 8, repacked into 2 micro-batches of 2; two: the fuller process cannot repack, so each
    trains its sampled chunk of 4, at weight 0 on one and 2 on the other). The same gradient, so the
    same weights."""
    import os
    import subprocess

    from test_train import final_ckpt, trainable

    from diffalign.config import dump_config

    args = [
        "train.seed=1",
        "train.max_steps=2",
        "objective.clip_range=1e-2",
        "train.lr=3e-2",
        "objective.beta=0.04",
    ]
    one = tmp_path / "one"
    train(
        drop_cfg(tiny_models, tiny_clip, prompts_file, one, *args, "train.batch_size=2", "train.grad_accum=2")
    )
    two = tmp_path / "two"
    dump_config(
        drop_cfg(tiny_models, tiny_clip, prompts_file, two, *args, "train.batch_size=1"),
        tmp_path / "two.yaml",
    )
    script = tmp_path / "launch.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import rl_test_rewards\n"
        "from diffalign.cli import main\n"
        "if __name__ == '__main__':\n"
        f"    sys.exit(main(['train', {str(tmp_path / 'two.yaml')!r}]))\n"
    )
    cmd = [*accelerate_launch(), str(script)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((final_ckpt(two) / "state.json").read_text())
    assert state["world_size"] == 2 and state["ranks_in_sync"] is True
    m1, m2 = metrics(one), metrics(two)
    assert m1[0]["rollout/zero_adv_frac"] == m2[0]["rollout/zero_adv_frac"] == 0.5
    assert m1[0]["ratio"] == m2[0]["ratio"] == 1.0
    for key in ("reward", "loss", "kl", "advantage", "clipfrac", "grad_norm"):  # step 1: the same samples
        assert m1[0][key] == pytest.approx(m2[0][key], rel=1e-5, abs=1e-7), key
    assert m1[1]["reward"] == pytest.approx(m2[1]["reward"], rel=1e-4)
    # as in test_online_rl's two-process test: Adam's first steps move entries by about lr * sign(g),
    # and a sign at float noise may differ between the summation orders
    w1, w2 = trainable(one), trainable(two)
    diffs = torch.cat([(w1[n] - w2[n]).abs().flatten() for n in w1])
    assert (diffs <= 1e-5).float().mean() > 0.9 and diffs.max() <= 2 * 3e-2 * 2
