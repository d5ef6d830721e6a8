"""The same training under each engine, side by side: one process, FSDP, DeepSpeed ZeRO-2 and ZeRO-3.

    python benchmarks/bench_distributed.py --model DIR [--nproc 1] [--steps 20] [--finetuning lora] [--bf16] [--out table.md]

Every row is one ``sftlab train`` run on the quickstart data (examples/data, person_json) with the same
global batch: ``plain`` is one process without sharding (the reference), the others run on ``--nproc``
processes with ``per_device_train_batch_size × processes`` equal to the reference's batch. The table gives
the loss of the last step, the largest per-step loss difference from ``plain`` (relative), tokens per second
(steps after the first) and the peak memory per process (GPU: max allocated; CPU: peak RSS).

``--model`` is a model directory; one with a config.json and tokenizer but no weights gets random weights
(seed 0), which is enough to compare engines. On a one-GPU machine this is issue 8's check: a LoRA run
with ZeRO-2 and one with FSDP on a single GPU (``--nproc 1``); scripts/gpu_check.sh runs it there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {  # name → config keys on top of the reference
    "plain": {},
    "fsdp": {"fsdp": True},
    "zero2": {"deepspeed": str(ROOT / "examples" / "deepspeed" / "ds_z2_config.json")},
    "zero3": {"deepspeed": str(ROOT / "examples" / "deepspeed" / "ds_z3_config.json")},
    "zero2_offload": {"deepspeed": str(ROOT / "examples" / "deepspeed" / "ds_z2_offload_config.json")},
}


def with_weights(model: Path, work: Path) -> Path:
    """``model`` itself when it holds weights; else a copy with random weights (seed 0) from its config."""
    if list(model.glob("*.safetensors")) or list(model.glob("*.bin")):
        return model
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = work / "random-init"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def run(name: str, model: Path, work: Path, args: argparse.Namespace) -> dict:
    """One training run; its metrics records (or the error it ended with)."""
    nproc = 1 if name == "plain" else args.nproc
    batch = args.batch // nproc
    cfg = dict(model_name_or_path=str(model), dataset_dir=str(ROOT / "examples" / "data"), dataset="person_json", cutoff_len=256,
               finetuning_type=args.finetuning, lora_target="all", lora_rank=16, learning_rate=args.lr, max_steps=args.steps,
               per_device_train_batch_size=batch, gradient_accumulation_steps=1, logging_steps=1, save_steps=10**6,
               bf16=args.bf16, plot_loss=False, output_dir=str(work / name), overwrite_output_dir=True, **ENGINES[name])
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "sftlab.cli", "train", str(path), "--master-port", str(29600 + os.getpid() % 300)]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return {"records": [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]}


def row(name: str, result: dict, reference: list[dict] | None) -> str:
    if "error" in result:
        return f"| {name} | failed: {result['error']} | | | |"
    records = result["records"]
    losses = [r["loss"] for r in records]
    diff = max(abs(a - b["loss"]) / abs(b["loss"]) for a, b in zip(losses, reference)) if reference else 0.0
    speed = [r["tokens_per_s"] for r in records[1:]] or [records[0]["tokens_per_s"]]
    memory = max(r.get("peak_memory_gb", 0.0) for r in records)
    return f"| {name} | {losses[-1]:.4f} | {diff:.1e} | {sum(speed) / len(speed):,.0f} | {memory:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--engines", default="plain,fsdp,zero2,zero3")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (samples per step)")
    parser.add_argument("--finetuning", default="lora", choices=["lora", "full"])
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        work = Path(tmp)
        model = with_weights(args.model.resolve(), work)
        lines = [f"{args.finetuning}, {args.steps} steps, global batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}, "
                 f"{args.nproc} process(es) for the sharded rows; model {args.model}", "",
                 "| engine | last loss | max Δloss vs plain (rel.) | tokens/s | peak memory GB |", "|---|---|---|---|---|"]
        reference = None
        for name in args.engines.split(","):
            result = run(name, model, work, args)
            if name == "plain" and "records" in result:
                reference = result["records"]
            lines.append(row(name, result, reference))
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
