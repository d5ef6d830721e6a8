"""The training loop: one function, read top to bottom. Accelerate does devices, precision and sync."""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import datasets
import torch
from accelerate import Accelerator

from sftlab.config import SFTConfig
from sftlab.data.batching import best_fit_decreasing, collate, collate_flat
from sftlab.data.render import IGNORE_INDEX
from sftlab.model.attention import use_flat_batches
from sftlab.errors import SftlabError
from sftlab.train.checkpoint import TrainState, list_checkpoints
from sftlab.train.flops import FlopCounter
from sftlab.train.metrics import peak_memory_gb
from sftlab.train.zero import engine_of

log = logging.getLogger(__name__)

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
def evaluate(accelerator: Accelerator, module: torch.nn.Module, ds: datasets.Dataset, batch_size: int, pad_id: int,
             flat: bool = False) -> dict[str, float]:
    """eval_loss (mean token loss), eval_token_accuracy and eval_entropy over ``ds`` (each rank takes
    every world_size-th batch; sums reduced across ranks)."""
    module = accelerator.unwrap_model(module)  # no DDP hooks (FSDP's stay: they gather each layer's weights)
    was_training = module.training
    module.eval()
    chunks = [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size)]
    # Every rank runs the same number of batches (FSDP's gathers are collective): a rank out of batches
    # repeats the first one, counted zero.
    world, rank = accelerator.num_processes, accelerator.process_index
    rounds = math.ceil(len(chunks) / world)
    mine = [(chunks[k], 1.0) if k < len(chunks) else (chunks[0], 0.0) for k in range(rank, rounds * world, world)]
    total = torch.zeros(4, device=accelerator.device, dtype=torch.float64)  # loss, tokens, correct, entropy
    for batch, (_, weight) in zip(_batches(ds, [c for c, _ in mine], pad_id, accelerator.device, flat), mine):
        loss_sum, n, stats = module(**batch)
        total += torch.cat([torch.stack([loss_sum.double(), n.double()]), stats.double()]) * weight
    loss, n, correct, entropy = accelerator.reduce(total, "sum").tolist()
    module.train(was_training)
    n = max(n, 1)
    return {"eval_loss": loss / n, "eval_token_accuracy": correct / n, "eval_entropy": entropy / n}


class StepSums(NamedTuple):
    """What one optimizer step trained on, summed over its micro-batches and every rank."""

    loss: float  # token losses
    trained: int  # tokens with a label
    inputs: int  # real input tokens
    correct: float  # trained tokens whose argmax prediction is the label
    entropy: float  # entropy of the predictions at trained tokens


def accumulate_gradients(accelerator: Accelerator, module: torch.nn.Module, batches: list[dict], real: int | None = None) -> StepSums:
    """Forward/backward the micro-batches of one optimizer step; gradients end up as
    d(sum of token losses of the step, all ranks) / d(params) ÷ (trained tokens of the step, all ranks).

    ``real``: only the first ``real`` batches are this rank's (default: all); the others are borrowed
    batches whose loss counts zero, run only so that this rank joins the collectives of the step
    (DDP's all-reduce; DeepSpeed's reduction and gathers in every micro-batch) at the end of an epoch.
    """
    real = len(batches) if real is None else real
    engine = engine_of(module)
    mine = batches[:real]
    local = [sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in mine), sum(sum(_sample_lengths(b)) for b in mine)]
    n_step, n_inputs = accelerator.reduce(torch.tensor(local, device=accelerator.device, dtype=torch.float64), "sum").tolist()
    sums = torch.zeros(3, device=accelerator.device)  # loss, correct, entropy
    for k, batch in enumerate(batches):
        weight = 1.0 if k < real else 0.0
        last = k == len(batches) - 1
        if engine is not None:  # the engine reduces at the boundary it is told; no_sync is not its way
            engine.set_gradient_accumulation_boundary(last)
        with nullcontext() if last or engine is not None else accelerator.no_sync(module):
            loss_sum, _, stats = module(**batch)
            # DDP and ZeRO average gradients over ranks; × world size makes the result the global token mean.
            scaled = loss_sum * (weight * accelerator.num_processes / max(n_step, 1))
            if engine is not None:
                engine.backward(scaled, scale_wrt_gas=False)  # the division by the step's tokens is already done
            else:
                accelerator.backward(scaled)
        sums += torch.cat([loss_sum.detach()[None], stats.float()]) * weight
    loss, correct, entropy = accelerator.reduce(sums, "sum").tolist()
    return StepSums(loss, int(n_step), int(n_inputs), correct, entropy)


