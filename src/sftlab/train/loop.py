"""The training loop: one function, read top to bottom. The backend (``train/backend.py``) does what depends on
how the model is spread over processes; accelerate does devices and precision."""

from __future__ import annotations

import logging
import math
import time
from typing import NamedTuple

import datasets
import torch

from sftlab.config import SFTConfig
from sftlab.data.batching import collate, collate_flat
from sftlab.data.pipeline import Data
from sftlab.data.render import IGNORE_INDEX
from sftlab.data.schedule import Schedule
from sftlab.errors import SftlabError
from sftlab.model.device import peak_memory_gb
from sftlab.train.backend import Backend
from sftlab.train.checkpoint import Checkpointer, TrainState, list_checkpoints
from sftlab.train.monitor import Monitor
from sftlab.train.optim import neftune

log = logging.getLogger(__name__)

MAX_SKIPPED_IN_A_ROW = 10  # nan_policy skip_step: this many non-finite steps in a row means the run is broken: stop


class NonFiniteLoss(SftlabError):
    """A step's loss or gradient norm was NaN/inf (nan_policy: stop, or too many skipped steps in a row)."""


def fit(cfg: SFTConfig, backend: Backend, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, data: Data,
        schedule: Schedule, state: TrainState, checkpoints: Checkpointer, monitor: Monitor) -> TrainState:
    """Train from ``state.step`` to the configured number of optimizer steps.

    Loss of one step = sum of token losses over all its micro-batches (and ranks) ÷ the trained tokens of the step,
    so gradients do not depend on how the step is split into micro-batches. Every logging/eval step gives
    ``monitor`` a metrics record (the last one also ``train_runtime`` and ``trained_tokens`` of this run); a
    checkpoint is written as ``_should_save`` says; ``monitor.should_stop`` after every step may end the run early.

    A step whose loss or gradient norm is not finite is never applied: with nan_policy stop, the state before it
    is checkpointed (when its weights are finite) and NonFiniteLoss is raised; with skip_step the step is dropped
    and training goes on. Early stopping (early_stopping_patience) returns with ``state.early_stopped`` set.
    With neftune_noise_alpha, NEFTune noises the input embeddings in these training steps only.
    """
    with neftune(backend.unwrap(module).model, cfg.neftune_noise_alpha):
        return _train_steps(cfg, backend, module, optimizer, scheduler, data, schedule, state, checkpoints, monitor)


def _train_steps(cfg: SFTConfig, backend: Backend, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, data: Data,
                 schedule: Schedule, state: TrainState, checkpoints: Checkpointer, monitor: Monitor) -> TrainState:
    """The steps of ``fit``."""
    total_steps = schedule.total_steps(cfg)
    skipped_in_a_row = 0
    module.train()
    for step in range(state.step, total_steps):
        start = time.perf_counter()
        indices, n_own = schedule.rank_batches(step, backend.rank, backend.lockstep_micro_batches)
        batches = [collated(data.train, idx, data.pad_id, backend.device, cfg.padding_free) for idx in indices]
        sums = accumulate_gradients(backend, module, batches, n_own)
        grad_norm = backend.clip_gradients(module, cfg.max_grad_norm)
        loss, lr = sums.loss / max(sums.trained, 1), scheduler.get_last_lr()[0]
        # fp16's loss scaler meets inf gradients by design: it skips those updates itself and lowers the scale
        applied = math.isfinite(loss) and (math.isfinite(grad_norm) or cfg.fp16)
        backend.optimizer_step(optimizer, applied)
        if applied:
            skipped_in_a_row = 0
        else:  # raises unless nan_policy skip_step
            skipped_in_a_row += 1
            bad = {"step": step + 1, "epoch": round((step + 1) / schedule.steps_per_epoch, 4), "loss": loss, "grad_norm": grad_norm, "lr": lr}
            _refuse_non_finite(cfg, backend, module, state, bad, skipped_in_a_row, checkpoints, monitor)
        scheduler.step()  # after a skipped step too: the schedule stays tied to the step number (and resuming stays exact)
        state.step, state.epoch = step + 1, (step + 1) / schedule.steps_per_epoch
        last = state.step == total_steps

        if applied:
            state.tokens += sums.inputs
            lengths = [n for b in batches[:n_own] for n in sample_lengths(b)]
            monitor.meter.add(sums, time.perf_counter() - start, lengths)
            logged = state.step % cfg.logging_steps == 0 or last
            record = monitor.meter.record(lr, grad_norm, state.tokens, peak_memory_gb(backend.device)) if logged else {}
        else:  # its own record; the steps around it are logged as usual
            state.skipped_steps += 1
            monitor.meter.skip()
            record = {k: bad[k] for k in ("loss", "grad_norm", "lr")}
        new_best = False
        if data.eval is not None and ((cfg.eval_steps and state.step % cfg.eval_steps == 0) or last):
            record.update(evaluate(backend, module, data.eval, cfg.per_device_eval_batch_size, data.pad_id, cfg.padding_free))
            new_best = _track_best(cfg, state, record["eval_loss"], last)
        if last or state.early_stopped:
            record.update(monitor.meter.totals())
            if state.best_step:
                record.update(best_step=state.best_step, best_eval_loss=state.best_eval_loss)
            if state.early_stopped:
                record["early_stopped"] = True
        if record:
            monitor.log({"step": state.step, "epoch": round(state.epoch, 4), **record})
        stop = monitor.should_stop(state.step)
        if _should_save(cfg, state, last, stop, new_best):
            checkpoints.save(state)
        if stop or state.early_stopped:
            break
    return state


