"""The objective contract shared by every method in this package.

An objective is a frozen dataclass whose fields are its hyperparameters. Calling it maps
per-sample denoising errors to a per-sample loss:

    objective(policy_err [B, k], ref_err [B, k] | None, batch) -> ObjectiveOutput(loss [B], metrics)

(policy-gradient objectives receive dicts of per-sample terms instead of errors; see ``terms``).

``k`` is the number of images per prompt (2 for pairs, winner first). Errors are the mean squared
error of the model prediction against the adapter's target over every non-batch dimension (see
``diffalign.models.base.per_sample_error``), so one beta convention holds for all families.
The loop owns the reduction over the batch (mean) and the backward pass.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from torch import Tensor

from diffalign.registry import Registry

OBJECTIVES: Registry[type] = Registry("objective")

POLICY_ERRORS = frozenset({"err/policy_w", "err/policy_l"})
"""The policy's denoising errors on the winner (best) and the loser (worst) image, shape [B]."""
ERRORS = POLICY_ERRORS | {"err/ref_w", "err/ref_l"}
"""Policy and reference errors: what ``train.stability.DivergenceMonitor`` compares."""


@dataclass
class ObjectiveOutput:
    loss: Tensor
    """Per-sample loss, shape [B]."""
    metrics: dict[str, Tensor]
    """Detached per-sample (shape [B]) or scalar tensors; the loop averages them for logging."""


class Objective(Protocol):
    """What the training loops read from an objective. Every registered objective sets each
    ClassVar below explicitly (the contract test in ``tests/test_objectives.py`` checks it); the
    loops read them directly, never with a fallback default."""

    needs_reference: ClassVar[bool]
    """False: the loop never runs (or even builds) a reference model. Objectives whose need depends
    on a hyperparameter (GRPO's KL weight) declare it as a read-only property instead."""
    kind: ClassVar[Literal["preference", "ranked", "unpaired", "online", "supervised"]]
    source: ClassVar[Literal["dataset", "rollout"]]
    """Where training groups come from: ``dataset`` (pairs / ranked sets from files,
    ``train.sources.DatasetSource``) or ``rollout`` (sampled by the current policy and scored by
    rewards, ``train.rollout``)."""
    terms: ClassVar[Literal["errors", "transition_log_probs", "sde_steps", "velocities"]]
    """What the per-sample terms handed to ``__call__`` are (the source computes them, for the policy
    with gradients and for the reference in inference mode):

    - ``errors``: denoising errors ``[B, k]`` (``models.base.per_sample_error``);
    - ``transition_log_probs``: sampler transition log-probs ``[B, 2]``, winner first (SPO);
    - ``sde_steps``: ``{"log_prob": [B], "mean": [B, ...]}`` of one stochastic sampling step (GRPO);
      the reference gives ``{"mean"}``;
    - ``velocities``: ``{"velocity": [B, ...]}`` at forward-process points (DiffusionNFT)."""
    noises_inputs: ClassVar[bool]
    """True: the objective builds the noised inputs itself, with the current model
    (``noised_inputs(adapter, model, x0 [B,k,...], cond, micro, seeds) -> (x_t, t, target)``;
    InPO/SmPO's DDIM inversion); False: the dataset source draws shared noise and timesteps."""
    ref_refresh_every: ClassVar[int]
    """> 0: the reference is a snapshot of the trained weights, refreshed every that many optimizer
    steps (online DPO); 0: the reference is fixed. A dataclass field where it is a hyperparameter."""
    winner_only: ClassVar[bool]
    """True: only the first image of each group is forwarded (SFT)."""
    per_image_captions: ClassVar[bool]
    """True: each image is conditioned on its own caption (DCPO); False: one caption per group."""
    needs_scores: ClassVar[bool]
    """True: the batch must carry per-image reward scores ``batch['scores'] [B, k]`` (SmPO)."""
    reports_margin: ClassVar[bool]
    """True: ``metrics['margin']`` is a per-sample ``[B]`` preference margin (larger = the
    preference is satisfied more strongly), so ``train.margin_cap`` can zero saturated samples."""
    logistic_margin: ClassVar[bool]
    """True: the loss is ``-logsigmoid(margin)`` on a margin proportional to the ``beta`` field, so
    ``sigmoid(-margin)`` is the gradient factor ``train.auto_beta_target`` steers (implies
    ``reports_margin``)."""
    reported_metrics: ClassVar[frozenset[str]]
    """Metric keys every call returns (the divergence monitor reads ``implicit_acc`` and
    ``err/{policy,ref}_{w,l}``; reference-free objectives report the policy errors only)."""

    def __call__(
        self, policy_err: Tensor, ref_err: Tensor | None, batch: dict[str, Any]
    ) -> ObjectiveOutput: ...


def build_objective(ocfg: Any) -> Objective:
    """Instantiate the objective named in an ``ObjectiveConfig``, checking its hyperparameters
    against the dataclass fields (unknown names and wrong types fail with the valid choices)."""
    from diffalign.config import ConfigError, coerce
    from diffalign.registry import suggest

    cls = OBJECTIVES.get(ocfg.name)
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in ocfg.params.items():
        if k not in fields:
            raise ConfigError(
                f"objective {ocfg.name!r} has no hyperparameter "
                f"{k!r}.{suggest(k, fields) if fields else ' It takes none.'}"
            )
        kwargs[k] = coerce(v, hints[k], f"objective.{k}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"objective {ocfg.name!r}: {e}") from None
