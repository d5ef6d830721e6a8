"""The child processes of bench_vs_trl.py: each benchmark step runs in a fresh Python process.

    python benchmarks/bench_child.py ROLE SPEC.json RESULT.json

ROLE is ``prepare`` (model directory + dataset), ``sftlab`` or ``trl`` (one training run), or
``check`` (TRL's token ids and trained-token mask against sftlab's). The child reads its spec,
writes a JSON result and exits 0; a failed run writes ``{"error": "<one line>"}`` instead, so the
parent can show it in the table and go on. Peak memory is this process's peak RSS, read at the end.

Importing this module is cheap (torch, transformers, TRL and sftlab are imported inside the
functions): the parent imports it for ``RunSpec`` and must stay small, because a child's
``ru_maxrss`` starts from the RSS of the parent it was forked from.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

IGNORE_INDEX = -100
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
LEARNING_RATE = {"lora": 2e-4, "full": 1e-5}
LORA_RANK, LORA_ALPHA = 16, 32

# What each run sets on top of the shared settings (its framework's keys).
SFTLAB_SETTINGS: dict[str, dict[str, Any]] = {
    "sftlab": {},  # every default: padding-free batches on CPU (and on CUDA with flash-attn)
    "sftlab-padded": {"padding_free": False},
    "sftlab-group_by_length": {"group_by_length": True},  # padded, length-grouped
    "sftlab-packing": {"packing": True},
    "sftlab-qlora4": {"quantization_bit": 4},  # QLoRA: the base in NF4 (double quantization), bitsandbytes
    "sftlab-qlora8": {"quantization_bit": 8},  # the base in LLM.int8
}
# TRL refuses padding_free with max_length unless packing ("max_length is not enforced"); the data
# never exceeds cutoff_len, so max_length=None changes nothing but lets the run start.
TRL_SETTINGS: dict[str, dict[str, Any]] = {
    "trl-default": {},
    "trl-padding_free": {"padding_free": True, "max_length": None},
    "trl-packing": {"packing": True},
    "trl-qlora4": {"quantization_bit": 4},  # not an SFTConfig key: run_trl loads the model with the same BitsAndBytesConfig
}
QLORA_RUNS = {"sftlab-qlora4", "sftlab-qlora8", "trl-qlora4"}  # LoRA on a quantized base: the lora workload only


@dataclass
class RunSpec:
    """One training run: a framework setting on a workload, and where its inputs and outputs are."""

    run: str  # a key of SFTLAB_SETTINGS or TRL_SETTINGS
    workload: str  # "lora" or "full"
    model_dir: str
    data_file: str
    output_dir: str
    cutoff_len: int
    batch: int
    accum: int
    bf16: bool
    seed: int
    tokens_file: str | None = None  # trl: write the tokenized train set here (input_ids, labels, index)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def epoch_order(n: int, seed: int) -> list[int]:
    """The order in which sftlab's padded, non-grouped path takes epoch 0's samples."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def read_chats(path: str) -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


