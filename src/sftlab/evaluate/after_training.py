"""After training: the trained (or, before the first step, the base) model evaluated on the run's evaluation set
(eval_dataset, else the validation split), the before → after comparison, and the run's report with its diagnosis,
all into the output_dir."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sftlab.config import SFTConfig
from sftlab.data.sources import dataset_names
from sftlab.evaluate.compare import format_change
from sftlab.evaluate.comparison import compare_dirs
from sftlab.evaluate.run import evaluate, samples_from_refs
from sftlab.report.training_report import write_training_report

log = logging.getLogger(__name__)


def write_report(out: Path) -> None:
    """report.html and the PNGs; the diagnosis goes to the log (warnings and errors as warnings)."""
    files, findings = write_training_report(out)
    for f in findings:
        (log.info if f.severity == "info" else log.warning)("%s — %s. %s", f.title, f.evidence, f.advice)
    if not findings:
        log.info("diagnosis: nothing unusual in the loss curves")
    log.info("report: %s", files[-1])


def evaluate_split(cfg: SFTConfig, model, tokenizer, names: list[str], refs: list[str], out_dir: Path, baseline: bool,
                   write: bool = True) -> None:
    """Evaluate ``model`` (the base before training, the result after) on the evaluation set, the rows ``refs`` of the
    datasets ``names`` (``Data.eval_names``: eval_dataset, else dataset's val_size split), into ``out_dir``
    (``write=False``: a rank that takes part in a sharded evaluation writes nothing)."""
    log.info("evaluating the %s model on the %d evaluation samples…", "base" if baseline else "trained", len(refs))
    started = time.perf_counter()
    lora = cfg.finetuning_type == "lora"
    name, adapter = (cfg.model_name_or_path, None) if baseline else (cfg.model_name_or_path, cfg.output_dir) if lora else (cfg.output_dir, None)
    results, predictions = evaluate(
        model, tokenizer, samples_from_refs(names, cfg.dataset_dir, refs), cfg, model_name=name, adapter=adapter,
        datasets=[eval_set_label(cfg, names)], with_generation=cfg.predict_with_generate,
        scorers=cfg.eval_scorers, batch_size=cfg.per_device_eval_batch_size)
    if not write:
        return
    results.write(out_dir, predictions or None)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in results.metrics.items() if v is not None and k in _HEADLINE + tuple(cfg.eval_scorers))
    log.info("%s model: %s (%.0f s) → %s", "base" if baseline else "trained", shown, time.perf_counter() - started, out_dir)


_HEADLINE = ("eval_loss", "exact_match", "rouge-l")


def eval_set_label(cfg: SFTConfig, names: list[str]) -> str:
    """How eval_results.json names the evaluation set: the eval_dataset names, or dataset's "(validation split)"."""
    return ", ".join(names) + ("" if dataset_names(cfg.eval_dataset) else " (validation split)")


def before_after(out: Path) -> None:
    """Compare ``out``/eval_baseline with ``out``/eval: log the metric table, write compare.md and compare.html."""
    comparison, files = compare_dirs(out / "eval_baseline", out / "eval", out / "compare")
    log.info("before → after training (validation split):")
    for m in comparison.metrics:
        before, after, delta = format_change(m)
        log.info("  %-12s %10s → %-10s %s %s", m.name, before, after, delta, m.verdict)
    log.info("comparison: %s", ", ".join(str(f) for f in files if f.suffix in (".md", ".html")))
