"""A training config from the data and the model (``sftlab suggest``): each choice with a one-line reason.

The rules are common SFT rules of thumb (docs/estimate.md lists them), made concrete with the data's
statistics (``data.stats``: samples, length CDF, turns) and the memory estimate (``plan.estimate``): the
batch and gradient checkpointing are what fits the device; LoRA or full tuning is what the data size and
the memory allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from sftlab.config import SFTConfig, load_config
from sftlab.data.stats import Stats
from sftlab.errors import SftlabError
from sftlab.model.device import cpu_supports_bf16
from sftlab.plan.estimate import GB, Estimate, ModelShape, Target, duration, estimate, max_batch, train_samples

FULL_MIN_SAMPLES = 10_000  # below this, LoRA: small data moves few directions, and full tuning forgets more
ROUND = 64  # cutoff_len is rounded up to a multiple of this
PACKED_ROW_FILL = 0.95  # share of a packed row's slots that best-fit decreasing fills on short samples


@dataclass
class Choice:
    key: str
    value: Any
    reason: str = ""


@dataclass
class Suggestion:
    """The proposed config, every choice with its reason, and the estimate of the run it describes."""

    choices: list[Choice]
    cfg: SFTConfig
    estimate: Estimate
    header: list[str] = field(default_factory=list)

    def yaml(self, command: str) -> str:
        """The config as YAML: the command that runs it first, a reason comment on each chosen key."""
        lines = [f"# sftlab train {command}", "#", *(f"# {h}" for h in self.header), ""]
        for c in self.choices:
            value = yaml.safe_dump({c.key: c.value}, default_flow_style=True, allow_unicode=True, width=10**6).strip()[1:-1]
            lines.append(f"{value:<44s} # {c.reason}" if c.reason else value)
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"config": {c.key: c.value for c in self.choices}, "reasons": {c.key: c.reason for c in self.choices if c.reason},
                "summary": self.header, "estimate": self.estimate.to_dict()}


def _pow2_floor(n: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(n, 1)))))


def _round_up(n: int, to: int = ROUND) -> int:
    return -(-n // to) * to


def learning_rate(full: bool, params: int) -> tuple[float, str]:
    base = 1e-5 if full else 5e-5
    what = "full tuning" if full else "LoRA"
    if params < 1e9:
        return base * 2, f"rule of thumb: {base:.0e} for {what}; doubled for a small (<1B) model, which tolerates larger steps"
    if params >= 30e9:
        return base / 2, f"rule of thumb: {base:.0e} for {what}; halved for a large (≥30B) model"
    return base, f"rule of thumb: {base:.0e} for {what}"


def epochs(n: int) -> tuple[float, str]:
    value = 5 if n < 1_000 else 3 if n < 10_000 else 2 if n < 100_000 else 1
    return float(value), f"rule of thumb: 3-10 epochs, fewer on more data; {n:,} training samples (watch eval_loss for overfitting)"


def validation(n: int) -> tuple[float, str]:
    """A common rule: < 1,000 samples → 0.1-0.2 with ≥ 100 in validation; > 10,000 → 0.05-0.1 with ≥ 1,000."""
    if n < 1_000:
        frac = min(0.2, max(0.1, 100 / max(n, 1)))
        return round(frac, 2), f"rule of thumb: 0.1-0.2 for < 1,000 samples, ≥ 100 held out when possible ({round(frac * n)} of {n:,})"
    if n <= 10_000:
        return 0.1, f"rule of thumb: 0.1 of {n:,} samples ({round(0.1 * n):,} held out)"
    if n * 0.05 > 2_000:
        return 2000, "rule of thumb: 0.05-0.1 for > 10,000 samples, ≥ 1,000 held out; capped at 2,000 so evaluation stays quick"
    frac = max(0.05, min(0.1, 1_000 / n))
    return round(frac, 3), f"rule of thumb: 0.05-0.1 for > 10,000 samples, ≥ 1,000 held out ({round(frac * n):,})"


def effective_batch(n_train: int) -> int:
    """The common 16/32/64/128 by data size, never so large that an epoch has fewer than 8 steps."""
    target = 16 if n_train < 1_000 else 32 if n_train < 10_000 else 64 if n_train < 100_000 else 128
    return max(1, min(target, _pow2_floor(n_train / 8)))


def suggest(stats: Stats, shape: ModelShape, base: SFTConfig, target: Target) -> Suggestion:
    """Propose a config for training ``shape`` on the data ``stats`` describes, on ``target``.

    ``base`` carries what the user gave (model, dataset, dataset_dir, template, …). Raises SftlabError when no
    sample was measured, or when not even LoRA (then QLoRA) with gradient checkpointing at batch 1 fits the memory.
    """
    n = stats.samples
    if not n:
        raise SftlabError(f"{', '.join(stats.sources)}: no sample could be measured; run sftlab data check on it")
    length = stats.length
    single_turn = float(np.mean(stats.turns <= 1))
    median = float(np.median(length))
    mean = float(np.mean(length))
    share = float(np.sum(stats.answer)) / max(float(np.sum(length)), 1.0)
    val_size, val_reason = validation(n)
    n_train = train_samples(n, val_size)
    cap = shape.max_positions or 1 << 30

    # cutoff_len: all samples when the tail is short, else 99 %; 95 % when memory forces it
    longest, p99, p95 = stats.cutoff_for(100), stats.cutoff_for(99), stats.cutoff_for(95)

    def over(c: int) -> float:
        return stats.over(c) / n

    if longest <= 1.25 * p99:
        cutoff, why = _round_up(longest), f"covers every sample (longest {longest} tokens; p99 {p99})"
    else:
        cutoff = _round_up(p99)
        why = f"covers 99% (p99 {p99} tokens); {over(cutoff):.1%} longer lose later turns or are dropped (longest {longest})"
    if cutoff > cap:
        cutoff, why = cap, f"the model's max_position_embeddings; {over(cap):.1%} of samples are longer (p99 {p99})"

    cfg = base.model_copy(update={"cutoff_len": cutoff, "bf16": target.device == "cuda" or cpu_supports_bf16(), "fp16": False,
                                  "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "val_size": val_size})

    def fitting(c: SFTConfig) -> tuple[int, int]:
        """(largest batch without, with gradient checkpointing) at cutoff_len."""
        return (max_batch(shape, c.model_copy(update={"gradient_checkpointing": False}), target),
                max_batch(shape, c.model_copy(update={"gradient_checkpointing": True}), target))

    full_cfg = cfg.model_copy(update={"finetuning_type": "full"})
    full_fit = fitting(full_cfg)
    rank = 8 if n < FULL_MIN_SAMPLES else 16
    lora_cfg = cfg.model_copy(update={"finetuning_type": "lora", "lora_rank": rank, "lora_alpha": 2.0 * rank,
                                      "lora_dropout": 0.05 if n < 1_000 else 0.0, "lora_target": "all"})
    mem = target.memory / GB
    if n >= FULL_MIN_SAMPLES and max(full_fit) >= 1:
        cfg, fit = full_cfg, full_fit
        ft_reason = f"{n:,} samples (≥ {FULL_MIN_SAMPLES:,}) and full tuning fits {mem:.0f} GB"
    else:
        cfg, fit = lora_cfg, fitting(lora_cfg)
        ft_reason = (f"{n:,} samples (< {FULL_MIN_SAMPLES:,}): adapters learn a task from little data and forget less"
                     if max(full_fit) >= 1 else f"full tuning does not fit {mem:.0f} GB even at batch 1 with gradient checkpointing")
    if max(fit) < 1 and p95 < cutoff:  # give up the 5 % tail before giving up
        cutoff, why = _round_up(p95), f"covers 95% (p95 {p95}): longer cutoffs do not fit {mem:.0f} GB"
        cfg = cfg.model_copy(update={"cutoff_len": cutoff})
        fit = fitting(cfg)
    if max(fit) < 1 and cfg.finetuning_type == "lora":  # QLoRA: the same adapters on a 4-bit base
        qlora_fit = fitting(cfg.model_copy(update={"quantization_bit": 4}))
        if max(qlora_fit) >= 1:
            cfg, fit = cfg.model_copy(update={"quantization_bit": 4}), qlora_fit
            ft_reason += f"; LoRA on the full-precision base does not fit {mem:.0f} GB: QLoRA (quantization_bit: 4) does"
    if max(fit) < 1:
        raise SftlabError(f"{shape.name}: even QLoRA with gradient checkpointing at batch 1 × {cutoff} tokens needs more than "
                          f"{mem:.0f} GB per device; use a smaller model, more devices (--gpus with sharding), or a GPU with more memory")

    # packing: many short single-turn samples fill rows of cutoff_len
    packing = single_turn >= 0.9 and median <= cutoff / 4 and n >= 1_000
    per_row = max(1.0, cutoff * PACKED_ROW_FILL / mean) if packing else 1.0
    eff = effective_batch(n_train)
    wanted = max(1, math.ceil(eff / per_row / target.devices))  # micro-batch rows (samples) per device per step
    no_gc, with_gc = fit
    checkpointing = no_gc < min(wanted, 4)
    b = min(_pow2_floor(with_gc if checkpointing else no_gc), _pow2_floor(wanted))
    accumulation = max(1, math.ceil(eff / (b * per_row * target.devices)))
    cfg = cfg.model_copy(update={"per_device_train_batch_size": b, "gradient_accumulation_steps": accumulation,
                                 "gradient_checkpointing": checkpointing, "packing": packing})
    lr, lr_reason = learning_rate(cfg.finetuning_type == "full", shape.params)
    n_epochs, epoch_reason = epochs(n_train)
    cfg = cfg.model_copy(update={"learning_rate": lr, "num_train_epochs": n_epochs})
    est = estimate(shape, cfg, target, samples=n_train, mean_len=mean, trained_share=share)
    steps = est.time.steps or 1
    cfg = cfg.model_copy(update={"logging_steps": max(1, min(10, steps // 50)), "save_steps": max(1, math.ceil(steps / n_epochs)),
                                 "eval_steps": max(1, steps // 10), "do_eval_baseline": True,
                                 "output_dir": f"saves/{Path(base.model_name_or_path).name}-{cfg.finetuning_type}"})

    in_batch = f"{b} {'rows' if packing else 'samples'}"
    samples_per_step = round(b * per_row * accumulation * target.devices)
    choices = [
        Choice("model_name_or_path", base.model_name_or_path),
        *([Choice("template", base.template)] if base.template else []),
        Choice("stage", "sft"),
        Choice("finetuning_type", cfg.finetuning_type, ft_reason),
        *([Choice("quantization_bit", 4, "the base model in 4 bits (NF4, bitsandbytes): ~0.5 B per weight instead of 2-4 B")]
          if cfg.quantization_bit else []),
    ]
    if cfg.finetuning_type == "lora":
        choices += [Choice("lora_target", "all", "every linear layer but the head: the usual choice"),
                    Choice("lora_rank", rank, f"rule of thumb: 8-16; {rank} for {n:,} samples (raise it if the model does not learn the task)"),
                    Choice("lora_alpha", 2.0 * rank, "2 × rank"),
                    Choice("lora_dropout", cfg.lora_dropout, "a little regularisation for < 1,000 samples (costs a copy of each "
                           "adapted input)" if cfg.lora_dropout else "not needed on this much data (and it costs activation memory)")]
    choices += [
        Choice("dataset", list(base.dataset)),
        *([Choice("dataset_dir", base.dataset_dir)] if base.dataset_dir != "data" else []),
        Choice("cutoff_len", cutoff, why),
        Choice("val_size", val_size, val_reason),
        Choice("packing", packing, _packing_reason(packing, single_turn, median, cutoff, per_row, n)),
        Choice("per_device_train_batch_size", b, f"{in_batch} of ≤ {cutoff} tokens fit {mem:.0f} GB "
               f"(largest: {with_gc if checkpointing else no_gc}; estimated peak {est.memory.total / GB:.1f} GB)"),
        Choice("gradient_accumulation_steps", accumulation, f"effective batch ≈ {samples_per_step} samples: the common 16/32/64/128 by data size"
               + (f" (≤ 1/8 of {n_train:,} samples)" if eff < 16 else "")),
        Choice("gradient_checkpointing", checkpointing, f"without it only {no_gc} fit{'s' if no_gc == 1 else ''}: recompute to fit {b}"
               if checkpointing else f"not needed: {no_gc} fit without it (recomputing costs ~30% time)"),
        Choice("num_train_epochs", n_epochs, epoch_reason),
        Choice("learning_rate", lr, lr_reason),
        Choice("lr_scheduler_type", "cosine", "the usual decay after warmup"),
        Choice("warmup_ratio", 0.05, "a short warmup keeps the first steps stable"),
        Choice("bf16", cfg.bf16, ("mixed precision (A100/H100/RTX 30xx+; on V100/T4 use bf16: false, fp16: true)" if target.device == "cuda"
                                  else "this CPU computes bf16" if cfg.bf16 else "this CPU has no bf16 (fp32)")),
        Choice("do_eval_baseline", True, "rule of thumb: test the base model before training and compare after"),
        Choice("logging_steps", cfg.logging_steps, f"~{steps:,} steps in all"),
        Choice("eval_steps", cfg.eval_steps, "about ten evaluations"),
        Choice("save_steps", cfg.save_steps, "a checkpoint per epoch"),
        Choice("output_dir", cfg.output_dir),
        Choice("overwrite_output_dir", False),
    ]
    # the written YAML must load exactly as suggested
    check = load_config(None, [], **{c.key: c.value for c in choices})
    header = [f"Suggested by sftlab suggest from {n:,} samples (median {median:.0f} tokens, p99 {p99}, {single_turn:.0%} single-turn)",
              f"for {shape.name} ({shape.params / 1e6:,.0f} M parameters) on {target.describe()}.",
              f"Estimated peak {est.memory.total / GB:.1f} GB per device; "
              + (f"~{est.time.steps:,} steps, {duration(est.time.total_s)} at {est.time.mfu:.0%} MFU ({est.time.throughput})."
                 if est.time.total_s else "")]
    return Suggestion(choices, check, est, header)


def _packing_reason(packing: bool, single_turn: float, median: float, cutoff: int, per_row: float, n: int) -> str:
    if packing:
        return (f"{single_turn:.0%} single-turn, median {median:.0f} tokens ≤ cutoff_len/4: rows of ~{per_row:.0f} samples, fewer and "
                "fuller steps; packing is commonly advised against where samples see each other — in sftlab's rows they do not")
    if single_turn < 0.9:
        return f"off: {1 - single_turn:.0%} multi-turn samples (packing does not suit multi-turn data)"
    if median > cutoff / 4:
        return f"off: median {median:.0f} tokens is over cutoff_len/4: padding-free batches already compute no padding"
    return f"off: {n:,} samples are few; packing is commonly advised against in general"


def measure(cfg: SFTConfig, workers: int = 1, on_bytes: Callable[[int], None] | None = None) -> Stats:
    """The data statistics of ``cfg``'s datasets with its model's tokenizer and template, as ``sftlab data stats`` measures them."""
    from sftlab.data.stats import stats_for_config
    from sftlab.model.assets import resolve_model
    from sftlab.model.load import load_tokenizer

    return stats_for_config(cfg, load_tokenizer(cfg, resolve_model(cfg.model_name_or_path)), workers=workers, on_bytes=on_bytes)
