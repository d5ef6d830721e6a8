"""``sftlab train``: config → data → model → fit → save → evaluate, as a visible chain of plain functions.

What depends on how the model is spread over processes (one, DDP, FSDP, DeepSpeed) is behind ``Backend``
(``train/backend.py``); this module picks it once (``make_backend``) and never asks again.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pyarrow.compute as pc
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from sftlab.config import SFTConfig, dump_config
from sftlab.data.pipeline import Data, build_data
from sftlab.data.schedule import Schedule
from sftlab.errors import SftlabError
from sftlab.evaluate.after_training import before_after, evaluate_split, write_report
from sftlab.evaluate.predict import predict_split, predict_untrained
from sftlab.evaluate.workflow import check_steps, will_train
from sftlab.files import fsync_tree
from sftlab.model.assets import resolve_model
from sftlab.model.attention import use_flat_batches
from sftlab.model.device import mixed_precision
from sftlab.model.flops import FlopCounter, peak_flops
from sftlab.model.load import load_model, load_tokenizer
from sftlab.report.metrics import StepMeter, require_reporter
from sftlab.train.backend import Backend
from sftlab.train.checkpoint import (Checkpointer, TrainState, check_data, data_fingerprint, find_checkpoint, load_checkpoint,
                                     saving, sweep_leftovers, weights_size, write_model_dir)
from sftlab.train.deepspeed import DeepSpeed
from sftlab.train.fsdp import FSDP
from sftlab.train.launch import WaitGroup, die_with_launcher
from sftlab.train.loop import fit
from sftlab.train.monitor import Monitor
from sftlab.train.optim import build_optimizer, build_scheduler
from sftlab.train.output_dir import RunLock, check_output_dir, clear_run, holds_result

log = logging.getLogger(__name__)


class Interrupted(SftlabError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    exit_code = 130


def prepare_output_dir(cfg: SFTConfig, resuming: bool, clean: bool = True, config: Path | None = None) -> RunLock:
    """``output_dir``, checked (``check_output_dir``) and created; refuses one that holds another run unless resuming or
    overwriting. ``clean``: this is the main process, which takes the lock (held until the returned RunLock is released)
    and removes every file of an overwritten run; the other processes only check. ``config``: the run's config file."""
    out = check_output_dir(cfg, config)
    lock = RunLock(out).acquire() if clean else RunLock(out)
    try:
        if not resuming and holds_result(out) and not cfg.overwrite_output_dir:
            raise SftlabError(f"output_dir {out} already holds a run; set resume_from_checkpoint: true to continue it or overwrite_output_dir: true to start over")
        if clean and cfg.overwrite_output_dir and not resuming:  # nothing of the previous run may pass for this one's
            clear_run(out)
    except BaseException:
        lock.release()
        raise
    return lock


def make_backend(cfg: SFTConfig, precision: str) -> Backend:
    """The backend the config asks for: FSDP (``fsdp: true``), DeepSpeed ZeRO (``deepspeed: ds.json``), else one
    process or DDP; with its Accelerator."""
    AcceleratorState._reset_state(reset_partial_state=False)  # each run sets its own precision; the process group is kept
    if not torch.cuda.is_available():  # DeepSpeed, when installed, is imported by accelerate in any run and would warn that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    kind = FSDP if cfg.fsdp else DeepSpeed if cfg.deepspeed else Backend
    return kind.for_run(cfg, precision)