def _should_save(cfg: SFTConfig, state: TrainState, last: bool, stop: bool, new_best: bool) -> bool:
    """Whether this step writes a checkpoint: every save_steps, when stopping, and at each new best eval_loss with
    load_best_model_at_end. The last step's checkpoint is written after training, with the final model."""
    if stop:
        return True
    return not last and (state.step % cfg.save_steps == 0 or (new_best and cfg.load_best_model_at_end))


def _track_best(cfg: SFTConfig, state: TrainState, eval_loss: float, last: bool) -> bool:
    """Record an evaluation in ``state``; True when it is the best so far (a strictly lower eval_loss). Sets
    ``state.early_stopped`` when eval_loss has not improved by more than early_stopping_threshold for
    early_stopping_patience evaluations (before the last step)."""
    previous = state.best_eval_loss
    state.eval_loss = eval_loss
    if previous is None or eval_loss < previous - cfg.early_stopping_threshold:
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    best = previous is None or eval_loss < previous
    if best:
        state.best_eval_loss, state.best_step = eval_loss, state.step
    if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience and not last:
        state.early_stopped = True
        log.info("early stopping at step %d: eval_loss has not improved for %d evaluations (best %.4f at step %d)",
                 state.step, state.evals_without_improvement, state.best_eval_loss, state.best_step)
    return best


def _refuse_non_finite(cfg: SFTConfig, backend: Backend, module: torch.nn.Module, state: TrainState, bad: dict, skipped: int,
                       checkpoints: Checkpointer, monitor: Monitor) -> None:
    """A step was not finite (``bad``: its record) and is not applied. nan_policy skip_step: say so and go on; stop (or
    too many in a row): log it, checkpoint the last good state (the weights before it, when finite) and raise
    NonFiniteLoss saying what to do."""
    what = f"step {bad['step']}: the loss is {bad['loss']:.4g} and the gradient norm {bad['grad_norm']:.4g}"
    if cfg.nan_policy == "skip_step" and skipped < MAX_SKIPPED_IN_A_ROW:
        log.warning("%s; its update is skipped (nan_policy: skip_step)", what)
        return
    monitor.log(bad)
    params = [p for p in module.parameters() if p.requires_grad]
    weights_ok = not backend.any_rank(not all_finite(params))  # sharded weights: each rank checks its part
    if state.step and weights_ok:
        kept = f"the last good state is saved as {checkpoints.save(state)}"
    else:
        earlier = list_checkpoints(checkpoints.output_dir)
        kept = (f"the weights are already broken, so nothing new was saved; the latest checkpoint is {earlier[-1]}" if earlier and state.step
                else "no checkpoint was saved" if not weights_ok else "no step had been trained, so there is nothing to keep")
    why = f"{skipped} steps in a row were not finite, " if skipped > 1 else ""
    raise NonFiniteLoss(f"{what}; {why}training stopped before applying it and {kept}. Lower learning_rate (now {cfg.learning_rate:g}), "
                        f"keep max_grad_norm at 1.0, prefer bf16 to fp16, check the data (sftlab data check); "
                        f"nan_policy: skip_step drops such steps instead")


