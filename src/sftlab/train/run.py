"""``sftlab train``: config → data → model → fit → save, as a visible chain of plain functions."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import pyarrow.compute as pc
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, set_seed
from transformers import get_scheduler

from sftlab.config import SFTConfig, dump_config
from sftlab.data.pipeline import build_data
from sftlab.errors import SftlabError
from sftlab.files import fsync_tree
from sftlab.model.assets import resolve_model
from sftlab.model.attention import use_flat_batches
from sftlab.model.load import load_model, load_tokenizer
from sftlab.train.checkpoint import (ENGINE_DIR, SHARDED_DIR, TrainState, find_checkpoint, holds_weights, list_checkpoints,
                                     load_checkpoint, load_weights, save_checkpoint, write_model_dir)
from sftlab.train.flops import FlopCounter, peak_flops
from sftlab.train.launch import WaitGroup, launched
from sftlab.train.sharding import full_model_state, full_optimizer_state, load_full_weights, root_unsharded, save_sharded, shard
from sftlab.train.loop import Schedule, fit
from sftlab.train.loss import TokenLoss
from sftlab.train.metrics import MetricsWriter, require_reporter
from sftlab.train.progress import Progress
from sftlab.train import zero

log = logging.getLogger(__name__)


class Interrupted(SftlabError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    exit_code = 130


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 bf16 or AMX); elsewhere autocast would be slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def mixed_precision(cfg: SFTConfig) -> str:
    """'no', 'bf16' or 'fp16'; raises SftlabError where the hardware cannot do what the config asks."""
    cuda = torch.cuda.is_available()
    if cfg.fp16 and not cuda:
        raise SftlabError("fp16: true needs a CUDA GPU and none is visible; set fp16: false (or bf16: true on a CPU with AVX-512 bf16)")
    if cfg.bf16:
        if cuda and not torch.cuda.is_bf16_supported():
            raise SftlabError("bf16: true, but this GPU has no bfloat16; set bf16: false and fp16: true")
        if not cuda and not cpu_supports_bf16():
            raise SftlabError("bf16: true needs a GPU or a CPU with AVX-512 bf16 / AMX, and this machine has neither; set bf16: false (fp32)")
        return "bf16"
    return "fp16" if cfg.fp16 else "no"


def prepare_output_dir(cfg: SFTConfig, resuming: bool, clean: bool = True) -> Path:
    """``output_dir``, created; refuses one that holds another run unless resuming or overwriting.
    ``clean``: remove the checkpoints of an overwritten run (the main process does, the others only check)."""
    out = Path(cfg.output_dir)
    if out.exists() and not resuming:
        stale = list_checkpoints(out)
        trained = any((out / f).is_file() for f in ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json"))
        logged = (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0
        if (stale or trained or logged) and not cfg.overwrite_output_dir:
            raise SftlabError(f"output_dir {out} already holds a run; set resume_from_checkpoint: true to continue it or overwrite_output_dir: true to start over")
        for path in stale if clean else []:  # a later resume must never pick up the previous run's checkpoints
            shutil.rmtree(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_optimizer(cfg: SFTConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not biases or norm weights)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)


@contextmanager
def stop_on_signals() -> Iterator[list[bool]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (a second Ctrl-C kills at once)."""
    flag = [False]

    def handler(signum, frame):
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step…", file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_training(cfg: SFTConfig) -> Path:
    """Train per ``cfg``; returns the output directory holding the final model or adapter.

    Runs as one process or as each rank of a torchrun / accelerate launch (DDP): every rank trains
    its share of each step; the main process alone prepares the data first (the others then read
    its cache), writes files, logs and evaluates.
    Raises SftlabError for bad input, Interrupted when stopped by a signal (after checkpointing).
    """
    precision = mixed_precision(cfg)
    require_reporter(cfg.report_to)
    checkpoint = find_checkpoint(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # checked before the model is loaded
    ds = zero.check_deepspeed(cfg)
    if (ds is not None or cfg.fsdp) and "LOCAL_RANK" not in os.environ:
        raise SftlabError(f"{'deepspeed' if ds is not None else 'fsdp'}: runs as a torchrun launch, also on one process; start it with "
                          f"sftlab train CONFIG [--nproc N] (which launches itself), torchrun or accelerate launch")
    plugin = None
    if ds is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=zero.fill_deepspeed_config(
            ds, cfg.deepspeed, micro_batch=cfg.per_device_train_batch_size, accumulation=cfg.gradient_accumulation_steps,
            world_size=int(os.environ.get("WORLD_SIZE", "1")), max_grad_norm=cfg.max_grad_norm, precision=precision))
    # Each run sets its own precision; the process group (PartialState) is kept across runs.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Without a GPU, accelerate runs the ranks of a launch as MULTI_CPU (gloo) only when told cpu=True, which
    # turns DeepSpeed off: DeepSpeed on a CPU is told its backend instead.
    cpu = not torch.cuda.is_available()
    if cpu:  # DeepSpeed, when installed, is imported by accelerate in any run and would warn that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu and (launched() or cfg.fsdp) and plugin is None, deepspeed_plugin=plugin,
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu and plugin is not None else None)
    main = accelerator.is_main_process
    ranks = WaitGroup(accelerator.num_processes)
    with ranks.first(main):
        out = prepare_output_dir(cfg, resuming=checkpoint is not None, clean=main)
    if not main:  # one copy of the log: the main process's
        logging.getLogger("sftlab").setLevel(logging.WARNING)
    # config.yaml records the batch layout this run used, not "auto"
    cfg = cfg.model_copy(update={"padding_free": use_flat_batches(cfg.packing, cfg.padding_free, cfg.group_by_length, accelerator.device)})
    set_seed(cfg.seed)

    model_dir = resolve_model(cfg.model_name_or_path)
    tokenizer = load_tokenizer(cfg, model_dir)
    with ranks.first(accelerator.is_local_main_process):  # tokenized once per node; the other ranks load the cache
        data = build_data(cfg, tokenizer)
    log.info(data.report.summary())
    for line in data.report.lines()[1:]:  # the problems, each with the first samples named
        log.info(line)
    if main:
        (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    if not cfg.do_train:  # data checked and reported; nothing to train
        return out

    model = load_model(cfg, model_dir, accelerator.device)
    # into the whole model, before it is wrapped or sharded (DeepSpeed's engine and FSDP's sharded state load with the optimizer)
    if checkpoint is not None and plugin is None and holds_weights(checkpoint):
        load_weights(checkpoint, model)
    if cfg.fsdp:  # sharded first: the optimizer must hold the sharded parameters
        module = shard(TokenLoss(model), precision)
        optimizer = accelerator.prepare(build_optimizer(cfg, model))
    else:
        optimizer = build_optimizer(cfg, model)
    by_length = cfg.group_by_length or cfg.packing
    lengths = pc.list_value_length(data.train.with_format("arrow")["input_ids"]).to_pylist() if by_length else None
    schedule = Schedule(len(data.train), cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                        accelerator.num_processes, cfg.seed, lengths, cfg.cutoff_len if cfg.packing else None)
    if cfg.packing:
        log.info("packing: %d samples in %d rows of up to %d tokens, %.1f%% of the slots filled",
                 len(data.train), schedule.n_rows, cfg.cutoff_len, 100 * schedule.packing_efficiency)
    total = schedule.total_steps(cfg)
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * total)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    if not cfg.fsdp:
        if plugin is not None:
            zero.size_buckets(accelerator.state.deepspeed_plugin.deepspeed_config, cfg.deepspeed, model.config.hidden_size)
        module, optimizer = accelerator.prepare(TokenLoss(model), optimizer)
    engine = zero.engine_of(module)
    effective_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes

    state = TrainState(effective_batch=effective_batch)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, accelerator.unwrap_model(module), optimizer, scheduler, sharded=cfg.fsdp, engine=engine)
        log.info("resumed from %s at step %d", checkpoint, state.step)
        if state.effective_batch and state.effective_batch != effective_batch:
            log.warning("the checkpoint was trained with an effective batch of %d and this run has %d (per-device batch × "
                        "accumulation × processes): the steps from %d on cover the data with the new batch, so samples of "
                        "this epoch may repeat or be left out; keep the product equal to resume exactly",
                        state.effective_batch, effective_batch, state.step)
            state.effective_batch = effective_batch
    log.info("%d train samples, %s eval samples; %d optimizer steps (%d per epoch), effective batch %d%s",
             len(data.train), len(data.eval) if data.eval is not None else 0, total, schedule.steps_per_epoch, effective_batch,
             f" ({accelerator.num_processes} processes, {accelerator.distributed_type.value})" if accelerator.num_processes > 1 else "")

    trained = lambda: accelerator.unwrap_model(module).model  # noqa: E731
    # Sharded weights (FSDP, ZeRO-3): every rank runs the whole evaluation in step and the main process writes it;
    # otherwise the main process evaluates alone.
    sharded = cfg.fsdp or (engine is not None and engine.zero_optimization_stage() == 3)

    def evaluate_model(baseline: bool) -> None:
        where = out / ("eval_baseline" if baseline else "eval")
        if not sharded:
            if main:
                evaluate_split(cfg, trained(), tokenizer, data.eval_refs, where, baseline=baseline)
            return
        with root_unsharded(module) if cfg.fsdp else nullcontext():  # ZeRO-3's hooks gather each module's weights
            evaluate_split(cfg, trained(), tokenizer, data.eval_refs, where, baseline=baseline, write=main)

    if cfg.do_eval_baseline and checkpoint is None:
        evaluate_model(baseline=True)
        ranks.wait()

    def gathered_weights() -> dict | None:
        """The weights to save, whole on the main process (None: the model's own are). Every rank must call it."""
        return full_model_state(module) if cfg.fsdp else zero.full_model_state(engine) if engine is not None else None

    def save(s: TrainState, weights: dict | None = None) -> Path:
        """Checkpoint ``s``; ``weights``: already gathered (on every rank, by ``gathered_weights``), else gathered here."""
        path = out / f"checkpoint-{s.step}"
        # DDP: every rank holds the same weights and optimizer state; FSDP: the shards are gathered to the main process;
        # DeepSpeed: the weights are gathered (ZeRO-3) and each rank writes its part of the optimizer state;
        # fsdp_state_dict_type sharded: each rank writes its shards, nothing is gathered
        moments, per_rank = None, None
        if engine is not None or cfg.fsdp_state_dict_type == "sharded":
            per_rank = (out / f".checkpoint-{s.step}.per-rank", ENGINE_DIR if engine is not None else SHARDED_DIR)
            if main:
                shutil.rmtree(per_rank[0], ignore_errors=True)  # left by a crash
            accelerator.wait_for_everyone()
            if engine is not None:
                zero.save_engine_state(engine, per_rank[0])
                weights = gathered_weights() if weights is None else weights
            else:
                save_sharded(module, optimizer, per_rank[0])
            accelerator.wait_for_everyone()
        elif cfg.fsdp:
            weights, moments = gathered_weights() if weights is None else weights, full_optimizer_state(module, optimizer)
        if main:
            save_checkpoint(out, trained(), tokenizer, cfg, optimizer, scheduler, s, weights, moments, per_rank)
        accelerator.wait_for_everyone()
        return path

    metrics = MetricsWriter(out, cfg.report_to, cfg.model_dump(), resume_step=state.step) if main else None
    try:
        with stop_on_signals() as stop, Progress(total, state.step, enabled=main) as progress:
            def on_log(record: dict) -> None:
                if metrics is not None:
                    metrics.write(record)
                progress.log(record)

            def on_step(s: TrainState) -> bool:
                progress.update(s.step)
                if accelerator.num_processes > 1:  # stop together: a signal may reach the ranks a step apart
                    stop[0] = bool(accelerator.reduce(torch.tensor(float(stop[0]), device=accelerator.device), "sum") > 0)
                return stop[0]

            state = fit(cfg, accelerator, module, optimizer, scheduler, data.train, data.eval, schedule, state,
                        tokenizer.pad_token_id, on_log=on_log, on_save=save, on_step=on_step,
                        flops=FlopCounter.for_model(model), peak_flops=peak_flops(accelerator.device, precision != "no", cfg.peak_tflops))
    finally:
        if metrics is not None:
            metrics.close()
    if stop[0]:
        raise Interrupted(f"stopped at step {state.step}; checkpoint saved in {out / f'checkpoint-{state.step}'} (resume with resume_from_checkpoint: true)")
    weights = gathered_weights()  # once, for the last checkpoint and the final model
    save(state, weights)
    best = None  # load_best_model_at_end: every rank knows the best step (the eval loss is all-reduced)
    if cfg.load_best_model_at_end and state.best_step and state.best_step != state.step:
        best = out / f"checkpoint-{state.best_step}"
        if cfg.do_eval_baseline:  # the evaluation below is of the best weights: into the model (sharded: every rank's shards)
            if cfg.fsdp:
                load_full_weights(module, best)
            elif sharded:
                zero.load_full_weights(engine, best)
            elif main:
                load_weights(best, trained())
        log.info("the final %s is the best one: eval_loss %.4f at step %d (checkpoint-%d), not the last step's %.4f",
                 "adapter" if cfg.finetuning_type == "lora" else "model", state.best_eval_loss, state.best_step,
                 state.best_step, state.eval_loss)
    if main:  # the main process publishes, evaluates (with the others when the weights are sharded) and reports
        publish_final(out, trained(), tokenizer, cfg, weights, weights_from=best)
        log.info("saved the final %s to %s", "adapter" if cfg.finetuning_type == "lora" else "model", out)
    if cfg.do_eval_baseline and (main or sharded):
        evaluate_model(baseline=False)
    if not main:
        return out
    if cfg.do_eval_baseline:
        if (out / "eval_baseline" / "eval_results.json").is_file():  # a resumed run evaluated its base when it started
            before_after(out)
        else:
            log.warning("no eval_baseline in %s (the run was resumed without one): nothing to compare with", out)
    if cfg.plot_loss:
        write_report(out)
    return out


