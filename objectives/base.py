"""The objective contract shared by every method in this package.

An objective is a frozen dataclass whose fields are its hyperparameters. Calling it maps
per-sample denoising errors to a per-sample loss:

    objective(policy_err [B, k], ref_err [B, k] | None, batch) -> ObjectiveOutput(loss [B], metrics)

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


@dataclass
class ObjectiveOutput:
    loss: Tensor
    """Per-sample loss, shape [B]."""
    metrics: dict[str, Tensor]
    """Detached per-sample (shape [B]) or scalar tensors; the loop averages them for logging."""


class Objective(Protocol):
    needs_reference: ClassVar[bool]
    """False: the loop never runs (or even builds) a reference model."""
    kind: ClassVar[Literal["preference", "ranked", "unpaired", "online", "supervised"]]
    winner_only: ClassVar[bool]
    """True: only the first image of each group is forwarded (SFT)."""
    # Optional: ``per_image_captions: ClassVar[bool] = True`` conditions each image on its own
    # caption (DCPO); objectives without it get one caption per group.

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
                f"objective {ocfg.name!r} has no hyperparameter {k!r}.{suggest(k, fields) if fields else ' It takes none.'}"
            )
        kwargs[k] = coerce(v, hints[k], f"objective.{k}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"objective {ocfg.name!r}: {e}") from None
