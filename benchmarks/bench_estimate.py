"""Measured peak memory of real training runs vs ``sftlab estimate`` (the table in docs/estimate.md).

    .venv/bin/python benchmarks/bench_estimate.py [--points tiny|smol|bf16|qlora|all] [--steps 2] [--out estimate.md]

Each point is one ``sftlab train`` run in its own process (its peak RSS is its own VmHWM), on generated samples that
all have about the same length, so every micro-batch is the worst one. The measured peak is the largest ``peak_memory_gb``
of metrics.jsonl (peak RSS on CPU, max_memory_allocated on a GPU); the estimate is ``plan.estimate.memory`` for the tokens per sample
and trained share the run logged, on this machine's device (on a GPU, without the runtime row, as
``max_memory_allocated`` excludes it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# (model, finetuning_type, batch, tokens per sample, extra config)
POINTS = {
    "tiny": [("tiny", "full", 4, 512, {}), ("tiny", "lora", 8, 1024, {}), ("tiny", "full", 2, 2048, {"gradient_checkpointing": True})],
    "smol": [(SMOL, "full", 4, 512, {}), (SMOL, "lora", 4, 512, {}), (SMOL, "full", 1, 256, {}),
             (SMOL, "lora", 2, 1024, {}), (SMOL, "lora", 8, 256, {"gradient_checkpointing": True}),
             (SMOL, "full", 2, 1024, {"gradient_checkpointing": True}), (SMOL, "lora", 4, 256, {"padding_free": False})],
    "bf16": [(SMOL, "lora", 4, 512, {"bf16": True}), (SMOL, "full", 2, 512, {"bf16": True})],  # CPUs with AVX-512 bf16 / AMX only
    "qlora": [(SMOL, "lora", 4, 512, {"quantization_bit": 4}), (SMOL, "lora", 4, 512, {"quantization_bit": 8})],  # bitsandbytes
}


def rows_of_length(tokens: int, n: int) -> list[dict]:
    """Alpaca rows of about ``tokens`` tokens each with SmolLM2's tokenizer and template (half prompt, half answer)."""
    words = max(1, tokens // 2 - 20)
    return [{"instruction": "Repeat:" + " apple" * words, "input": "", "output": " pear" * (tokens // 2)} for _ in range(n)]


def run_point(model: str, finetuning_type: str, batch: int, tokens: int, extra: dict, steps: int, work: Path) -> dict:
    """Train ``steps`` steps in a fresh process; → {"measured_gb", "seq_len", "trained_share"}."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "data.json").write_text(json.dumps(rows_of_length(tokens, batch * steps)), encoding="utf-8")
    cfg = dict(model_name_or_path=model, dataset=str(work / "data.json"), output_dir=str(work / "out"), overwrite_output_dir=True,
               finetuning_type=finetuning_type, per_device_train_batch_size=batch, max_steps=steps, logging_steps=1,
               save_steps=10**6, cutoff_len=tokens + 64, plot_loss=False, **extra)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    sftlab = Path(sys.executable).parent / "sftlab"
    proc = subprocess.run([str(sftlab), "train", str(work / "config.yaml")], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"training failed: {proc.stderr.strip()[-500:]}")
    records = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    first = records[0]
    return {"measured_gb": max(r["peak_memory_gb"] for r in records), "seq_len": first["tokens"] / batch,
            "trained_share": first["trained_tokens_per_s"] / first["tokens_per_s"]}


def estimated_gb(model_dir: str, finetuning_type: str, batch: int, seq_len: float, trained_share: float, extra: dict) -> float:
    from sftlab.config import load_config
    from sftlab.plan.estimate import GB, Target, load_model_config, memory, model_shape

    import importlib.util

    import torch

    config, _ = load_model_config(model_dir)
    cfg = load_config(None, [], model_name_or_path=model_dir, dataset="x", finetuning_type=finetuning_type,
                      per_device_train_batch_size=batch, cutoff_len=max(8, round(seq_len)), **extra)
    cuda = torch.cuda.is_available()
    target = Target(device="cuda" if cuda else "cpu", flash_attn=importlib.util.find_spec("flash_attn") is not None)
    mem = memory(model_shape(config, model_dir), cfg, target, round(seq_len), trained_share)
    # on a GPU peak_memory_gb is max_memory_allocated: no CUDA context, no allocator slack
    return (mem.total - sum(p.at_peak for p in mem.parts if p.name == "runtime" and cuda)) / GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", choices=[*POINTS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from sftlab.model.assets import resolve_model, tiny_llama
    from sftlab.model.device import cpu_supports_bf16

    work = Path(tempfile.mkdtemp(prefix="est_bench_"))
    tiny = str(tiny_llama(resolve_model(SMOL), work / "tiny-llama"))
    points = [p for k, v in POINTS.items() if args.points in (k, "all") and (k != "bf16" or cpu_supports_bf16()) for p in v]
    lines = ["| model | method | batch × tokens | options | measured peak RSS (GB) | estimate (GB) | error |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    for i, (model, ftype, batch, tokens, extra) in enumerate(points):
        model_dir = tiny if model == "tiny" else model
        got = run_point(model_dir, ftype, batch, tokens, extra, args.steps, work / f"run{i}")
        est = estimated_gb(model_dir, ftype, batch, got["seq_len"], got["trained_share"], extra)
        options = ", ".join(f"{k}: {str(v).lower()}" for k, v in extra.items()) or "defaults"
        name = "tiny Llama (2 layers, hidden 32)" if model == "tiny" else "SmolLM2-135M"
        line = (f"| {name} | {ftype} | {batch} × {got['seq_len']:.0f} | {options} | {got['measured_gb']:.2f} | {est:.2f} "
                f"| {(est - got['measured_gb']) / got['measured_gb']:+.0%} |")
        lines.append(line)
        print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
