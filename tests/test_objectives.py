"""Objective maths: hand-derived numbers, parity with the official formula, and the contract
every registered objective must honour."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
import torch.nn.functional as F

from diffalign.config import ConfigError, ObjectiveConfig
from diffalign.objectives import OBJECTIVES, Objective, build_objective, diffusion_dpo_loss
from diffalign.registry import UnknownNameError


def test_dpo_hand_derived():
    """e_w=0.10, e_l=0.30, ref_w=0.20, ref_l=0.25, beta=10:
    model_diff = 0.10-0.30 = -0.20; ref_diff = 0.20-0.25 = -0.05
    inside = -0.5*10*(-0.20 - (-0.05)) = -5 * -0.15 = 0.75
    loss = -log sigmoid(0.75) = log(1 + e^-0.75) = log(1.4723666) = 0.3868710"""
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    loss, inside = diffusion_dpo_loss(t(0.10), t(0.30), t(0.20), t(0.25), beta=10.0)
    assert inside.item() == pytest.approx(0.75, abs=1e-12)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.75)), abs=1e-12)
    assert loss.item() == pytest.approx(0.3868710, abs=1e-6)


def test_dpo_equal_errors_give_log2_and_zero_margin():
    z = torch.full((3,), 0.5)
    loss, inside = diffusion_dpo_loss(z, z, z, z, beta=5000.0)
    assert torch.allclose(loss, torch.full((3,), math.log(2.0)))
    assert torch.all(inside == 0)


def _official_salesforce(model_w, model_l, ref_w, ref_l, beta_dpo):
    """SalesforceAIResearch/DiffusionDPO@5233e75 train.py:1125-1146, restated:
    model_diff = model_losses_w - model_losses_l; ref_diff = ref_losses_w - ref_losses_l
    inside_term = -1 * 0.5 * beta_dpo * (model_diff - ref_diff);
    loss = -1 * F.logsigmoid(inside_term).mean()"""
    model_diff = model_w - model_l
    ref_diff = ref_w - ref_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean(), inside_term


def _diffusers_sd15(model_w, model_l, ref_w, ref_l, beta_dpo):
    """diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py@071190d, restated:
    logits = ref_diff - model_diff; loss = -1 * F.logsigmoid(args.beta_dpo * logits).mean()"""
    model_diff = model_w - model_l
    ref_diff = ref_w - ref_l
    logits = ref_diff - model_diff
    return -1 * F.logsigmoid(beta_dpo * logits).mean()


def test_dpo_parity_with_official_and_diffusers_convention():
    g = torch.Generator().manual_seed(0)
    errs = [torch.rand(64, generator=g, dtype=torch.float64) * 0.2 + 0.05 for _ in range(4)]
    beta = 5000.0
    ours, inside = diffusion_dpo_loss(*errs, beta=beta)
    official, official_inside = _official_salesforce(*errs, beta)
    assert torch.allclose(ours.mean(), official, atol=1e-6, rtol=0)
    assert torch.allclose(inside, official_inside, atol=1e-6, rtol=0)
    # diffusers SD1.5 has no 0.5: its beta' = our beta / 2 (its default 2500 == our 5000)
    assert torch.allclose(ours.mean(), _diffusers_sd15(*errs, beta / 2), atol=1e-6, rtol=0)
    # the mean of the logsigmoid, not the logsigmoid of the mean (diffusers #6702)
    assert not torch.allclose(ours.mean(), -F.logsigmoid(inside.mean()), atol=1e-4)


def test_hinge_and_ipo_variants():
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    # inside = 0.75 as above: hinge = relu(1 - 0.75) = 0.25
    loss, _ = diffusion_dpo_loss(t(0.10), t(0.30), t(0.20), t(0.25), beta=10.0, loss_type="hinge")
    assert loss.item() == pytest.approx(0.25)
    # ipo: d = (ref_w - e_w) - (ref_l - e_l) = 0.10 - (-0.05) = 0.15; (0.15 - 1/10)^2 = 0.0025
    loss, _ = diffusion_dpo_loss(t(0.10), t(0.30), t(0.20), t(0.25), beta=10.0, loss_type="ipo")
    assert loss.item() == pytest.approx(0.0025)


def test_sft_is_winner_error():
    obj = build_objective(ObjectiveConfig("sft"))
    pe = torch.tensor([[0.3], [0.7]])
    out = obj(pe, None, {})
    assert torch.equal(out.loss, torch.tensor([0.3, 0.7]))
    assert obj.winner_only and not obj.needs_reference


def test_dpo_metrics_hand_derived():
    obj = build_objective(ObjectiveConfig("diffusion_dpo", {"beta": 10}))
    pe = torch.tensor([[0.10, 0.30], [0.30, 0.10]])
    re = torch.tensor([[0.20, 0.25], [0.20, 0.25]])
    out = obj(pe, re, {})
    # row 2: model_diff = 0.2, ref_diff = -0.05 -> inside = -5*(0.25) = -1.25
    assert torch.allclose(out.metrics["margin"], torch.tensor([0.75, -1.25]))
    assert torch.equal(out.metrics["implicit_acc"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(out.metrics["rewards/chosen"], torch.tensor([0.5, -0.5]))


def test_dcpo_is_the_official_line_hand_derived():
    """DCPO-T2I src/dcpo_trainer.py (the Diffusion-DPO loss on per-caption errors), restated:
    ``-logsigmoid(-0.5 * beta * (model_diff - ref_diff))``, beta 500 (src/run.sh):
    row 0: model_diff = 0.100 - 0.104 = -0.004, ref_diff = 0.102 - 0.101 = 0.001
           inside = -250 * (-0.005) = 1.25 -> loss = log(1 + e^-1.25) = 0.2519291
    row 1 (errors swapped): model_diff = +0.004, inside = -250 * 0.003 = -0.75 -> loss = 1.1368710"""
    pe = torch.tensor([[0.100, 0.104], [0.104, 0.100]], dtype=torch.float64)
    re = torch.tensor([[0.102, 0.101], [0.102, 0.101]], dtype=torch.float64)
    out = build_objective(ObjectiveConfig("dcpo"))(pe, re, {})  # default beta = the official 500
    want = torch.tensor([0.2519291, math.log1p(math.exp(0.75))], dtype=torch.float64)
    torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=0)
    assert math.log1p(math.exp(0.75)) == pytest.approx(1.1368710, abs=1e-6)
    official = -F.logsigmoid(-0.5 * 500.0 * ((pe[:, 0] - pe[:, 1]) - (re[:, 0] - re[:, 1])))
    torch.testing.assert_close(out.loss, official)
    torch.testing.assert_close(out.metrics["margin"], torch.tensor([1.25, -0.75], dtype=torch.float64))


def test_online_dpo_is_flow_grpos_line_hand_derived():
    """flow_grpo scripts/train_sd3_dpo.py, restated:
    ``inside = -0.5 * beta * ((e_w - e_ref_w) - (e_l - e_ref_l))``,
    ``loss = -logsigmoid(inside)``, beta 100 (config/dpo.py). Velocity errors e_w = 0.30, e_l = 0.50,
    ref 0.32 / 0.49: (e_w - ref_w) - (e_l - ref_l) = -0.02 - 0.01 = -0.03 -> inside = 1.5,
    loss = log(1 + e^-1.5) = 0.2014133; accuracy 1; rewards/chosen = -50 * (-0.02) = 1.0."""
    pe = torch.tensor([[0.30, 0.50]], dtype=torch.float64)
    re = torch.tensor([[0.32, 0.49]], dtype=torch.float64)
    out = build_objective(ObjectiveConfig("online_dpo"))(pe, re, {})
    assert out.loss.item() == pytest.approx(0.2014133, abs=1e-6)
    assert out.metrics["margin"].item() == pytest.approx(1.5)
    assert out.metrics["implicit_acc"].item() == 1.0
    assert out.metrics["rewards/chosen"].item() == pytest.approx(1.0)


CAPABILITIES = typing.get_type_hints(Objective, include_extras=False)
"""Everything the Objective protocol declares (its ClassVars)."""


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_declares_every_capability(name):
    """Every registered objective sets each ClassVar of the protocol itself (no inherited or
    getattr-defaulted capability), with consistent values."""
    cls = OBJECTIVES.get(name)
    declared = [k for k in CAPABILITIES if k != "__call__"]
    assert {"needs_reference", "kind", "winner_only", "per_image_captions", "needs_scores"} <= set(declared)
    assert {"reports_margin", "logistic_margin", "reported_metrics"} <= set(declared)
    for k in declared:
        assert k in vars(cls), f"{name} does not declare {k}"
    for k in ("winner_only", "per_image_captions", "needs_scores", "reports_margin", "noises_inputs"):
        assert isinstance(vars(cls)[k], bool), (name, k)
    # a bool, or a property computed from the hyperparameters (GRPO: only when the KL weight is > 0)
    need_ref = vars(cls)["needs_reference"]
    assert isinstance(need_ref, bool) or isinstance(need_ref, property), name
    assert isinstance(build_objective(ObjectiveConfig(name)).needs_reference, bool)
    assert cls.kind in ("preference", "ranked", "unpaired", "online", "supervised")
    assert cls.source in ("dataset", "rollout") and isinstance(cls.ref_refresh_every, int)
    assert cls.terms in ("errors", "transition_log_probs", "sde_steps", "velocities")
    assert (cls.source == "dataset") == (cls.kind != "online"), name
    if cls.source == "dataset":  # a dataset source computes denoising errors only
        assert cls.terms == "errors", name
    assert cls.noises_inputs == callable(vars(cls).get("noised_inputs")), name
    assert isinstance(cls.reported_metrics, frozenset)
    assert cls.reports_margin == ("margin" in cls.reported_metrics)
    if cls.logistic_margin:  # auto-beta rescales a beta field and reads the margin
        assert cls.reports_margin and "beta" in {f.name for f in dataclasses.fields(cls)}
    errors = {"err/policy_w", "err/policy_l", "err/ref_w", "err/ref_l"}
    if cls.kind in ("preference", "ranked", "unpaired"):  # comparable metrics for the stability kit
        want = errors if cls.needs_reference else {"err/policy_w", "err/policy_l"}
        assert want | {"implicit_acc", "margin"} <= cls.reported_metrics, name


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_contract(name):
    obj = build_objective(ObjectiveConfig(name))
    B = 5
    g = torch.Generator().manual_seed(0)
    policy, ref, batch = contract_inputs(obj, B, g)
    out = obj(policy, ref, batch)
    assert out.loss.shape == (B,)
    assert torch.isfinite(out.loss).all()
    out.loss.sum().backward()
    leaves = list(policy.values()) if isinstance(policy, dict) else [policy]
    grads = [p.grad for p in leaves if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0
    assert obj.reported_metrics <= set(out.metrics), obj.reported_metrics - set(out.metrics)
    for v in out.metrics.values():
        assert not v.requires_grad  # metrics are detached
        assert v.shape in ((B,), ()) and torch.isfinite(v).all()
    if obj.reports_margin:
        assert out.metrics["margin"].shape == (B,)  # per sample: the margin cap zeroes samples
    for r in ref.values() if isinstance(ref, dict) else [ref] if ref is not None else []:
        assert not r.requires_grad  # gradients flow only through policy terms
    # config round trip
    again = build_objective(ObjectiveConfig(name, dataclasses.asdict(obj)))
    assert again == obj


def test_unknown_objective_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'diffusion_dpo'"):
        build_objective(ObjectiveConfig("diffusion_dp"))


def test_unknown_hyperparameter_names_choices():
    with pytest.raises(ConfigError, match="no hyperparameter 'bet'.*'beta'"):
        build_objective(ObjectiveConfig("diffusion_dpo", {"bet": 1.0}))
    with pytest.raises(ConfigError, match="beta must be > 0"):
        build_objective(ObjectiveConfig("diffusion_dpo", {"beta": -1.0}))
    with pytest.raises(ConfigError, match="valid choices: sigmoid, hinge, ipo"):
        build_objective(ObjectiveConfig("diffusion_dpo", {"loss_type": "logistic"}))


def contract_inputs(obj, B: int, g: torch.Generator):
    """Per-sample terms of the kind the objective declares (``Objective.terms``), near a fine-tuned
    model's: policy = reference + a small deviation, so beta*margin is O(1) and no default beta
    saturates a sigmoid to an exactly-zero gradient."""
    if obj.terms in ("errors", "transition_log_probs"):
        k = 1 if obj.winner_only else 2
        base = torch.rand(B, k, generator=g) * 0.3 + 0.05
        policy = (base + 1e-4 * torch.randn(B, k, generator=g)).requires_grad_(True)
        ref = base.clone() if obj.needs_reference else None
        batch = {"scores": torch.rand(B, 2, generator=g)} if obj.needs_scores else {}
        return policy, ref, batch
    shape = (B, 4, 2, 2)
    if obj.terms == "sde_steps":
        old = -1.0 + 0.1 * torch.randn(B, generator=g)
        mean = torch.randn(shape, generator=g)
        policy = {
            "log_prob": (old + 1e-5 * torch.randn(B, generator=g)).requires_grad_(True),
            "mean": (mean + 1e-3 * torch.randn(shape, generator=g)).requires_grad_(True),
        }
        ref = {"mean": mean} if obj.needs_reference else None
        batch = {
            "old_log_prob": old,
            "advantage": torch.randn(B, generator=g),
            "kl_std": torch.full((B,), 0.7),
        }
        return policy, ref, batch
    v_old = torch.randn(shape, generator=g)
    policy = {"velocity": (v_old + 0.1 * torch.randn(shape, generator=g)).requires_grad_(True)}
    ref = {"velocity": v_old.clone()} if obj.needs_reference else None
    x0 = torch.randn(shape, generator=g)
    sigma = torch.rand(B, generator=g) * 0.8 + 0.1
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * torch.randn(shape, generator=g)
    batch = {
        "old_velocity": v_old,
        "x0": x0,
        "x_t": x_t,
        "sigma": sigma,
        "optimality": torch.rand(B, generator=g),
    }
    return policy, ref, batch
