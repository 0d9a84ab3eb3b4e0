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


def logs(dw, dl, acc):
    return {
        "err/policy_w": 0.1 + dw,
        "err/ref_w": 0.1,
        "err/policy_l": 0.1 + dl,
        "err/ref_l": 0.1,
        "implicit_acc": acc,
    }


def test_divergence_monitor():
    m = DivergenceMonitor(window=10)
    flags = [m.update(logs(0.001 * i, 0.002 * i, 1.0)) for i in range(10)]
    assert flags[-1] and not any(flags[:-1])  # both errors rise, accuracy 1
    m = DivergenceMonitor(window=10)
    assert not any(m.update(logs(0.001 * i, 0.002 * i, 0.6)) for i in range(20))  # accuracy not ~1
    m = DivergenceMonitor(window=10)
    assert not any(
        m.update(logs(-0.001 * i, 0.002 * i, 1.0)) for i in range(20)
    )  # winner error falls: healthy DPO


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
            "objective 'mapo' has no logistic loss on a beta-scaled margin",
        ),
        ("diffusion_dpo", ["train.auto_beta_target=0.3", "objective.loss_type=hinge"], "no logistic loss"),
        ("rankdpo", ["train.margin_cap=5"], "objective 'rankdpo' reports no per-pair margin"),
        ("kto", ["train.margin_cap=5"], "objective 'kto' reports no per-pair margin"),
    ],
)
def test_stability_options_checked_before_loading(name, extra, match):
    from diffalign.config import load_config, validate

    cfg = load_config(None, ["model.path=org/model", "data.path=x.parquet", f"objective.name={name}", *extra])
    with pytest.raises(ConfigError, match=match):
        validate(cfg, check_data=False)


def test_smpo_refuses_logit_scale_scores_with_cosine_range():
    from diffalign.objectives import SmPO

    pol = torch.full((2, 2), 0.1)
    with pytest.raises(ConfigError, match="set objective.score_range"):
        SmPO()(pol, pol.clone(), {"scores": torch.tensor([[21.0, 20.5], [22.0, 21.0]])})
    out = SmPO(score_range=16.658)(pol, pol.clone(), {"scores": torch.tensor([[21.0, 20.5], [22.0, 21.0]])})
    assert torch.isfinite(out.loss).all()
