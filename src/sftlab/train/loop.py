"""The training loop: one function, read top to bottom. Accelerate does devices, precision and sync."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import datasets
import torch
from accelerate import Accelerator

from sftlab.config import SFTConfig
from sftlab.data.batching import best_fit_decreasing, collate, collate_flat
from sftlab.data.render import IGNORE_INDEX
from sftlab.model.attention import use_flat_batches
from sftlab.train.checkpoint import TrainState
from sftlab.train.flops import FlopCounter
from sftlab.train.metrics import peak_memory_gb


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


def _sample_lengths(batch: dict) -> list[int]:
    """Real tokens of each sample in a padded or flat batch."""
    if "cu_seq_lens" in batch:
        return batch["cu_seq_lens"].diff().tolist()
    return batch["attention_mask"].sum(1).tolist()


def _batches(ds: datasets.Dataset, index_lists: list[list[int]], pad_id: int, device: torch.device, flat: bool) -> Iterator[dict]:
    for idx in index_lists:
        rows = ds[idx]
        batch = collate_flat(rows) if flat else collate(rows, pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(accelerator: Accelerator, module: torch.nn.Module, ds: datasets.Dataset, batch_size: int, pad_id: int, flat: bool = False) -> float:
    """Mean token loss over ``ds`` (each rank takes every world_size-th batch; sums reduced across ranks)."""
    was_training = module.training
    module.eval()
    chunks = [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size)]
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in _batches(ds, chunks[accelerator.process_index :: accelerator.num_processes], pad_id, accelerator.device, flat):
        loss_sum, n = module(**batch)
        total += torch.stack([loss_sum.double(), n.double()])
    total = accelerator.reduce(total, "sum")
    module.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def accumulate_gradients(accelerator: Accelerator, module: torch.nn.Module, batches: list[dict]) -> tuple[float, int, int]:
    """Forward/backward the micro-batches of one optimizer step; gradients end up as
    d(sum of token losses of the step, all ranks) / d(params) ÷ (trained tokens of the step, all ranks).

    Returns (summed token loss, trained tokens, input tokens), all over every rank.
    """
    local = [sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches), sum(sum(_sample_lengths(b)) for b in batches)]
    n_step, n_inputs = accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum").tolist()
    step_loss = torch.zeros((), device=accelerator.device)
    for k, batch in enumerate(batches):
        with nullcontext() if k == len(batches) - 1 else accelerator.no_sync(module):
            loss_sum, _ = module(**batch)
            # DDP averages gradients over ranks; × world size makes the result the global token mean.
            accelerator.backward(loss_sum * accelerator.num_processes / max(n_step, 1))
        step_loss += loss_sum.detach()
    return accelerator.reduce(step_loss, "sum").item(), int(n_step), int(n_inputs)


def fit(
    cfg: SFTConfig,
    accelerator: Accelerator,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_ds: datasets.Dataset,
    eval_ds: datasets.Dataset | None,
    schedule: Schedule,
    state: TrainState,
    pad_id: int,
    on_log: Callable[[dict], None],
    on_save: Callable[[TrainState], None],
    on_step: Callable[[TrainState], bool],
    flops: FlopCounter | None = None,
    peak_flops: float | None = None,
) -> TrainState:
    """Train from ``state.step`` to the configured number of optimizer steps.

    Loss of one step = sum of token losses over all its micro-batches (and ranks) ÷ the trained
    tokens of the step, so gradients do not depend on how the step is split into micro-batches.
    Calls ``on_log`` with a metrics record every logging/eval step, ``on_step`` after every step
    (True means stop: save and return early), ``on_save`` every save_steps and on stopping.
    Speeds count only the time of training steps (not evaluation, logging or saving); with
    ``flops`` and ``peak_flops`` the records carry MFU. The last record also has ``train_runtime``
    (seconds) and ``trained_tokens`` of this run.
    """
    total_steps = schedule.total_steps(cfg)
    flat = use_flat_batches(cfg.packing, cfg.padding_free, cfg.group_by_length, accelerator.device)
    params = [p for p in module.parameters() if p.requires_grad]
    window = {"loss": 0.0, "trained": 0, "inputs": 0, "time": 0.0, "flops": 0.0}
    run_time, run_trained = 0.0, 0
    module.train()

    for step in range(state.step, total_steps):
        start = time.perf_counter()
        batches = list(_batches(train_ds, schedule.micro_batches(step, accelerator.process_index), pad_id, accelerator.device, flat))
        step_loss, n_step, n_inputs = accumulate_gradients(accelerator, module, batches)
        if cfg.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_time = time.perf_counter() - start

        state.step = step + 1
        state.epoch = state.step / schedule.steps_per_epoch
        state.tokens += int(n_inputs)
        run_time += step_time
        run_trained += n_step
        window["loss"] += step_loss
        window["trained"] += n_step
        window["inputs"] += n_inputs
        window["time"] += step_time
        if flops is not None:  # this rank's samples × ranks (the head term is exact: linear in n_step)
            lens = [n for b in batches for n in _sample_lengths(b)]
            window["flops"] += flops.step_flops(lens, n_step / accelerator.num_processes) * accelerator.num_processes

        record: dict = {}
        last = state.step == total_steps
        if state.step % cfg.logging_steps == 0 or last:
            elapsed = max(window["time"], 1e-9)
            record.update(loss=window["loss"] / max(window["trained"], 1), lr=lr, grad_norm=float(grad_norm),
                          tokens=state.tokens, tokens_per_s=window["inputs"] / elapsed,
                          trained_tokens_per_s=window["trained"] / elapsed, peak_memory_gb=peak_memory_gb(accelerator.device))
            if peak_flops:
                record["mfu"] = window["flops"] / elapsed / (peak_flops * accelerator.num_processes)
            window = dict.fromkeys(window, 0.0)
        if last:
            record.update(train_runtime=run_time, trained_tokens=run_trained)
        if eval_ds is not None and ((cfg.eval_steps and state.step % cfg.eval_steps == 0) or last):
            state.eval_loss = evaluate(accelerator, module, eval_ds, cfg.per_device_eval_batch_size, pad_id, flat)
            record["eval_loss"] = state.eval_loss
        if record:
            on_log({"step": state.step, "epoch": round(state.epoch, 4), **record})
        stop = on_step(state)
        if (state.step % cfg.save_steps == 0 and not last) or stop:
            on_save(state)
        if stop:
            break
    return state
