"""Which pairs each process sees at each step, reproducibly and independently of how the global
batch is split.

The run is one stream of positions ``p = 0, 1, 2, ...``; position ``p`` is pair
``perm_e[p % n]`` with ``e = p // n`` and ``perm_e`` a permutation seeded by ``(seed, e)``.
Optimizer step ``s`` consumes positions ``[s*G, (s+1)*G)`` with ``G = batch * accum * world``.
Each position also gets its own seed (for augmentation, noise and timestep), so the same pair
gets the same noise whether it is trained at batch 4 x accum 1, batch 1 x accum 4, on one process
or on two, and a resumed run replays exactly what an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .pairs import sample_seed


class StepPlan:
    def __init__(
        self, n: int, seed: int, batch_size: int, grad_accum: int, world_size: int = 1, shuffle: bool = True
    ) -> None:
        self.n, self.seed, self.B, self.A, self.W, self.shuffle = (
            n,
            seed,
            batch_size,
            grad_accum,
            world_size,
            shuffle,
        )
        self.global_batch = batch_size * grad_accum * world_size
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def index(self, position: int) -> int:
        epoch = position // self.n
        if not self.shuffle:
            return position % self.n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, domain=1))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        assert self._perm is not None
        return int(self._perm[position % self.n])

    def positions(self, step: int, micro: int, rank: int) -> range:
        start = step * self.global_batch + (micro * self.W + rank) * self.B
        return range(start, start + self.B)

    def keys(self, step: int, micro: int, rank: int) -> list[tuple[int, int]]:
        """``(pair index, per-sample seed)`` for one micro-batch of one process."""
        return [(self.index(p), sample_seed(self.seed, p)) for p in self.positions(step, micro, rank)]

    def batches(self, start_step: int, max_steps: int, rank: int) -> Iterator[list[tuple[int, int]]]:
        """Batch sampler for a DataLoader: this rank's micro-batches from ``start_step`` on."""
        for step in range(start_step, max_steps):
            for micro in range(self.A):
                yield self.keys(step, micro, rank)
