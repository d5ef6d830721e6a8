"""Speed and memory of the data tools at scale: sftlab data check / stats / dedup on 10k, 100k and 1M rows.

    .venv/bin/python benchmarks/bench_data_tools.py                      # 10k and 100k rows, every tool
    .venv/bin/python benchmarks/bench_data_tools.py --rows 1000000 --tools check,dedup

Each tool runs as its own ``sftlab`` process, alone; its wall time and peak RSS (the process and its
children) are measured. The data is a generated JSONL (cached under ~/.cache/sftlab/bench): Alpaca
rows made of the demo data's sentences about people (English and Chinese), one to many people per
row with a seeded log-normal count (~1 KB per row on average, so 1M rows ≈ 1 GB), with planted
exact duplicates (2 %, case/whitespace changed), near duplicates (3 %, one word changed) and
empty answers (0.2 %) so every tool has work to do (dedup and split refuse unreadable rows, so the
file has none: `check` finds those, see tests/unit/test_data_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples/data/person_json_train.json"
CACHE = Path(os.environ.get("SFTLAB_CACHE", Path.home() / ".cache" / "sftlab")) / "bench"
GENERATOR_VERSION = 2
TOOLS = ("check", "stats", "dedup")
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make_data(rows: int, seed: int = 0) -> Path:
    """The cached benchmark file with ``rows`` rows (made once)."""
    path = CACHE / f"data_tools_v{GENERATOR_VERSION}_{rows}.jsonl"
    if path.is_file():
        return path
    demo = json.loads(DEMO.read_text(encoding="utf-8"))
    texts = [(d["instruction"].split("\n", 1)[-1], d["output"]) for d in demo]
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    recent: list[dict] = []
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(rows):
            r = rng.random()
            if r < 0.002:  # readable, trainable, but wrong: check reports it, the other tools take it
                row = {"instruction": "Say nothing.", "input": "", "output": "  "}
            elif r < 0.022 and recent:  # exact duplicate, differently cased and spaced
                src = rng.choice(recent)
                row = {**src, "instruction": "  " + src["instruction"].upper() + " "}
            elif r < 0.052 and recent:  # near duplicate: one word of the answer changed
                src = rng.choice(recent)
                words = src["output"].split(" ")
                words[rng.randrange(len(words))] = "changed"
                row = {**src, "output": " ".join(words)}
            else:
                k = max(1, min(60, round(rng.lognormvariate(1.6, 0.8))))
                people = [rng.choice(texts) for _ in range(k)]
                row = {"instruction": f"Extract a JSON record (name, age, city) per person, one per line. [{i}]",
                       "input": "\n".join(p for p, _ in people), "output": "\n".join(o for _, o in people)}
                recent = (recent + [row])[-1000:]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.rename(path)
    return path


def measure(args: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS GiB of the process tree, exit code) of one command, run in a fresh wrapper."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)")
    out = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1]) / 2**20, int(out[2])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="10000,100000", help="comma list of row counts (default 10000,100000)")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma list of {', '.join(TOOLS)}")
    p.add_argument("--model", default=SMOLLM2, help="tokenizer/template for stats (default SmolLM2-135M-Instruct)")
    a = p.parse_args(argv)
    sftlab = str(Path(sys.executable).with_name("sftlab"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}\n")
    print("| rows | file | tool | wall (s) | rows/s | peak RSS (GiB) | exit |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for rows in (int(r) for r in a.rows.split(",")):
        data = make_data(rows)
        size = data.stat().st_size / 2**20
        with tempfile.TemporaryDirectory(prefix="sftlab-bench-data-") as out:
            commands = {
                "check": [sftlab, "data", "check", str(data), "--max-errors", "20"],
                "stats": [sftlab, "data", "stats", str(data), "--model", a.model, "--cutoff-len", "2048", "-o", f"{out}/stats"],
                "dedup": [sftlab, "data", "dedup", str(data), "-o", f"{out}/dedup.jsonl"],
            }
            for tool in a.tools.split(","):
                wall, rss, code = measure(commands[tool])
                print(f"| {rows:,} | {size:,.0f} MiB | {tool} | {wall:,.1f} | {rows / wall:,.0f} | {rss:.2f} | {code} |", flush=True)


if __name__ == "__main__":
    main()
