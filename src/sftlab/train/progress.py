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
        speed = "{tokens_per_s:.0f} tok/s ({trained_tokens_per_s:.0f} trained)"
        formats = (("loss", "loss {loss:.4f}"), ("token_accuracy", "acc {token_accuracy:.3f}"), ("lr", "lr {lr:.2e}"),
                   ("grad_norm", "grad_norm {grad_norm:.3f}"), ("tokens_per_s", speed), ("peak_memory_gb", "{peak_memory_gb:.1f} GB"),
                   ("mfu", "MFU {mfu:.0%}"), ("skipped_steps", "{skipped_steps} skipped"), ("eval_loss", "eval_loss {eval_loss:.4f}"),
                   ("eval_token_accuracy", "eval_acc {eval_token_accuracy:.3f}"))
        parts = [f"step {record['step']}", f"epoch {record['epoch']:.2f}"]
        parts += [fmt.format(**record) for key, fmt in formats if key in record]
        if "tokens_per_s" in record:
            self.bar.update(self.task, info=f"loss {record['loss']:.4f} lr {record['lr']:.1e} {record['tokens_per_s']:.0f} tok/s"
                            + (f" MFU {record['mfu']:.0%}" if "mfu" in record else ""))
        self.console.print(" | ".join(parts), highlight=False, soft_wrap=True)  # one line per record, also in log files