# --- prepare


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Resolve the model (SmolLM2, or the tiny Llama built once) and generate the dataset."""
    from transformers import AutoTokenizer

    from bench_data import dataset_file, tiny_model_dir
    from sftlab.model.assets import resolve_model

    smol = resolve_model(SMOLLM2)
    cache = Path(spec["cache"])
    model_dir = tiny_model_dir(smol, cache) if spec["model"] == "tiny" else smol
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data, stats = dataset_file(tokenizer, cache, spec["samples"], spec["cutoff_len"], spec["seed"])
    return {"model_dir": str(model_dir), "data_file": str(data), "lengths": stats}


# --- training runs


def run_sftlab(spec: RunSpec) -> dict[str, Any]:
    """Train with sftlab's Python API; speeds come from its own metrics.jsonl."""
    from sftlab.config import load_config
    from sftlab.train.run import run_training

    values: dict[str, Any] = dict(
        model_name_or_path=spec.model_dir, dataset=spec.data_file, cutoff_len=spec.cutoff_len,
        finetuning_type=spec.workload, per_device_train_batch_size=spec.batch, gradient_accumulation_steps=spec.accum,
        num_train_epochs=1, learning_rate=LEARNING_RATE[spec.workload], lr_scheduler_type="constant", warmup_ratio=0.0,
        weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, logging_steps=1, save_steps=100_000,
        output_dir=spec.output_dir, overwrite_output_dir=True, report_to="none", bf16=spec.bf16, seed=spec.seed,
        **SFTLAB_SETTINGS[spec.run],
    )
    if spec.workload == "lora":
        values.update(lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, lora_target="all")
    cfg = load_config(None, [], **values)
    run_training(cfg)
    records = [json.loads(line) for line in (Path(spec.output_dir) / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "loss" in r]
    last = records[-1]
    if "train_runtime" in last and "trained_tokens" in last:
        runtime, trained, timing = last["train_runtime"], last["trained_tokens"], "train_runtime"
    else:  # an sftlab without these keys: rebuild them from the per-step records (logging_steps=1)
        runtime, trained, previous = 0.0, 0.0, 0
        for r in steps:
            seconds = (r["tokens"] - previous) / r["tokens_per_s"]
            runtime, trained, previous = runtime + seconds, trained + r["trained_tokens_per_s"] * seconds, r["tokens"]
        timing = "per-step records"
    return {"train_runtime": runtime, "trained_tokens": round(trained), "losses": [r["loss"] for r in steps],
            "timing": timing}


class CountingCollator:
    """Wraps a data collator and counts the trained tokens (labels[:, 1:] != -100) of every batch it makes."""

    def __init__(self, inner: Callable[[list[dict]], dict]):
        self.inner = inner
        self.trained = 0

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        self.trained += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return batch


def no_checkpointing(config_class: type) -> dict[str, bool]:
    """Turn off activation checkpointing, which TRL turns on by default (newer transformers name the key
    activation_checkpointing and keep gradient_checkpointing as a deprecated alias)."""
    name = "activation_checkpointing" if "activation_checkpointing" in config_class.__dataclass_fields__ else "gradient_checkpointing"
    return {name: False}


def run_trl(spec: RunSpec) -> dict[str, Any]:
    """Train with TRL's SFTTrainer on prompt/completion data in sftlab's epoch-0 order, read sequentially."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    chats = read_chats(spec.data_file)
    order = epoch_order(len(chats), spec.seed)
    rows = [{"prompt": chats[i][:-1], "completion": chats[i][-1:], "index": i} for i in order]
    settings = {"max_length": spec.cutoff_len, **TRL_SETTINGS[spec.run]}
    if bits := settings.pop("quantization_bit", None):  # as sftlab's quantization_bit loads it (model/quantize.py)
        from sftlab.model.quantize import Quantization

        quant = Quantization(bits).bnb_config(torch.bfloat16 if spec.bf16 else torch.float32)
        settings["model_init_kwargs"] = {"quantization_config": quant, "device_map": {"": "cuda" if torch.cuda.is_available() else "cpu"}}
    args = SFTConfig(
        output_dir=spec.output_dir, per_device_train_batch_size=spec.batch, gradient_accumulation_steps=spec.accum,
        num_train_epochs=1, learning_rate=LEARNING_RATE[spec.workload], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=spec.bf16, **no_checkpointing(SFTConfig),
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, seed=spec.seed,
        train_sampling_strategy="sequential", use_cpu=not torch.cuda.is_available(),  # bf16 on a CPU needs use_cpu
        **settings,
    )
    peft = None
    if spec.workload == "lora":
        peft = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=spec.model_dir, args=args, train_dataset=Dataset.from_list(rows), peft_config=peft)
    if spec.tokens_file:
        ds = trainer.train_dataset
        Path(spec.tokens_file).write_text("".join(
            json.dumps({"index": i, "input_ids": x, "labels": y}) + "\n"
            for i, x, y in zip(ds["index"], ds["input_ids"], ds["labels"])))
    # Set after construction: TRL refuses a custom collator in padding-free mode, and this one only counts.
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    output = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"train_runtime": output.metrics["train_runtime"], "trained_tokens": counter.trained, "losses": losses,
            "timing": "train_runtime"}


# --- check


def describe_token(tokenizer, token_id: int) -> str:
    return repr(tokenizer.decode([token_id]))


def check_tokens(spec: dict[str, Any]) -> dict[str, Any]:
    """Compare TRL's input_ids and trained-token mask (from the trl-default run) with sftlab's encoding
    of the same samples; ``summary`` says in one line whether they match and, if not, exactly how, and
    gives the first step's loss under each mask as plain transformers computes it (the reference
    that both frameworks' logged first-step losses should equal)."""
    from collections import Counter

    from sftlab.config import load_config
    from sftlab.data.pipeline import build_data
    from sftlab.model.load import load_tokenizer

    cfg = load_config(None, [], model_name_or_path=spec["model_dir"], dataset=spec["data_file"], cutoff_len=spec["cutoff_len"])
    tokenizer = load_tokenizer(cfg, Path(spec["model_dir"]))
    ours = build_data(cfg, tokenizer).train
    theirs = [json.loads(line) for line in Path(spec["tokens_file"]).read_text().splitlines() if line]
    if len(ours) != len(theirs):
        return {"summary": f"sftlab keeps {len(ours)} samples, TRL {len(theirs)}"}
    ids_differ, only_trl, only_sftlab, masks_differ = [], Counter(), Counter(), 0
    for t in theirs:
        o = ours[t["index"]]
        if o["input_ids"] != t["input_ids"]:
            ids_differ.append(t["index"])
            continue
        ids = o["input_ids"]
        a = [y != IGNORE_INDEX for y in o["labels"]]
        b = [y != IGNORE_INDEX for y in t["labels"]]
        masks_differ += a != b
        for k, (x, y) in enumerate(zip(a, b)):
            if x != y:  # name the token and the one before it
                key = f"{describe_token(tokenizer, ids[k])} after {describe_token(tokenizer, ids[k - 1])}"
                (only_sftlab if x else only_trl)[key] += 1
    n = len(theirs)
    parts = [f"{n - len(ids_differ)}/{n} samples have identical input_ids"]
    if ids_differ:
        i = ids_differ[0]
        o, t = ours[i]["input_ids"], next(r["input_ids"] for r in theirs if r["index"] == i)
        k = next((k for k, (x, y) in enumerate(zip(o, t)) if x != y), min(len(o), len(t)))
        parts.append(f"first differing sample {i}: lengths {len(o)} (sftlab) vs {len(t)} (TRL), first difference at "
                     f"token {k}: sftlab {tokenizer.decode(o[k:k + 5])!r}, TRL {tokenizer.decode(t[k:k + 5])!r}")
    parts.append(f"{n - len(ids_differ) - masks_differ}/{n - len(ids_differ)} of those have identical trained-token masks")
    for who, counts in (("TRL", only_trl), ("sftlab", only_sftlab)):
        if counts:
            listed = ", ".join(f"{key} ×{c}" for key, c in counts.most_common(3))
            parts.append(f"trained only by {who}: {sum(counts.values())} tokens ({listed})")
    step = [{"TRL": (t["input_ids"], t["labels"]), "sftlab": (ours[t["index"]]["input_ids"], ours[t["index"]]["labels"])}
            for t in theirs[: spec["step_samples"]]]
    parts.append("first step's loss recomputed with plain transformers (one sample at a time, no padding): "
                 + ", ".join(f"{loss:.6f} with {who}'s tokens and mask" for who, loss in step_losses(spec["model_dir"], step).items()))
    return {"summary": "; ".join(parts)}


def step_losses(model_dir: str, samples: list[dict[str, tuple[list[int], list[int]]]]) -> dict[str, float]:
    """Mean next-token loss over the trained tokens of one step, per framework; ``samples`` holds each
    sample's (input_ids, labels) per framework. fp32 model, fp64 log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    totals: dict[str, list[float]] = {}
    with torch.no_grad():
        for sample in samples:
            logp: dict[tuple[int, ...], torch.Tensor] = {}  # one forward per distinct input_ids
            for who, (ids, labels) in sample.items():
                if tuple(ids) not in logp:
                    logp[tuple(ids)] = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
                y = torch.tensor(labels[1:])
                keep = y != IGNORE_INDEX
                total = totals.setdefault(who, [0.0, 0])
                total[0] += -logp[tuple(ids)][keep].gather(1, y[keep, None]).sum().item()
                total[1] += int(keep.sum())
    return {who: loss / n for who, (loss, n) in totals.items()}


# --- entry point


class WarningLog(logging.Handler):
    """Collects the distinct first lines of WARNING+ log records and Python warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip()
        line = re.sub(r"^\S+:\d+: ", "", text.splitlines()[0])[:240] if text else ""  # drop a warning's "file:line: "
        if line and line not in self.lines:
            self.lines.append(line)


def one_line(error: BaseException) -> str:
    from sftlab.errors import SftlabError

    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, SftlabError) else f"{type(error).__name__}: {text}"


def main(role: str, spec_path: str, result_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    collected = WarningLog()
    logging.captureWarnings(True)
    for name in ("", "transformers"):  # transformers' library logger does not propagate to the root
        logging.getLogger(name).addHandler(collected)
    warnings.simplefilter("default")
    start = time.perf_counter()
    try:
        if role == "prepare":
            result = prepare(spec)
        elif role == "check":
            result = check_tokens(spec)
        else:
            run = RunSpec(**spec)
            result = (run_sftlab if role == "sftlab" else run_trl)(run)
    except Exception as e:  # the table shows the reason; the log holds the traceback
        traceback.print_exc()
        result = {"error": one_line(e)}
    result.update(wall_s=time.perf_counter() - start, peak_rss_gb=peak_rss_gb(), warnings=collected.lines)
    Path(result_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":  # the script's folder is on sys.path, so bench_data imports
    main(*sys.argv[1:])