def write_report(out: Path) -> None:
    """report.html and the PNGs; the diagnosis goes to the log (warnings and errors as warnings)."""
    from sftlab.report.training_report import write_training_report

    files, findings = write_training_report(out)
    for f in findings:
        (log.info if f.severity == "info" else log.warning)("%s — %s. %s", f.title, f.evidence, f.advice)
    if not findings:
        log.info("diagnosis: nothing unusual in the loss curves")
    log.info("report: %s", files[-1])


def evaluate_split(cfg: SFTConfig, model, tokenizer, refs: list[str], out_dir: Path, baseline: bool, write: bool = True) -> None:
    """Evaluate ``model`` (the base before training, the result after) on the validation split into ``out_dir``
    (``write=False``: a rank that takes part in a sharded evaluation writes nothing)."""
    from sftlab.evaluate.run import evaluate, samples_from_refs

    log.info("evaluating the %s model on the %d validation samples…", "base" if baseline else "trained", len(refs))
    started = time.perf_counter()
    lora = cfg.finetuning_type == "lora"
    name, adapter = (cfg.model_name_or_path, None) if baseline else (cfg.model_name_or_path, cfg.output_dir) if lora else (cfg.output_dir, None)
    results, predictions = evaluate(
        model, tokenizer, samples_from_refs(cfg.dataset, cfg.dataset_dir, refs), cfg, model_name=name, adapter=adapter,
        datasets=[f"{', '.join(cfg.dataset)} (validation split)"], with_generation=cfg.predict_with_generate,
        scorers=cfg.eval_scorers, batch_size=cfg.per_device_eval_batch_size)
    if not write:
        return
    results.write(out_dir, predictions or None)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in results.metrics.items() if v is not None and k in _HEADLINE + tuple(cfg.eval_scorers))
    log.info("%s model: %s (%.0f s) → %s", "base" if baseline else "trained", shown, time.perf_counter() - started, out_dir)


_HEADLINE = ("eval_loss", "exact_match", "rouge-l")


def before_after(out: Path) -> None:
    """Compare ``out``/eval_baseline with ``out``/eval: log the metric table, write compare.md and compare.html."""
    from sftlab.evaluate.compare import compare, format_change
    from sftlab.evaluate.results import EvalResults, read_predictions
    from sftlab.report.compare_report import write_comparison

    base, tuned = out / "eval_baseline", out / "eval"
    comparison = compare(EvalResults.read(base), EvalResults.read(tuned), read_predictions(base, missing_ok=True),
                         read_predictions(tuned, missing_ok=True))
    log.info("before → after training (validation split):")
    for m in comparison.metrics:
        before, after, delta = format_change(m)
        log.info("  %-12s %10s → %-10s %s %s", m.name, before, after, delta, m.verdict)
    files = write_comparison(comparison, out / "compare")
    log.info("comparison: %s", ", ".join(str(f) for f in files if f.suffix in (".md", ".html")))


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
