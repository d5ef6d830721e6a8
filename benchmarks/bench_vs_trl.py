"""Benchmark sftlab against TRL's SFTTrainer: same model, data, effective batch and number of samples.

    .venv/bin/pip install 'trl>=1.16' -c <(.venv/bin/pip freeze | grep -E '^(torch|transformers|accelerate|peft|datasets)==')
    .venv/bin/python benchmarks/bench_vs_trl.py --model tiny --samples 32          # a smoke test
    .venv/bin/python benchmarks/bench_vs_trl.py --out bench.md                     # SmolLM2-135M, lora + full

Every run (and the data preparation and the token check) is its own child process, started one at
a time, so each peak RSS is that run's alone. Per run the table shows trained tokens per second
(tokens with a label ÷ training time, each framework counting its own batches and timing only its
training steps), the training time, the peak RSS, the first and last step's loss, and for sftlab
the ratios to TRL's default and to TRL's best run, and the relative first-step loss difference to
TRL's default. sftlab's padded run and TRL's runs see the samples in the same order (sftlab's
epoch-0 order, read sequentially by TRL), so their first steps train on the same samples; the
tokenization line above the tables says whether the two also tokenize and mask them identically.

The QLoRA runs (``sftlab-qlora4``, ``sftlab-qlora8``, ``trl-qlora4``; the lora workload only) train the same
adapters on the base quantized by bitsandbytes (NF4 with double quantization, or LLM.int8), loaded with the same
BitsAndBytesConfig in both frameworks; their losses differ from the full-precision runs' by the quantization.

TRL is the ``bench`` extra; the first command above installs it with torch, transformers, peft,
accelerate and datasets pinned at their installed versions, so pip never swaps torch for another build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench_child import QLORA_RUNS, SFTLAB_SETTINGS, TRL_SETTINGS, RunSpec

CHILD = Path(__file__).resolve().parent / "bench_child.py"
RUNS = [*TRL_SETTINGS, *SFTLAB_SETTINGS]
WORKLOADS = ("lora", "full")
# Runs whose first optimizer step trains the first batch × accum samples of sftlab's epoch-0 order.
SAME_FIRST_STEP = {"trl-default", "trl-padding_free", "sftlab", "sftlab-padded"}
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def comma_list(choices: list[str] | tuple[str, ...]):
    """An argparse type: a comma-separated list, each item one of ``choices``."""
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in items if s not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown) or 'nothing'}: choose from {', '.join(choices)}")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2", help="SmolLM2-135M-Instruct, or a 2-layer Llama with its tokenizer (fast)")
    p.add_argument("--workload", type=comma_list(WORKLOADS), default=list(WORKLOADS), help="lora, full or both (default)")
    p.add_argument("--runs", type=comma_list(RUNS), default=RUNS, help=f"comma list of {', '.join(RUNS)} (default: all)")
    p.add_argument("--samples", type=int, default=256, help="samples, trained for exactly one epoch (default 256)")
    p.add_argument("--cutoff-len", type=int, default=1024, help="longest sample in tokens; TRL's max_length (default 1024)")
    p.add_argument("--batch", type=int, default=4, help="per-device batch (default 4)")
    p.add_argument("--accum", type=int, default=4, help="gradient accumulation steps (default 4)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in both frameworks (default fp32)")
    p.add_argument("--seed", type=int, default=42, help="data generation and sample order (default 42)")
    p.add_argument("--out", type=Path, help="also write the report as markdown to this file")
    return p.parse_args(argv)


def run_child(role: str, spec: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    """Run one child process to completion; its result, or ``{"error": ...}`` if it died without one."""
    spec_path, result_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec, indent=1))
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(CHILD), role, str(spec_path), str(result_path)],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CHILD_ENV})
    if not result_path.is_file():
        return {"error": f"exited with code {proc.returncode} without a result (see {log_path})"}
    return json.loads(result_path.read_text())


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_lines() -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = ", ".join(f"{p} {package_version(p)}" for p in ("sftlab", "trl", "torch", "transformers", "peft", "accelerate"))
    return [f"- machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}", f"- {versions}"]


# --- the table


def speed(result: dict[str, Any]) -> float:
    return result["trained_tokens"] / result["train_runtime"]


def ratio(ours: float, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}×" if theirs else "—"


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    """One workload's runs as markdown table rows (header included)."""
    ok = {run: r for run, r in results.items() if "error" not in r}
    trl = {run: r for run, r in ok.items() if run.startswith("trl")}
    default = trl.get("trl-default")
    fastest = max(trl.values(), key=speed, default=None)
    leanest = min(trl.values(), key=lambda r: r["peak_rss_gb"], default=None)
    lines = [
        "| run | trained tok/s | train time (s) | peak RSS (GiB) | first-step loss | final loss | steps "
        "| tok/s ÷ TRL default | tok/s ÷ TRL best | RSS ÷ TRL default | RSS ÷ TRL best | first loss vs TRL default |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run, r in results.items():
        if "error" in r:
            lines.append(f"| {run} | error: {r['error'][:150].replace('|', '/')} |" + " |" * 10)
            continue
        losses = r["losses"]
        cells = [run, f"{speed(r):,.0f}", f"{r['train_runtime']:.1f}", f"{r['peak_rss_gb']:.2f}",
                 f"{losses[0]:.6f}", f"{losses[-1]:.6f}", str(len(losses))]
        if run.startswith("sftlab"):
            first = "—"
            if default is not None:
                mark = "" if run in SAME_FIRST_STEP else " †"
                first = f"{(losses[0] - default['losses'][0]) / default['losses'][0]:+.1e}{mark}"
            cells += [ratio(speed(r), default and speed(default)), ratio(speed(r), fastest and speed(fastest)),
                      ratio(r["peak_rss_gb"], default and default["peak_rss_gb"]),
                      ratio(r["peak_rss_gb"], leanest and leanest["peak_rss_gb"]), first]
        else:
            cells += [""] * 5
        lines.append("| " + " | ".join(cells) + " |")
    if trl:
        name = {id(r): run for run, r in trl.items()}
        lines += ["", f"TRL best: fastest {name[id(fastest)]}, least memory {name[id(leanest)]}."]
    return lines


def notes(all_results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Each distinct warning once, with the runs that gave it; and runs timed from per-step records."""
    said: dict[str, list[str]] = {}
    for workload, results in all_results.items():
        for run, r in results.items():
            if r.get("timing") not in (None, "train_runtime"):
                said.setdefault(f"time and trained tokens rebuilt from sftlab's {r['timing']} (no train_runtime key)", []).append(f"{workload} {run}")
            for line in r.get("warnings", []):
                said.setdefault(line, []).append(f"{workload} {run}")
    return [f"- {', '.join(runs)}: {line}" for line, runs in said.items()]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sftlab-bench-"))
    from sftlab.model.assets import cache_dir  # a light import: no torch

    print(f"preparing the model and {args.samples} samples (logs in {workdir})", file=sys.stderr)
    prepared = run_child("prepare", {"model": args.model, "samples": args.samples, "cutoff_len": args.cutoff_len,
                                     "seed": args.seed, "cache": str(cache_dir() / "bench")}, workdir, "prepare")
    if "error" in prepared:
        sys.exit(f"preparing failed: {prepared['error']}")

    all_results: dict[str, dict[str, dict[str, Any]]] = {}
    tokens_file: Path | None = None
    plan = [(w, r) for w in args.workload for r in args.runs if w == "lora" or r not in QLORA_RUNS]
    total, k = len(plan), 0
    for workload in args.workload:
        all_results[workload] = {}
        for run in [r for w, r in plan if w == workload]:
            k += 1
            name = f"{workload}-{run}"
            dump = workdir / "trl-tokens.jsonl" if run == "trl-default" and tokens_file is None else None
            spec = RunSpec(run=run, workload=workload, model_dir=prepared["model_dir"], data_file=prepared["data_file"],
                           output_dir=str(workdir / name), cutoff_len=args.cutoff_len, batch=args.batch, accum=args.accum,
                           bf16=args.bf16, seed=args.seed, tokens_file=str(dump) if dump else None)
            print(f"[{k}/{total}] {workload} {run} …", end=" ", file=sys.stderr, flush=True)
            start = time.perf_counter()
            result = run_child(run.split("-")[0], asdict(spec), workdir, name)
            shutil.rmtree(workdir / name, ignore_errors=True)  # checkpoints and weights; the log stays
            print(result.get("error", "done") + f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
            all_results[workload][run] = result
            if dump is not None and "error" not in result:
                tokens_file = dump

    check = None
    if tokens_file is not None:
        check = run_child("check", {"model_dir": prepared["model_dir"], "data_file": prepared["data_file"],
                                    "cutoff_len": args.cutoff_len, "tokens_file": str(tokens_file),
                                    "step_samples": args.batch * args.accum}, workdir, "check")

    lengths = prepared["lengths"]
    report = [
        "# sftlab vs TRL SFTTrainer", "", *machine_lines(),
        f"- model: {args.model} ({prepared['model_dir']}); {'bf16 autocast' if args.bf16 else 'fp32'}; "
        f"batch {args.batch} × accumulation {args.accum} = {args.batch * args.accum} samples per step; one epoch",
        f"- data: {lengths['n']} single-turn chats ({prepared['data_file']}); tokens per sample: median {lengths['median']:.0f}, "
        f"p90 {lengths['p90']}, max {lengths['max']}, {100 * lengths['over_512']:.1f}% over 512; cutoff_len {args.cutoff_len}",
    ]
    if check is not None:
        report.append(f"- tokenization, TRL vs sftlab: {check.get('error') or check['summary']}")
    for workload, results in all_results.items():
        report += ["", f"## {workload}", "", *table(results)]
    report += [
        "", "trained tok/s: tokens with a label ÷ training time (sftlab: its train_runtime, the training steps only; "
        "TRL: trainer.train()'s train_runtime). Peak RSS: the run's own process, at its end. TRL best: its fastest run "
        "for tok/s, its leanest for RSS. † this run's first step trains other samples than TRL default's "
        "(length grouping or packing), so its first loss is not comparable.",
    ]
    said = notes(all_results)
    if said:
        report += ["", "Notes:", *said]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(f"logs: {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
