"""Numeric guards of the training loops: a step whose loss or gradients are not finite is skipped
and counted, ``train.max_bad_steps`` of them in a row stop the run, and weights that an update made
non-finite stop it at once (they are never checkpointed or exported; see ``checkpoint.py``).

Every process sees the same reduced loss and the same all-reduced gradient norm, so all of them
take the same decision and none waits for another at a collective."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ConfigError


class NumericError(ConfigError):
    """Training produced non-finite numbers; the message says what to change (one line in the CLI)."""


def count_non_finite(tensors: Iterable[torch.Tensor]) -> int:
    """How many elements of ``tensors`` are NaN or infinite."""
    return sum(int((~torch.isfinite(t.detach())).sum()) for t in tensors)


class BadStepGuard:
    def __init__(self, max_in_row: int, total: int = 0) -> None:
        self.max_in_row = max_in_row
        self.total = total  # over the whole run (checkpointed, so a resume keeps counting)
        self.in_row = 0

    def skip(self, step: int, loss: float, grad_norm: float) -> bool:
        """True: drop this step's gradients instead of updating. Raises after too many in a row."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_row = 0
            return False
        self.total += 1
        self.in_row += 1
        if self.in_row >= self.max_in_row:
            raise NumericError(
                f"step {step}: loss {loss} / gradient norm {grad_norm} not finite for {self.in_row} "
                f"steps in a row (train.max_bad_steps={self.max_in_row}); lower train.lr, raise beta, "
                "keep train.max_grad_norm > 0 or train in fp32; the last complete checkpoint is kept"
            )
        return True

    def update(
        self,
        step: int,
        loss: float,
        grad_norm: torch.Tensor | float | None,
        optimizer: torch.optim.Optimizer,
        lr_sched: Any,
        params: Iterable[torch.Tensor],
        scaled: bool,
        main: bool,
    ) -> bool:
        """One optimizer update under the guard (both training loops call this); True: skipped.

        ``scaled`` (fp16): the GradScaler skips an overflowing step itself and must see every step
        to back off, so its overflows are not bad steps and the optimizer always steps (DeepSpeed
        steps inside backward and reports no norm). The LR schedule follows the step count."""
        norm = 0.0 if grad_norm is None or scaled else float(grad_norm)
        bad = self.skip(step, loss, norm)  # the same verdict on every rank: reduced loss, all-reduced norm
        if not bad or scaled:
            optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        if bad:
            if main:
                print(
                    f"warning: step {step}: loss or gradients not finite; step skipped ({self.total} so far)"
                )
        else:
            self.check_weights(step, params, lr_sched.get_last_lr()[0])
        return bad

    @staticmethod
    def check_weights(step: int, params: Iterable[torch.Tensor], lr: float) -> None:
        params = list(params)
        # one device sync per step (a count per tensor would sync once per tensor)
        if not params or bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()):
            return
        bad = count_non_finite(params)
        if bad:
            raise NumericError(
                f"step {step}: the update made {bad} trainable weights non-finite (lr {lr:g}); lower "
                "train.lr (or set train.max_grad_norm > 0); nothing of this step was saved or exported"
            )