def run_training(cfg: SFTConfig, config: Path | None = None) -> Path:
    """Train per ``cfg`` (read from the file ``config``, when given: output_dir may not hold it); returns the output
    directory holding the final model or adapter.

    Runs as one process or as each rank of a torchrun / accelerate launch: every rank trains its share of
    each step; the main process alone prepares the data first (the others then read its cache), writes
    files, logs and evaluates (with sharded weights, every rank evaluates with it).
    The main process holds output_dir's lock from before anything is written there to the end of the run.
    Raises SftlabError for bad input, Interrupted when stopped by a signal (after checkpointing).
    """
    die_with_launcher()  # a rank must not outlive a launcher killed with SIGKILL
    check_steps(cfg)  # the CLI checked already; callers of this function (tests, the web UI) get the same errors
    precision = mixed_precision(cfg)
    require_reporter(cfg.report_to)
    checkpoint = find_checkpoint(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # checked before the model is loaded
    backend = make_backend(cfg, precision)
    main = backend.is_main
    ranks = WaitGroup(backend.world_size)
    with ranks.first(main):
        lock = prepare_output_dir(cfg, resuming=checkpoint is not None, clean=main, config=config)
    with lock:  # released however the run ends
        return train_into(Path(cfg.output_dir), cfg, backend, ranks, checkpoint, precision)


def train_into(out: Path, cfg: SFTConfig, backend: Backend, ranks: WaitGroup, checkpoint: Path | None, precision: str) -> Path:
    """The run itself, once output_dir is prepared (and held): data, model, fit, save, evaluate; returns ``out``."""
    main = backend.is_main
    if main:
        sweep_leftovers(out)  # a killed run's temporary directories
    if not main:  # one copy of the log: the main process's
        logging.getLogger("sftlab").setLevel(logging.WARNING)
    # config.yaml records the batch layout this run used, not "auto", and whether it trained (a predict YAML that
    # leaves do_train out does not: then eval and chat load its adapter_name_or_path, not this output_dir)
    cfg = cfg.model_copy(update={"padding_free": use_flat_batches(cfg, backend.device.type), "do_train": will_train(cfg)})
    set_seed(cfg.seed)

    model_dir = resolve_model(cfg.model_name_or_path)
    tokenizer = load_tokenizer(cfg, model_dir)
    with ranks.first(backend.accelerator.is_local_main_process):  # tokenized once per node; the other ranks load the cache
        data = build_data(cfg, tokenizer)
    log.info(data.report.summary())
    for line in data.report.lines()[1:]:  # the problems, each with the first samples named
        log.info(line)
    if main:
        with saving("config.yaml", out):
            (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    if not cfg.do_train:  # data checked and reported; nothing to train, perhaps something to answer
        if cfg.do_predict:
            if main:  # an unsharded model loaded for inference: the other ranks only wait
                predict_untrained(cfg, data.eval_names, data.eval_refs, out, backend.device)
            ranks.wait()
        return out

    model = load_model(cfg, model_dir, backend.device)
    if checkpoint is not None:
        backend.load_weights(checkpoint, model)  # into the whole model, before it is wrapped or sharded
    module, optimizer = backend.prepare(model, lambda m: build_optimizer(cfg, m))
    schedule = build_schedule(cfg, data, backend.world_size)
    total = schedule.total_steps(cfg)
    scheduler = build_scheduler(cfg, optimizer, total)
    effective_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * backend.world_size
    state = TrainState(effective_batch=effective_batch, train_samples=len(data.train), data_fingerprint=data_fingerprint(data.train))
    if checkpoint is not None:
        state = resume(checkpoint, backend, module, optimizer, scheduler, state)
    log.info("%d train samples, %s eval samples; %d optimizer steps (%d per epoch), effective batch %d%s",
             len(data.train), len(data.eval) if data.eval is not None else 0, total, schedule.steps_per_epoch, effective_batch,
             f" ({backend.world_size} processes, {backend.accelerator.distributed_type.value})" if backend.world_size > 1 else "")
    if cfg.do_eval_baseline and checkpoint is None:
        evaluate_model(cfg, backend, module, tokenizer, data, baseline=True)
        ranks.wait()

    checkpoints = Checkpointer(out, backend, module, optimizer, scheduler, tokenizer, cfg)
    meter = StepMeter(FlopCounter.for_model(model), peak_flops(backend.device, precision != "no", cfg.peak_tflops), backend.world_size)
    with Monitor(backend, cfg, out, total, state.step, meter) as monitor:
        state = fit(cfg, backend, module, optimizer, scheduler, data, schedule, state, checkpoints, monitor)
    if monitor.stopped:
        raise Interrupted(f"stopped at step {state.step}; checkpoint saved in {out / f'checkpoint-{state.step}'} (resume with resume_from_checkpoint: true)")
    finish(cfg, backend, module, tokenizer, data, state, checkpoints)
    return out


def build_schedule(cfg: SFTConfig, data: Data, world_size: int) -> Schedule:
    """The run's Schedule; with group_by_length or packing it reads the samples' lengths (in Arrow, not Python rows)."""
    by_length = cfg.group_by_length or cfg.packing
    lengths = pc.list_value_length(data.train.with_format("arrow")["input_ids"]).to_pylist() if by_length else None
    schedule = Schedule(len(data.train), cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, world_size, cfg.seed,
                        lengths, cfg.cutoff_len if cfg.packing else None)
    if cfg.packing:
        log.info("packing: %d samples in %d rows of up to %d tokens, %.1f%% of the slots filled",
                 len(data.train), schedule.n_rows, cfg.cutoff_len, 100 * schedule.packing_efficiency)
    return schedule


def resume(checkpoint: Path, backend: Backend, module, optimizer, scheduler, fresh: TrainState) -> TrainState:
    """The optimizer, scheduler and RNG states of ``checkpoint`` loaded; its TrainState, told this run's batch and
    data (``fresh``: this run's TrainState at step 0)."""
    state = load_checkpoint(checkpoint, backend, module, optimizer, scheduler)
    log.info("resumed from %s at step %d", checkpoint, state.step)
    check_data(state, checkpoint, fresh.train_samples, fresh.data_fingerprint)
    state.train_samples, state.data_fingerprint = fresh.train_samples, fresh.data_fingerprint
    effective_batch = fresh.effective_batch
    if state.effective_batch and state.effective_batch != effective_batch:
        log.warning("the checkpoint was trained with an effective batch of %d and this run has %d (per-device batch × "
                    "accumulation × processes): the steps from %d on cover the data with the new batch, so samples of "
                    "this epoch may repeat or be left out; keep the product equal to resume exactly",
                    state.effective_batch, effective_batch, state.step)
        state.effective_batch = effective_batch
    return state


def evaluate_model(cfg: SFTConfig, backend: Backend, module, tokenizer, data: Data, baseline: bool) -> None:
    """The base (before training) or the trained model on the evaluation set, into eval_baseline/ or eval/: by the
    main process alone, or, when the weights are sharded, by every rank in step (the main process writes)."""
    if backend.is_main or backend.sharded_weights:
        with backend.unsharded(module):  # FSDP gathers the root's weights; ZeRO-3's hooks gather each module's
            evaluate_split(cfg, backend.unwrap(module).model, tokenizer, data.eval_names, data.eval_refs,
                           Path(cfg.output_dir) / ("eval_baseline" if baseline else "eval"), baseline=baseline, write=backend.is_main)


def predict_trained(cfg: SFTConfig, backend: Backend, module, tokenizer, data: Data) -> None:
    """do_predict after training: the trained model answers the evaluation set into output_dir (LLaMA-Factory's
    generated_predictions.jsonl and predict_results.json), as ``evaluate_model`` runs: by the main process alone, or,
    when the weights are sharded, by every rank in step (generate syncs the ranks under ZeRO-3 and FSDP; main writes)."""
    if backend.is_main or backend.sharded_weights:
        with backend.unsharded(module):
            predict_split(cfg, backend.unwrap(module).model, tokenizer, data.eval_names, data.eval_refs, Path(cfg.output_dir),
                          write=backend.is_main)


def finish(cfg: SFTConfig, backend: Backend, module, tokenizer, data: Data, state: TrainState, checkpoints: Checkpointer) -> None:
    """After the last step: the last checkpoint, the final model or adapter (the best one with
    load_best_model_at_end) in output_dir, its evaluation and the before → after comparison, its predictions
    (do_predict), the report."""
    out, main = Path(cfg.output_dir), backend.is_main
    what = "adapter" if cfg.finetuning_type == "lora" else "model"
    weights = backend.gathered_weights(module)  # once, for the last checkpoint and the final model
    checkpoints.save(state, weights)
    best = None  # load_best_model_at_end: every rank knows the best step (the eval loss is all-reduced)
    if cfg.load_best_model_at_end and state.best_step and state.best_step != state.step:
        best = out / f"checkpoint-{state.best_step}"
        if cfg.do_eval_baseline or cfg.do_predict:  # the evaluation and predictions below are of the best weights
            backend.load_full_weights(module, best)
        log.info("the final %s is the best one: eval_loss %.4f at step %d (checkpoint-%d), not the last step's %.4f",
                 what, state.best_eval_loss, state.best_step, state.best_step, state.eval_loss)
    if main:
        last = out / f"checkpoint-{state.step}"
        with saving(f"the final {what}", out, lambda: weights_size(best or last), out / ".final-staging"):
            publish_final(out, backend.unwrap(module).model, tokenizer, cfg, weights, weights_from=best)
        log.info("saved the final %s to %s", what, out)
    if cfg.do_eval_baseline:
        evaluate_model(cfg, backend, module, tokenizer, data, baseline=False)
    if cfg.do_predict:
        predict_trained(cfg, backend, module, tokenizer, data)
    if not main:
        return
    if cfg.do_eval_baseline:
        if (out / "eval_baseline" / "eval_results.json").is_file():  # a resumed run evaluated its base when it started
            before_after(out)
        else:
            log.warning("no eval_baseline in %s (the run was resumed without one): nothing to compare with", out)
    if cfg.plot_loss:
        write_report(out)


def publish_final(out: Path, model, tokenizer, cfg: SFTConfig, state_dict: dict | None = None, weights_from: Path | None = None) -> None:
    """Write the final model/adapter + tokenizer into ``out`` itself (where LLaMA-Factory users look).
    ``weights_from``: a checkpoint whose weight files are the result, copied as saved (load_best_model_at_end).

    Written completely to a temporary directory first; each file is then renamed into place.
    """
    staging = out / ".final-staging"
    write_model_dir(staging, model, tokenizer, cfg, state_dict=state_dict)
    if weights_from is not None:  # byte for byte (under DeepSpeed bf16 the model holds a 16-bit copy, the checkpoint fp32)
        for f in staging.glob("*.safetensors*"):
            f.unlink()
        for f in weights_from.glob("*.safetensors*"):
            shutil.copy2(f, staging / f.name)
        fsync_tree(staging)
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()