class NonFiniteLoss(SftlabError):
    """A step's loss or gradient norm was NaN/inf (nan_policy: stop, or too many skipped steps in a row)."""


MAX_SKIPPED_IN_A_ROW = 10  # nan_policy skip_step: this many non-finite steps in a row means the run is broken: stop


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
    on_save: Callable[[TrainState], Path],
    on_step: Callable[[TrainState], bool],
    flops: FlopCounter | None = None,
    peak_flops: float | None = None,
) -> TrainState:
    """Train from ``state.step`` to the configured number of optimizer steps.

    Loss of one step = sum of token losses over all its micro-batches (and ranks) ÷ the trained
    tokens of the step, so gradients do not depend on how the step is split into micro-batches.
    Calls ``on_log`` with a metrics record every logging/eval step, ``on_step`` after every step
    (True means stop: save and return early), ``on_save`` every save_steps, on stopping and — with
    load_best_model_at_end — at each new best eval_loss. Speeds count only the time of training
    steps (not evaluation, logging or saving); with ``flops`` and ``peak_flops`` the records carry
    MFU. The last record also has ``train_runtime`` (seconds) and ``trained_tokens`` of this run.

    A step whose loss or gradient norm is not finite is never applied: with nan_policy stop, the
    state before it is checkpointed (when its weights are finite) and NonFiniteLoss is raised; with
    skip_step the step is dropped and training goes on. Early stopping (early_stopping_patience)
    returns with ``state.early_stopped`` set.
    """
    total_steps = schedule.total_steps(cfg)
    flat = use_flat_batches(cfg.packing, cfg.padding_free, cfg.group_by_length, accelerator.device)
    params = [p for p in module.parameters() if p.requires_grad]
    engine = engine_of(module)
    # fp16's loss scaler meets inf gradients by design (it skips those steps and lowers the scale)
    scaled = cfg.fp16  # (under DeepSpeed too, whose engine scales the loss itself)
    window = dict.fromkeys(("loss", "trained", "inputs", "correct", "entropy", "time", "flops", "skipped"), 0.0)
    run_time, run_trained, skipped_in_a_row = 0.0, 0, 0
    module.train()

    for step in range(state.step, total_steps):
        start = time.perf_counter()
        mine = schedule.micro_batches(step, accelerator.process_index)
        # a rank short of micro-batches borrows one, counted zero: DDP needs one backward per rank, DeepSpeed as many as the others
        runs = max(len(schedule.micro_batches(step, r)) for r in range(accelerator.num_processes)) if engine else max(len(mine), 1)
        borrowed = (mine or schedule.micro_batches(step, 0))[:1] * (runs - len(mine))
        batches = list(_batches(train_ds, mine + borrowed, pad_id, accelerator.device, flat))
        sums = accumulate_gradients(accelerator, module, batches, len(mine))
        if engine is not None:
            # DeepSpeed clips (gradient_clipping), applies the update and zeroes the gradients in one call,
            # and skips the update when the gradient is not finite
            engine.step()
            norm = engine.get_global_grad_norm()
        elif cfg.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        grad_norm = float("nan") if norm is None else float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: sharded
        lr = scheduler.get_last_lr()[0]
        loss = sums.loss / max(sums.trained, 1)
        if not math.isfinite(loss) or not (math.isfinite(grad_norm) or scaled):
            optimizer.zero_grad(set_to_none=True)
            on_log({"step": step + 1, "epoch": round((step + 1) / schedule.steps_per_epoch, 4), "loss": loss,
                    "grad_norm": grad_norm, "lr": lr})
            what = f"step {step + 1}: the loss is {loss:.4g} and the gradient norm {grad_norm:.4g}"
            skipped_in_a_row += 1
            if cfg.nan_policy == "stop" or skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise NonFiniteLoss(_non_finite_message(what, cfg, state, params, accelerator, on_save, skipped_in_a_row))
            log.warning("%s; its update is skipped (nan_policy: skip_step)", what)
            scheduler.step()  # the schedule stays tied to the step number (and resuming stays exact)
            state.step = step + 1
            state.epoch = state.step / schedule.steps_per_epoch
            state.skipped_steps += 1
            window["skipped"] += 1
            stop = on_step(state)
            if state.step % cfg.save_steps == 0 or stop:
                on_save(state)
            if stop:
                break
            continue
        skipped_in_a_row = 0
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_time = time.perf_counter() - start

        state.step = step + 1
        state.epoch = state.step / schedule.steps_per_epoch
        state.tokens += sums.inputs
        run_time += step_time
        run_trained += sums.trained
        for key in ("loss", "trained", "inputs", "correct", "entropy"):
            window[key] += getattr(sums, key)
        window["time"] += step_time
        if flops is not None:  # this rank's samples × ranks (the head term is exact: linear in trained tokens)
            lens = [n for b in batches[: len(mine)] for n in _sample_lengths(b)]
            window["flops"] += flops.step_flops(lens, sums.trained / accelerator.num_processes) * accelerator.num_processes

        record: dict = {}
        last = state.step == total_steps
        if state.step % cfg.logging_steps == 0 or last:
            elapsed = max(window["time"], 1e-9)
            trained = max(window["trained"], 1)
            record.update(loss=window["loss"] / trained, token_accuracy=window["correct"] / trained,
                          entropy=window["entropy"] / trained, lr=lr, grad_norm=grad_norm,
                          tokens=state.tokens, tokens_per_s=window["inputs"] / elapsed,
                          trained_tokens_per_s=window["trained"] / elapsed, peak_memory_gb=peak_memory_gb(accelerator.device))
            if peak_flops:
                record["mfu"] = window["flops"] / elapsed / (peak_flops * accelerator.num_processes)
            if window["skipped"]:
                record["skipped_steps"] = int(window["skipped"])
            window = dict.fromkeys(window, 0.0)
        saved = False
        if eval_ds is not None and ((cfg.eval_steps and state.step % cfg.eval_steps == 0) or last):
            metrics = evaluate(accelerator, module, eval_ds, cfg.per_device_eval_batch_size, pad_id, flat)
            record.update(metrics)
            if _track_best(cfg, state, metrics["eval_loss"]) and cfg.load_best_model_at_end and not last:
                on_save(state)
                saved = True
            if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience and not last:
                state.early_stopped = True
                log.info("early stopping at step %d: eval_loss has not improved for %d evaluations (best %.4f at step %d)",
                         state.step, state.evals_without_improvement, state.best_eval_loss, state.best_step)
        if last or state.early_stopped:
            record.update(train_runtime=run_time, trained_tokens=run_trained)
            if state.best_step:
                record.update(best_step=state.best_step, best_eval_loss=state.best_eval_loss)
            if state.early_stopped:
                record["early_stopped"] = True
        if record:
            on_log({"step": state.step, "epoch": round(state.epoch, 4), **record})
        stop = on_step(state)
        if ((state.step % cfg.save_steps == 0 and not last) or stop) and not saved:
            on_save(state)
        if stop or state.early_stopped:
            break
    return state


