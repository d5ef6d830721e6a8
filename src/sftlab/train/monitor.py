"""What a run shows and hears while it trains: metrics records (metrics.jsonl, TensorBoard/W&B, the console), a live
progress bar on a terminal (loss, lr, tokens/s, ETA; plain log lines otherwise), and SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from sftlab.config import SFTConfig
from sftlab.report.metrics import MetricsWriter, StepMeter
from sftlab.train.checkpoint import saving


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


class Monitor:
    """``with Monitor(...) as monitor: fit(..., monitor)``. ``log`` writes a record (the main process to files, every
    process to its console when enabled); ``should_stop`` after each step says whether a signal asked to stop, on
    any rank, so that all stop after the same step. ``meter`` sums the steps between records.

    SIGINT/SIGTERM set a flag the loop checks after each step (which then saves a checkpoint); a second one stops at once.
    """

    def __init__(self, backend, cfg: SFTConfig, output_dir: Path, total_steps: int, start_step: int, meter: StepMeter):
        self.backend, self.meter = backend, meter
        self.progress = Progress(total_steps, start_step, enabled=backend.is_main)
        self.writer = MetricsWriter(output_dir, cfg.report_to, cfg.model_dump(), resume_step=start_step) if backend.is_main else None
        self.stopped = False
        self._previous: dict = {}

    def __enter__(self) -> "Monitor":
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.progress.__exit__(*exc)
            if self.writer is not None:
                self.writer.close()
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step…", file=sys.stderr)

    def log(self, record: dict) -> None:
        if self.writer is not None:
            with saving("metrics.jsonl", self.writer.path.parent):  # a full disk here is one line, as for a checkpoint
                self.writer.write(record)
        self.progress.log(record)

    def should_stop(self, step: int) -> bool:
        """After step ``step``: every rank must call it."""
        self.progress.update(step)
        self.stopped = self.backend.any_rank(self.stopped)
        return self.stopped
