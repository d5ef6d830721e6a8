"""``sftlab report OUTPUT_DIR --watch``: the report re-rendered as a run logs, and the terminal view of where it is."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

from rich.table import Table

from sftlab.report.diagnose import Finding, display_weight, smooth
from sftlab.report.metrics import read_metrics
from sftlab.report.training_report import finished, write_training_report

SPARK = "▁▂▃▄▅▆▇█"
_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def sparkline(values: list[float], width: int = 48) -> str:
    """``values`` as one line of block characters, at most ``width`` wide (bucket means); NaN/inf as '×'."""
    if not values:
        return ""
    size = math.ceil(len(values) / width)
    buckets = [values[i : i + size] for i in range(0, len(values), size)]
    means = [sum(b) / len(b) if all(math.isfinite(v) for v in b) else math.nan for b in buckets]
    finite = [m for m in means if math.isfinite(m)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    span = (high - low) or 1.0
    return "".join(SPARK[round((m - low) / span * (len(SPARK) - 1))] if math.isfinite(m) else "×" for m in means)


def status(records: list[dict]) -> str:
    if not records:
        return "waiting for the first logged step"
    last = records[-1]
    if last.get("early_stopped"):
        return f"stopped early at step {last['step']}"
    return f"finished at step {last['step']}" if finished(records) else f"running: step {last['step']}, epoch {last.get('epoch', 0):.2f}"


def status_view(output_dir: Path, records: list[dict], findings: list[Finding]) -> Table:
    """A two-column grid: the run's state, the loss and eval-loss curves as sparklines, the latest
    token accuracy, learning rate, speed and memory, and the diagnosis so far."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("run", f"{output_dir}  ({status(records)})")
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    if losses:
        grid.add_row("loss", f"{losses[-1]:.4f} (smoothed {smooth(losses, display_weight(len(losses)))[-1]:.4f})  {sparkline(losses)}")
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if evals:
        best = min(evals, key=lambda e: e[1] if math.isfinite(e[1]) else math.inf)
        grid.add_row("eval loss", f"{evals[-1][1]:.4f} (best {best[1]:.4f} at step {best[0]})  {sparkline([v for _, v in evals])}")
    last = next((r for r in reversed(records) if "tokens_per_s" in r), {})
    for key, label, fmt in (("token_accuracy", "token accuracy", "{:.3f}"), ("lr", "learning rate", "{:.2e}"),
                            ("tokens_per_s", "tokens/s", "{:,.0f}"), ("peak_memory_gb", "peak memory", "{:.1f} GB")):
        if last.get(key) is not None:
            grid.add_row(label, fmt.format(last[key]))
    for f in findings:
        grid.add_row(f"[{_STYLE[f.severity]}]{f.severity}[/]", f"{f.title} — {f.evidence}")
    return grid


def watch(output_dir: Path, every: float, on_render: Callable[[list[dict], list[Finding]], None],
          on_waiting: Callable[[Path], None] | None = None) -> list[Path]:
    """Re-render ``output_dir``'s report (a page that reloads itself) whenever its metrics.jsonl changes, looking every
    ``every`` seconds, until the run has logged its last step; returns the files of the last render.

    ``on_render(records, findings)`` follows each render, with the records it drew; ``on_waiting(metrics_path)`` is
    called once if the run has not started logging yet. Raises SftlabError for metrics that cannot be read.
    """
    metrics = output_dir / "metrics.jsonl"
    seen: object = ...  # nothing rendered yet
    while True:
        stamp = metrics.stat().st_mtime_ns if metrics.is_file() else None
        if stamp is None and seen is ...:
            if on_waiting is not None:
                on_waiting(metrics)
            seen = None
        elif stamp != seen:
            seen = stamp
            records = read_metrics(metrics)  # once: the page and the caller's view show the same steps
            files, findings = write_training_report(output_dir, refresh=max(1, round(every)), records=records)
            on_render(records, findings)
            if finished(records):
                return files
        time.sleep(every)
