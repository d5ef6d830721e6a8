"""Where training metrics go: metrics.jsonl (always), TensorBoard or W&B (report_to), and the console."""

from __future__ import annotations

import importlib.util
import json
import resource
from pathlib import Path
from typing import Any

import torch

from sftlab.errors import SftlabError

_TB_NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
             "tokens_per_s": "train/tokens_per_s", "trained_tokens_per_s": "train/trained_tokens_per_s",
             "peak_memory_gb": "train/peak_memory_gb", "mfu": "train/mfu", "token_accuracy": "train/token_accuracy",
             "entropy": "train/entropy", "eval_loss": "eval/loss", "eval_token_accuracy": "eval/token_accuracy",
             "eval_entropy": "eval/entropy"}


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak RSS elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


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
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= resume_step]
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
