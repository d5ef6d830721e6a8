"""Console progress: a live bar (loss, lr, tokens/s, ETA) on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    """``with Progress(total, start) as p: p.update(step); p.log(record)``."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.live = enabled and sys.stderr.isatty()
        self.bar = RichProgress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console, disable=not self.live,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> "Progress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, step: int) -> None:
        self.bar.update(self.task, completed=step)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        parts = [f"step {record['step']}", f"epoch {record['epoch']:.2f}"]
        if "loss" in record:
            parts += [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"grad_norm {record['grad_norm']:.3f}",
                      f"{record['tokens_per_s']:.0f} tok/s ({record['trained_tokens_per_s']:.0f} trained)", f"{record['peak_memory_gb']:.1f} GB"]
            if "mfu" in record:
                parts.append(f"MFU {100 * record['mfu']:.0f}%")
        if "eval_loss" in record:
            parts.append(f"eval_loss {record['eval_loss']:.4f}")
        if "loss" in record:
            self.bar.update(self.task, info=f"loss {record['loss']:.4f} lr {record['lr']:.1e} {record['tokens_per_s']:.0f} tok/s"
                            + (f" MFU {100 * record['mfu']:.0f}%" if "mfu" in record else ""))
        self.console.print(" | ".join(parts), highlight=False, soft_wrap=True)  # one line per record, also in log files