class StepSums(NamedTuple):
    """What one optimizer step trained on, summed over its micro-batches and every rank."""

    loss: float  # token losses
    trained: int  # tokens with a label
    inputs: int  # real input tokens
    correct: float  # trained tokens whose argmax prediction is the label
    entropy: float  # entropy of the predictions at trained tokens


def accumulate_gradients(backend: Backend, module: torch.nn.Module, batches: list[dict], n_own: int | None = None) -> StepSums:
    """Forward/backward the micro-batches of one optimizer step; gradients end up as
    d(sum of token losses of the step, all ranks) / d(params) ÷ (trained tokens of the step, all ranks).

    ``n_own``: only the first ``n_own`` batches are this rank's (default: all); the others are borrowed
    batches whose loss counts zero, run only so that this rank joins the collectives of the step
    (``Schedule.rank_batches``).
    """
    n_own = len(batches) if n_own is None else n_own
    own = batches[:n_own]
    local = [sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in own), sum(sum(sample_lengths(b)) for b in own)]
    n_step, n_inputs = backend.reduce_sum(torch.tensor(local, device=backend.device, dtype=torch.float64)).tolist()
    sums = torch.zeros(3, device=backend.device)  # loss, correct, entropy
    for k, batch in enumerate(batches):
        weight = 1.0 if k < n_own else 0.0
        with backend.micro_batch(module, last=k == len(batches) - 1):
            loss_sum, _, stats = module(**batch)
            # the ranks' gradients are averaged; × world size makes the result the global token mean
            backend.backward(module, loss_sum * (weight * backend.world_size / max(n_step, 1)))
        sums += torch.cat([loss_sum.detach()[None], stats.float()]) * weight
    loss, correct, entropy = backend.reduce_sum(sums).tolist()
    return StepSums(loss, int(n_step), int(n_inputs), correct, entropy)


@torch.no_grad()
def evaluate(backend: Backend, module: torch.nn.Module, ds: datasets.Dataset, batch_size: int, pad_id: int,
             flat: bool = False) -> dict[str, float]:
    """eval_loss (mean token loss), eval_token_accuracy and eval_entropy over ``ds`` (each rank takes
    every world_size-th batch; sums reduced across ranks)."""
    module = backend.unwrap(module)  # no DDP hooks (FSDP's stay: they gather each layer's weights)
    was_training = module.training
    module.eval()
    chunks = [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size)]
    # Every rank runs the same number of batches (sharded weights are gathered collectively): a rank out of
    # batches repeats the first one, counted zero.
    world, rank = backend.world_size, backend.rank
    rounds = math.ceil(len(chunks) / world)
    own = [(chunks[k], 1.0) if k < len(chunks) else (chunks[0], 0.0) for k in range(rank, rounds * world, world)]
    total = torch.zeros(4, device=backend.device, dtype=torch.float64)  # loss, tokens, correct, entropy
    for indices, weight in own:
        loss_sum, n, stats = module(**collated(ds, indices, pad_id, backend.device, flat))
        total += torch.cat([torch.stack([loss_sum.double(), n.double()]), stats.double()]) * weight
    loss, n, correct, entropy = backend.reduce_sum(total).tolist()
    module.train(was_training)
    n = max(n, 1)
    return {"eval_loss": loss / n, "eval_token_accuracy": correct / n, "eval_entropy": entropy / n}


def collated(ds: datasets.Dataset, indices: list[int], pad_id: int, device: torch.device, flat: bool) -> dict[str, torch.Tensor]:
    """Samples ``indices`` of ``ds`` as one micro-batch on ``device``: one flat row, or right-padded."""
    rows = ds[indices]
    batch = collate_flat(rows) if flat else collate(rows, pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def sample_lengths(batch: dict) -> list[int]:
    """Real tokens of each sample in a padded or flat batch."""
    if "cu_seq_lens" in batch:
        return batch["cu_seq_lens"].diff().tolist()
    return batch["attention_mask"].sum(1).tolist()


def all_finite(params: list[torch.Tensor]) -> bool:
    """Whether this rank's part of ``params`` holds only finite numbers."""
    with torch.no_grad():
        return all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params)