def _track_best(cfg: SFTConfig, state: TrainState, eval_loss: float) -> bool:
    """Record an evaluation in ``state``; True when it is the best so far (a strictly lower eval_loss).

    The patience count restarts only on an improvement larger than early_stopping_threshold.
    """
    previous = state.best_eval_loss
    state.eval_loss = eval_loss
    if previous is None or eval_loss < previous - cfg.early_stopping_threshold:
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    if previous is None or eval_loss < previous:
        state.best_eval_loss, state.best_step = eval_loss, state.step
        return True
    return False


def _non_finite_message(what: str, cfg: SFTConfig, state: TrainState, params: list[torch.Tensor], accelerator: Accelerator,
                        on_save: Callable[[TrainState], Path], skipped: int) -> str:
    """Checkpoint the last good state (the weights before the bad step, when finite) and say what to do."""
    from sftlab.train.sharding import finite

    local_ok = torch.tensor(float(finite(params)), device=accelerator.device)  # FSDP: each rank checks its shard
    weights_ok = bool(accelerator.reduce(local_ok, "sum").item() == accelerator.num_processes)
    if state.step and weights_ok:
        kept = f"the last good state is saved as {on_save(state)}"
    else:
        earlier = list_checkpoints(Path(cfg.output_dir))
        kept = (f"the weights are already broken, so nothing new was saved; the latest checkpoint is {earlier[-1]}" if earlier and state.step
                else "no checkpoint was saved" if not weights_ok else "no step had been trained, so there is nothing to keep")
    why = f"{skipped} steps in a row were not finite, " if skipped > 1 else ""
    return (f"{what}; {why}training stopped before applying it and {kept}. Lower learning_rate (now {cfg.learning_rate:g}), "
            f"keep max_grad_norm at 1.0, prefer bf16 to fp16, check the data (sftlab data check); "
            f"nan_policy: skip_step drops such steps instead")
