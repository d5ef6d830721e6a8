"""A bounded load test of ``sftlab serve``: 1, 4 and 16 concurrent clients (the table in docs/serve.md).

    .venv/bin/python benchmarks/bench_serve.py --model DIR                       # 1/4/16 clients, 2 requests each
    .venv/bin/python benchmarks/bench_serve.py --model DIR --clients 1,8 --requests 4 --max-tokens 32

The server is the real ``sftlab serve`` command in a process of its own (127.0.0.1, a free port); each client is a
thread with the ``openai`` client sending its requests one after the other (chat, greedy, ``max_tokens`` each, all
clients of a level start together). Per level: requests/s and generated tokens/s (``usage.completion_tokens`` over the
level's wall time), median and 95th-percentile request latency, failed requests. Nothing is retried.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one paragraph.",
             "Give three tips for learning a language.", "What is 17 times 23?", "Describe a cat to someone who has never seen one.",
             "Why is the sky blue?", "Name five fruits and their colours."]


def start_server(model: str, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    """``sftlab serve --model MODEL`` on a free port; (the process, its base URL) once /health answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sftlab.cli", "serve", "--model", model, "--port", str(port), "--max-batch", str(max_batch), "--name", "bench"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sftlab serve ended: {proc.stderr.read()[-1000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("sftlab serve did not answer /health within 300 s")


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads × ``requests`` requests each → the level's numbers."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    latencies, tokens, errors = [], [], []
    lock, go = threading.Lock(), threading.Barrier(clients + 1)

    def work(k: int) -> None:
        go.wait()
        for j in range(requests):
            question = QUESTIONS[(k * requests + j) % len(QUESTIONS)]
            start = time.perf_counter()
            try:
                r = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": question}],
                                                   max_tokens=max_tokens, temperature=0)
            except openai.APIError as e:
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens.append(r.usage.completion_tokens)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies) or [float("nan")]
    return {"clients": clients, "requests": len(latencies) + len(errors), "wall": wall, "rps": len(latencies) / wall,
            "tps": sum(tokens) / wall, "p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "tokens": sum(tokens), "errors": len(errors)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Model directory (or anything sftlab serve --model takes).")
    p.add_argument("--clients", default="1,4,16", help="Concurrency levels, comma-separated.")
    p.add_argument("--requests", type=int, default=2, help="Requests per client at each level.")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request.")
    p.add_argument("--max-batch", type=int, default=16, help="The server's --max-batch.")
    p.add_argument("--threads", type=int, default=1, help="The server's OMP_NUM_THREADS (torch's threads); on a shared machine one is fastest.")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    proc, url = start_server(args.model, args.max_batch, args.threads)
    try:
        run_level(url, 1, 1, 4)  # warm-up: first-call allocations are not part of any level
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        print(f"machine: {cpu}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; max_tokens {args.max_tokens}, "
              f"{args.requests} requests per client, --max-batch {args.max_batch}, {args.threads} torch thread(s)\n")
        print("| clients | requests | wall (s) | requests/s | tokens/s | p50 latency (s) | p95 latency (s) | errors |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        failed = 0
        for clients in levels:
            r = run_level(url, clients, args.requests, args.max_tokens)
            failed += r["errors"]
            print(f"| {clients} | {r['requests']} | {r['wall']:.1f} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['errors']} |",
                  flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
