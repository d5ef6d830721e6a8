"""How samples become optimizer steps: which sample indices each rank trains in each micro-batch of each step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sftlab.config import SFTConfig
from sftlab.data.batching import best_fit_decreasing

GROUP_WINDOW = 64  # micro-batches sorted together by group_by_length: bigger = less padding, less randomness


@dataclass(eq=False)
class Schedule:
    """How samples become optimizer steps. Deterministic in (seed, epoch), so a step number alone
    says which samples it trains on — which is what makes resuming exact.

    With ``lengths`` (group_by_length), each epoch's shuffled order is cut into windows of
    ``GROUP_WINDOW`` micro-batches, sorted by length inside each window, and the resulting
    micro-batches are shuffled: samples of similar length share a batch, so little is padded.
    With ``lengths`` and ``pack_len`` (packing), samples are packed into rows of at most
    ``pack_len`` tokens by best-fit decreasing, the rows are shuffled, and a micro-batch is
    ``batch_size`` rows (all their samples).
    """

    n_samples: int
    batch_size: int
    accumulation: int
    world_size: int
    seed: int
    lengths: list[int] | None = None
    pack_len: int | None = None
    _epoch_batches: tuple[int, list[list[int]]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.n_rows = len(best_fit_decreasing(self.lengths, self.pack_len)) if self.pack_len else self.n_samples

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_per_epoch / (self.accumulation * self.world_size))

    @property
    def packing_efficiency(self) -> float:
        """Real tokens ÷ token slots of the packed rows (1.0 when not packing)."""
        return sum(self.lengths) / (self.n_rows * self.pack_len) if self.pack_len else 1.0

    def total_steps(self, cfg: SFTConfig) -> int:
        return cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every micro-batch of ``epoch`` (sample indices), in training order; the last epoch's is kept."""
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n_samples, generator=g).tolist()
            bs = self.batch_size
            if self.pack_len:
                rows = best_fit_decreasing(self.lengths, self.pack_len, order)
                rows = [rows[k] for k in torch.randperm(len(rows), generator=g).tolist()]
                batches = [[i for row in rows[k : k + bs] for i in row] for k in range(0, len(rows), bs)]
            elif self.lengths is None:
                batches = [order[i : i + bs] for i in range(0, self.n_samples, bs)]
            else:
                window = bs * GROUP_WINDOW
                batches = []
                for i in range(0, self.n_samples, window):
                    part = sorted(order[i : i + window], key=lambda j: -self.lengths[j])
                    batches += [part[k : k + bs] for k in range(0, len(part), bs)]
                batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
            self._epoch_batches = (epoch, batches)
        return self._epoch_batches[1]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Sample indices of each micro-batch this rank runs in optimizer step ``step`` (0-based)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        batches = self.epoch_batches(epoch)
        per_step = self.accumulation * self.world_size
        first = pos * per_step
        group = range(first, min(first + per_step, self.micro_per_epoch))
        return [batches[m] for m in group if (m - first) % self.world_size == rank]

    def rank_batches(self, step: int, rank: int, lockstep: bool = False) -> tuple[list[list[int]], int]:
        """(the micro-batches rank ``rank`` runs in step ``step``, how many of them are its own).

        At the end of an epoch a rank may be short of micro-batches; it then runs borrowed ones (another rank's
        first), whose loss the loop counts zero, so that it still joins the step's collectives: DDP needs one
        backward per rank, and with ``lockstep`` (DeepSpeed) every rank runs as many as the busiest one.
        """
        mine = self.micro_batches(step, rank)
        runs = max(len(self.micro_batches(step, r)) for r in range(self.world_size)) if lockstep else max(len(mine), 1)
        borrowed = (mine or self.micro_batches(step, 0))[:1] * (runs - len(mine))
        return mine + borrowed, len(mine)
