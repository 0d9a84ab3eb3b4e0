"""Stability toolkit: auto-beta controller, margin cap, divergence warning; wired into the loop
(auto-beta state survives a resume exactly)."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.config import ConfigError
from diffalign.train.stability import AutoBeta, DivergenceMonitor, cap_margins, gradient_factor


def test_auto_beta_hand_derived():
    a = AutoBeta(target=0.3, rate=0.05)
    # factor 0.15 < 0.3: margins saturate -> lower beta by exp(-0.05 * 0.5)
    assert a.update(0.15) == pytest.approx(math.exp(-0.025))
    # factor 0.45 > 0.3: too weak -> raise, error clipped at -0.5 -> exp(+0.025)
    assert a.update(0.45) == pytest.approx(1.0)
    a.scale = 1.0
    assert a.update(0.9) == pytest.approx(math.exp(0.05))  # (0.3 - 0.9) / 0.3 = -2 clipped to -1
    assert gradient_factor(torch.tensor([0.0, 0.0])).item() == pytest.approx(0.5)
    with pytest.raises(ConfigError, match=r"must be in \(0, 0.5\)"):
        AutoBeta(target=0.7)


def test_auto_beta_drives_factor_to_target():
    """On a model margin = beta * d (d fixed), the controller finds beta with sigmoid(-margin) ~ target."""
    d = torch.tensor([0.002, 0.004, 0.006])
    a = AutoBeta(target=0.3, rate=0.2)
    beta0 = 5000.0  # too strong: margins 10-30, factor ~0
    for _ in range(400):
        a.update(gradient_factor(beta0 * a.scale * d).item())
    assert gradient_factor(beta0 * a.scale * d).item() == pytest.approx(0.3, abs=0.02)


def test_cap_margins():
    loss = torch.tensor([0.5, 0.2, 0.01])
    m = torch.tensor([0.1, 1.5, 4.0])
    assert torch.equal(cap_margins(loss, m, 2.0), torch.tensor([0.5, 0.2, 0.0]))
    assert torch.equal(cap_margins(loss, m, 0.0), loss)
    with pytest.raises(ConfigError, match="reports no per-pair margin"):
        cap_margins(loss, None, 1.0)


def logs(dw, dl, acc, ref=0.1):
    return {
        "err/policy_w": ref + dw,
        "err/ref_w": ref,
        "err/policy_l": ref + dl,
        "err/ref_l": ref,
        "implicit_acc": acc,
    }


def test_divergence_monitor_winning_by_degrading():
    """Rule 1 (unchanged): both gaps rise (by 0.005 and 0.01, 5-10 % of the 0.1 reference error,
    below the blow-up threshold) while accuracy is 1."""
    m = DivergenceMonitor(window=10)
    flags = [m.update(logs(0.001 * i, 0.002 * i, 1.0)) for i in range(10)]
    assert flags[-1] and not any(flags[:-1]) and m.reason == "winning by degrading"
    assert "implicit accuracy is ~1" in m.warning(10)
    m = DivergenceMonitor(window=10)
    assert not any(m.update(logs(0.001 * i, 0.002 * i, 0.6)) for i in range(20))  # accuracy not ~1
    m = DivergenceMonitor(window=10)
    assert not any(
        m.update(logs(-0.001 * i, 0.002 * i, 1.0)) for i in range(20)
    )  # winner error falls: healthy DPO


def test_divergence_monitor_blow_up_at_chance_accuracy():
    """Rule 2: the audit's lr-0.3 case, policy errors climbing to +1.7 over a reference error of 1.0
    while implicit accuracy sits at 0.5. Window 10, gaps 0.19 * i (i = 0..9, ending at 1.71): first-half
    mean 0.38, second-half mean 1.33, rise 0.95 > 0.5 * 1.0 on both images -> flagged at the 10th step.
    The old monitor (accuracy rule only) never fired on this stream."""
    m = DivergenceMonitor(window=10)
    flags = [m.update(logs(0.19 * i, 0.19 * i, 0.5, ref=1.0)) for i in range(10)]
    assert flags[-1] and not any(flags[:-1]) and m.reason == "blow-up"
    assert "rose by more than 0.5x the reference error level" in m.warning(10)
    # scale-free: the same relative blow-up on errors 1000x smaller fires too
    m = DivergenceMonitor(window=10)
    assert [m.update(logs(0.19e-3 * i, 0.19e-3 * i, 0.5, ref=1e-3)) for i in range(10)][-1]


def test_divergence_monitor_quiet_on_healthy_streams():
    # healthy DPO: the winner's gap falls while the loser's rises, accuracy 0.8 (nothing fires)
    m = DivergenceMonitor(window=10)
    assert not any(m.update(logs(-0.01 * i, 0.02 * i, 0.8)) for i in range(30))
    # both errors drift up slowly (0.25 % of the reference error per step) at chance accuracy
    m = DivergenceMonitor(window=10)
    assert not any(m.update(logs(0.00025 * i, 0.00025 * i, 0.6)) for i in range(30))
    # stationary noisy gaps (std 20 % of the reference error) around zero
    g = torch.Generator().manual_seed(0)
    noise = (0.02 * torch.randn(200, 2, generator=g)).tolist()
    m = DivergenceMonitor(window=50)
    assert not any(m.update(logs(a, b, 0.55)) for a, b in noise)


def test_auto_beta_in_loop_resumes_exactly(tiny_models, pairs_parquet, tmp_path):
    import json

    from test_train import final_ckpt, run, trainable

    extra = [
        "train.max_steps=4",
        "train.batch_size=2",
        "train.auto_beta_target=0.3",
        "train.auto_beta_rate=0.5",
        "train.margin_cap=50",
        "objective.beta=5000",
    ]
    full = run(tiny_models["sd"], pairs_parquet, tmp_path / "full", *extra)
    assert full["stability/beta"] != 5000.0 and 0 < full["stability/grad_factor"] < 1
    run(
        tiny_models["sd"],
        pairs_parquet,
        tmp_path / "cut",
        *extra,
        "train.halt_after_step=2",
        "train.checkpoint_every=2",
    )
    from test_train import overrides

    from diffalign.config import load_config
    from diffalign.train import train

    resumed = train(
        load_config(
            None,
            overrides(tiny_models["sd"], pairs_parquet, tmp_path / "cut", *extra, "train.checkpoint_every=2"),
        ),
        resume="latest",
    )
    assert resumed["stability/beta"] == pytest.approx(full["stability/beta"], rel=1e-9)
    a, b = trainable(tmp_path / "full"), trainable(tmp_path / "cut")
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0)
    state = json.loads((final_ckpt(tmp_path / "cut") / "state.json").read_text())
    assert state["beta_scale"] * 5000 == pytest.approx(full["stability/beta"])


def test_auto_beta_refuses_objective_without_beta(tiny_models, tmp_path):
    from diffalign.config import load_config
    from diffalign.train import train

    from conftest import make_pairs_parquet

    data = make_pairs_parquet(tmp_path / "p.parquet", n=4)
    cfg = load_config(
        None,
        [
            f"model.path={tiny_models['sd']}",
            f"data.path={data}",
            f"train.output_dir={tmp_path / 'r'}",
            "data.resolution=32",
            "objective.name=sft",
            "train.auto_beta_target=0.3",
            "train.max_steps=1",
        ],
    )
    with pytest.raises(ConfigError, match="objective 'sft' has no beta to adapt"):
        train(cfg)


@pytest.mark.parametrize(
    "name, extra, match",
    [
        (
            "mapo",
            ["train.auto_beta_target=0.3"],
            r"objective 'mapo' has no logistic loss on a beta-scaled margin \(supported: "
            r"dcpo, diffusion_dpo, inpo, rankdpo, smpo, with loss_type=sigmoid",
        ),
        ("diffusion_dpo", ["train.auto_beta_target=0.3", "objective.loss_type=hinge"], "no logistic loss"),
        ("kto", ["train.auto_beta_target=0.3"], "objective 'kto' has no logistic loss"),
        ("sft", ["train.margin_cap=5"], "objective 'sft' reports no per-pair margin"),
    ],
)
def test_stability_options_checked_before_loading(name, extra, match):
    from diffalign.config import load_config, validate

    cfg = load_config(None, ["model.path=org/model", "data.path=x.parquet", f"objective.name={name}", *extra])
    with pytest.raises(ConfigError, match=match):
        validate(cfg, check_data=False)


@pytest.mark.parametrize(
    "name, extra",
    [
        ("rankdpo", ["train.margin_cap=5", "train.auto_beta_target=0.3"]),
        ("kto", ["train.margin_cap=5"]),
    ],
)
def test_stability_options_accepted_where_a_margin_is_reported(name, extra):
    from diffalign.config import load_config, validate

    validate(
        load_config(None, ["model.path=org/m", "data.path=x.parquet", f"objective.name={name}", *extra]),
        check_data=False,
    )


def test_smpo_refuses_logit_scale_scores_with_cosine_range():
    from diffalign.objectives import SmPO

    pol = torch.full((2, 2), 0.1)
    with pytest.raises(ConfigError, match="set objective.score_range"):
        SmPO()(pol, pol.clone(), {"scores": torch.tensor([[21.0, 20.5], [22.0, 21.0]])})
    out = SmPO(score_range=16.658)(pol, pol.clone(), {"scores": torch.tensor([[21.0, 20.5], [22.0, 21.0]])})
    assert torch.isfinite(out.loss).all()


def test_rankdpo_auto_beta_and_margin_cap_in_loop_kto_margin_cap(tiny_models, pairs_parquet, tmp_path):
    """RankDPO (the demo's objective) and KTO now report margins and loser errors, so the kit acts on
    them in the loop: auto-beta moves RankDPO's beta; the margin cap and the monitor's inputs are logged."""
    from test_ranked import make_ranked
    from test_train import run

    ranked = make_ranked(tmp_path / "r.parquet")
    m = run(
        tiny_models["sd"],
        ranked,
        tmp_path / "rank",
        "data.format=ranked",
        "objective.name=rankdpo",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.auto_beta_target=0.3",
        "train.auto_beta_rate=0.5",
        "train.margin_cap=50",
    )
    assert m["stability/beta"] != 100.0 and 0 < m["stability/grad_factor"] < 1
    for key in ("margin", "implicit_acc", "err/policy_w", "err/policy_l", "err/ref_w", "err/ref_l"):
        assert math.isfinite(m[key]), key
    m = run(
        tiny_models["sd"],
        pairs_parquet,
        tmp_path / "kto",
        "objective.name=kto",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.margin_cap=50",
    )
    for key in ("margin", "implicit_acc", "err/policy_l", "err/ref_l"):
        assert math.isfinite(m[key]), key
