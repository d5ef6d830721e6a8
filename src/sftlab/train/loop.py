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
from sftlab.data.render import IGNORE_INDEX
from sftlab.train.checkpoint import TrainState
from sftlab.train.metrics import peak_memory_gb


GROUP_WINDOW = 64  # micro-batches sorted together by group_by_length: bigger = less padding, less randomness


def collate(rows: dict[str, list[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids/attention_mask/labels, [batch, longest]; padding is never trained."""
    longest = max(len(ids) for ids in rows["input_ids"])
    ids = torch.full((len(rows["input_ids"]), longest), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"])):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass(eq=False)
class Schedule:
    """How samples become optimizer steps. Deterministic in (seed, epoch), so a step number alone
    says which samples it trains on — which is what makes resuming exact.

    With ``lengths`` (group_by_length), each epoch's shuffled order is cut into windows of
    ``GROUP_WINDOW`` micro-batches, sorted by length inside each window, and the resulting
    micro-batches are shuffled: samples of similar length share a batch, so little is padded.
    """

    n_samples: int
    batch_size: int
    accumulation: int
    world_size: int
    seed: int
    lengths: list[int] | None = None
    _epoch_batches: tuple[int, list[list[int]]] | None = field(default=None, repr=False)

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_per_epoch / (self.accumulation * self.world_size))

    def total_steps(self, cfg: SFTConfig) -> int:
        return cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every micro-batch of ``epoch`` (sample indices), in training order; the last epoch's is kept."""
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n_samples, generator=g).tolist()
            bs = self.batch_size
            if self.lengths is None:
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


def _batches(ds: datasets.Dataset, index_lists: list[list[int]], pad_id: int, device: torch.device) -> Iterator[dict]:
    for idx in index_lists:
        yield {k: v.to(device) for k, v in collate(ds[idx], pad_id).items()}


@torch.no_grad()
def evaluate(accelerator: Accelerator, module: torch.nn.Module, ds: datasets.Dataset, batch_size: int, pad_id: int) -> float:
    """Mean token loss over ``ds`` (each rank takes every world_size-th batch; sums reduced across ranks)."""
    was_training = module.training
    module.eval()
    chunks = [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size)]
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in _batches(ds, chunks[accelerator.process_index :: accelerator.num_processes], pad_id, accelerator.device):
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
    local = [sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches), sum(int(b["attention_mask"].sum()) for b in batches)]
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
) -> TrainState:
    """Train from ``state.step`` to the configured number of optimizer steps.

    Loss of one step = sum of token losses over all its micro-batches (and ranks) ÷ the trained
    tokens of the step, so gradients do not depend on how the step is split into micro-batches.
    Calls ``on_log`` with a metrics record every logging/eval step, ``on_step`` after every step
    (True means stop: save and return early), ``on_save`` every save_steps and on stopping.
    """
    total_steps = schedule.total_steps(cfg)
    params = [p for p in module.parameters() if p.requires_grad]
    window_loss = window_tokens = window_inputs = 0.0
    window_start = time.perf_counter()
    module.train()

    for step in range(state.step, total_steps):
        batches = list(_batches(train_ds, schedule.micro_batches(step, accelerator.process_index), pad_id, accelerator.device))
        step_loss, n_step, n_inputs = accumulate_gradients(accelerator, module, batches)
        if cfg.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state.step = step + 1
        state.epoch = state.step / schedule.steps_per_epoch
        state.tokens += int(n_inputs)
        window_loss += step_loss
        window_tokens += n_step
        window_inputs += n_inputs

        record: dict = {}
        last = state.step == total_steps
        if state.step % cfg.logging_steps == 0 or last:
            elapsed = time.perf_counter() - window_start
            record.update(loss=window_loss / max(window_tokens, 1), lr=lr, grad_norm=float(grad_norm),
                          tokens=state.tokens, tokens_per_s=window_inputs / max(elapsed, 1e-9),
                          trained_tokens_per_s=window_tokens / max(elapsed, 1e-9), peak_memory_gb=peak_memory_gb(accelerator.device))
            window_loss = window_tokens = window_inputs = 0.0
        if eval_ds is not None and ((cfg.eval_steps and state.step % cfg.eval_steps == 0) or last):
            state.eval_loss = evaluate(accelerator, module, eval_ds, cfg.per_device_eval_batch_size, pad_id)
            record["eval_loss"] = state.eval_loss
        if record:
            on_log({"step": state.step, "epoch": round(state.epoch, 4), **record})
            window_start = time.perf_counter()  # evaluation and logging time do not count as training speed
        stop = on_step(state)
        if (state.step % cfg.save_steps == 0 and not last) or stop:
            on_save(state)
        if stop:
            break
    return state
