"""The metrics.jsonl of a run: written while it trains (and mirrored to TensorBoard or W&B, per report_to), read by
the report, the live view and the web UI."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftlab.errors import SftlabError

if TYPE_CHECKING:  # the report and the web UI read metrics without importing torch
    from sftlab.model.flops import FlopCounter

log = logging.getLogger(__name__)

_TB_NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
             "tokens_per_s": "train/tokens_per_s", "trained_tokens_per_s": "train/trained_tokens_per_s",
             "peak_memory_gb": "train/peak_memory_gb", "mfu": "train/mfu", "token_accuracy": "train/token_accuracy",
             "entropy": "train/entropy", "eval_loss": "eval/loss", "eval_token_accuracy": "eval/token_accuracy",
             "eval_entropy": "eval/entropy"}


def require_reporter(report_to: str) -> None:
    """Fail before anything is written when the logging backend ``report_to`` is not installed."""
    if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise SftlabError("report_to: wandb needs the wandb package: pip install wandb (or use tensorboard)")


class MetricsWriter:
    """Appends one JSON object per logged step to ``output_dir/metrics.jsonl`` and mirrors it.

    Keys: step, epoch, and any of loss, token_accuracy (argmax = label, on trained tokens), entropy
    (of the predictions, nats), lr, grad_norm, tokens, tokens_per_s (all real tokens),
    trained_tokens_per_s (tokens with a label), peak_memory_gb, mfu, skipped_steps, eval_loss,
    eval_token_accuracy, eval_entropy; the last step also train_runtime (seconds in training
    steps), trained_tokens, best_step / best_eval_loss when there were evaluations, and
    early_stopped. A step
    whose loss was not finite is logged with its loss, grad_norm and lr only.
    """

    def __init__(self, output_dir: Path, report_to: str, config: dict[str, Any], resume_step: int = 0):
        self.path = output_dir / "metrics.jsonl"
        if resume_step and self.path.is_file():  # drop records past the checkpoint we resume from
            records, torn = _parse(self.path, self.path.read_text(encoding="utf-8", errors="replace"))
            if torn is not None:  # else the next record would be glued to it
                log.warning("%s: removed its last line, cut off mid-write when the run stopped (%d characters: %.40r…)",
                            self.path, len(torn), torn)
            kept = [line for line, record in records if record["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif not resume_step:
            self.path.write_text("", encoding="utf-8")
        self.tb = self.wandb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(output_dir / "runs"), purge_step=resume_step + 1 if resume_step else None)
        elif report_to == "wandb":
            require_reporter(report_to)
            import wandb

            self.wandb = wandb.init(config=config, dir=str(output_dir), resume="allow")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for key, tag in _TB_NAMES.items():
                if record.get(key) is not None:
                    self.tb.add_scalar(tag, record[key], step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({_TB_NAMES.get(k, k): v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()



class StepMeter:
    """The training steps since the last logged record, summed: the record's means, speeds and MFU; and the run's totals.

    Speeds count only the time of training steps (not evaluation, logging or saving); with a ``FlopCounter`` and
    the device's peak FLOP/s, records carry MFU.
    """

    def __init__(self, flops: FlopCounter | None = None, peak_flops: float | None = None, world_size: int = 1):
        self.flops, self.peak_flops, self.world_size = flops, peak_flops, world_size
        self.run_time, self.run_trained = 0.0, 0  # this run's steps (not a resumed run's earlier ones)
        self._reset()

    def _reset(self) -> None:
        self.loss = self.correct = self.entropy = self.seconds = self.flop = 0.0
        self.trained = self.inputs = self.skipped = 0

    def add(self, sums, seconds: float, sample_lengths: list[int]) -> None:
        """An applied step: ``sums`` over all ranks (loss, trained, inputs, correct, entropy), its time, and the
        lengths of this rank's samples."""
        self.loss += sums.loss
        self.correct += sums.correct
        self.entropy += sums.entropy
        self.trained += sums.trained
        self.inputs += sums.inputs
        self.seconds += seconds
        self.run_time += seconds
        self.run_trained += sums.trained
        if self.flops is not None:  # this rank's samples × ranks (the head term is exact: linear in trained tokens)
            self.flop += self.flops.step_flops(sample_lengths, sums.trained / self.world_size) * self.world_size

    def skip(self) -> None:
        """A step that was not applied (its loss or gradient was not finite)."""
        self.skipped += 1

    def record(self, lr: float, grad_norm: float, tokens: int, peak_memory_gb: float) -> dict[str, Any]:
        """The record of the steps since the last one (and a fresh start for the next)."""
        elapsed, trained = max(self.seconds, 1e-9), max(self.trained, 1)
        out: dict[str, Any] = dict(loss=self.loss / trained, token_accuracy=self.correct / trained, entropy=self.entropy / trained,
                                   lr=lr, grad_norm=grad_norm, tokens=tokens, tokens_per_s=self.inputs / elapsed,
                                   trained_tokens_per_s=self.trained / elapsed, peak_memory_gb=peak_memory_gb)
        if self.peak_flops:
            out["mfu"] = self.flop / elapsed / (self.peak_flops * self.world_size)
        if self.skipped:
            out["skipped_steps"] = self.skipped
        self._reset()
        return out

    def totals(self) -> dict[str, Any]:
        """What the last record adds: seconds in training steps and trained tokens, of this run."""
        return {"train_runtime": self.run_time, "trained_tokens": self.run_trained}


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in file order.

    A last line without its newline is skipped (the file may be mid-write while training runs).
    Raises SftlabError naming the file and line for any other line that is not a JSON object with a step.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")  # a write cut off mid-character is a torn line too
    except OSError as e:
        raise SftlabError(f"cannot read {path}: {e.strerror or e}") from None
    return [record for _, record in _parse(path, text)[0]]


def _parse(path: Path, text: str) -> tuple[list[tuple[str, dict]], str | None]:
    """(each record's line and the record, a torn last line or None): ``text`` of the metrics.jsonl ``path``. The
    last line, without its newline, is torn when it is not JSON (a write in progress, or cut off by a kill).
    SftlabError naming the file and line for any other line that is not a JSON object with an integer step."""
    lines = text.split("\n")  # the last item is "" when the file ends with a newline
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it
                return records, line
            raise SftlabError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); fix or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise SftlabError(f"{path} line {number}: not a metrics record (a JSON object with an integer step)")
        records.append((line, record))
    return records, None
