"""``sftlab report OUTPUT_DIR``: the training run as one self-contained page: curves, diagnosis, config, before/after.

Reads only what training wrote (``metrics.jsonl``, ``config.yaml``, ``eval_baseline/`` and ``eval/``), so it
works during a run (the live view re-renders it) and long after. PNGs go beside the page under the names
LLaMA-Factory users look for (``training_loss.png``, ``training_eval_loss.png``).
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from sftlab.errors import SftlabError
from sftlab.report.diagnose import Finding, RunInfo, diagnose, display_weight, smooth
from sftlab.report.metrics import read_metrics
from sftlab.report.page import Page, new_figure

REPORT = "report.html"
_COLOURS = {"train": "#4c72b0", "eval": "#dd8452", "mark": "#c44e52"}


def run_config(output_dir: Path) -> dict:
    """The run's config.yaml as a mapping ({} when the file is missing)."""
    path = output_dir / "config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def run_info(output_dir: Path, records: list[dict], cfg: dict | None = None) -> RunInfo:
    """What the rules need from the run's config (``cfg``, else read from config.yaml; none of it when missing)."""
    cfg = run_config(output_dir) if cfg is None else cfg
    last = records[-1] if records else {}
    per_epoch = round(last["step"] / last["epoch"]) if last.get("epoch") else None
    total = cfg.get("max_steps") if (cfg.get("max_steps") or -1) > 0 else (
        round(per_epoch * cfg["num_train_epochs"]) if per_epoch and cfg.get("num_train_epochs") else None)
    warmup = cfg.get("warmup_steps") or (round(cfg.get("warmup_ratio", 0) * total) if total else None)
    return RunInfo(finetuning_type=cfg.get("finetuning_type"), learning_rate=cfg.get("learning_rate"), warmup_steps=warmup,
                   total_steps=total, steps_per_epoch=per_epoch, num_train_epochs=cfg.get("num_train_epochs"))


def finished(records: list[dict]) -> bool:
    """Whether the run logged its last step (that record carries train_runtime)."""
    return bool(records) and "train_runtime" in records[-1]


def write_training_report(output_dir: Path, refresh: int | None = None,
                          records: list[dict] | None = None) -> tuple[list[Path], list[Finding]]:
    """Write ``output_dir``/report.html and its PNGs; returns the files written and the diagnosis.

    ``records`` are the run's metrics when already read (default: read metrics.jsonl). With
    ``refresh`` (seconds) the page reloads itself in the browser until the run has finished.
    Raises SftlabError when ``output_dir`` has no metrics.jsonl (not a training output directory).
    """
    output_dir = Path(output_dir)
    metrics = output_dir / "metrics.jsonl"
    if records is None:
        if not metrics.is_file():
            raise SftlabError(f"{output_dir}: no metrics.jsonl; give the output_dir of a training run")
        records = read_metrics(metrics)
    cfg = run_config(output_dir)
    findings = diagnose(records, run_info(output_dir, records, cfg))
    page = Page(f"Training report: {output_dir.name}")
    page.text(f"{output_dir.resolve()}", "note")
    if refresh and not finished(records):
        page.refresh = refresh
        page.text(f"Live: this page reloads every {refresh} s while the run goes on (rendered {time.strftime('%X')}).", "note")
    if not records:
        page.text("No step has been logged yet.")
        return page.write(output_dir / REPORT), findings
    _summary(page, records, cfg)
    _diagnosis(page, findings)
    _loss(page, records, findings)
    for key, label, name in (("token_accuracy", "token accuracy (argmax = label, trained tokens)", "training_token_accuracy"),
                             ("entropy", "entropy of the predictions (nats, trained tokens)", "training_entropy")):
        _train_and_eval(page, records, key, label, name)
    for key, label, name in (("lr", "learning rate", "training_lr"), ("grad_norm", "gradient norm (before clipping)", "training_grad_norm"),
                             ("tokens_per_s", "tokens/s", "training_throughput"), ("peak_memory_gb", "peak memory (GB)", "training_memory")):
        _series(page, records, key, label, name)
    _before_after(page, output_dir)
    config = output_dir / "config.yaml"
    if config.is_file():
        page.heading("Config")
        page.pre(config.read_text(encoding="utf-8"))
    return page.write(output_dir / REPORT), findings


def _summary(page: Page, records: list[dict], cfg: dict) -> None:
    last = records[-1]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    rows = [["steps", last["step"]], ["epochs", last.get("epoch")], ["last train loss", last.get("loss")]]
    if evals:
        best = min(evals, key=lambda e: e[1])
        rows += [["last eval loss", evals[-1][1]], ["best eval loss", f"{best[1]:.4g} at step {best[0]}"]]
        if finished(records) and cfg.get("load_best_model_at_end"):
            rows.append(["final model", f"the best one, from step {best[0]} (load_best_model_at_end)"])
        if last.get("early_stopped"):
            rows.append(["stopped early", f"at step {last['step']}: no better eval_loss in {cfg.get('early_stopping_patience')} evaluations"])
    skipped = sum(r.get("skipped_steps", 0) for r in records)
    if skipped:
        rows.append(["steps skipped (NaN/inf)", skipped])
    for key, label in (("train_runtime", "training time (s)"), ("tokens", "tokens seen"), ("trained_tokens", "trained tokens"),
                       ("peak_memory_gb", "peak memory (GB)")):
        if last.get(key) is not None:
            rows.append([label, last[key]])
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    if speeds:
        rows.append(["tokens/s (median of logged steps)", sorted(speeds)[len(speeds) // 2]])
    page.heading("Summary")
    page.table(["", "value"], rows)


def _diagnosis(page: Page, findings: list[Finding]) -> None:
    page.heading("Diagnosis")
    if not findings:
        page.text("Nothing unusual in the curves: the loss falls, flattens and converges without spikes, "
                  "and the evaluation loss (when logged) follows it.")
        return
    page.table(["", "what", "evidence", "what to do"], [[f.severity, f.title, f.evidence, f.advice] for f in findings])


def _epoch_lines(ax, records: list[dict]) -> None:
    for a, b in zip(records, records[1:]):
        if a.get("epoch") is not None and b.get("epoch") is not None and int(b["epoch"]) > int(a["epoch"]) and b["epoch"] % 1:
            ax.axvline(b["step"], color="#999", lw=0.8, ls=":")


def _loss(page: Page, records: list[dict], findings: list[Finding]) -> None:
    page.heading("Loss")
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = new_figure()
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, color=_COLOURS["train"], alpha=0.3, lw=1, label="train loss")
        weight = display_weight(len(values))
        ax.plot(steps, smooth(list(values), weight), color=_COLOURS["train"], lw=2, label=f"train loss (smoothed, {weight:.2f})")
    if evals:
        ax.plot(*zip(*evals), color=_COLOURS["eval"], marker="o", ms=4, lw=1.5, label="eval loss")
    marked = sorted({s for f in findings if f.severity != "info" for s in f.steps})
    for s in marked:
        ax.axvline(s, color=_COLOURS["mark"], lw=0.8, alpha=0.6)
    _epoch_lines(ax, records)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.legend(loc="upper right")
    if marked:
        page.text("Red lines: steps the diagnosis names. Dotted lines: epoch boundaries.", "note")
    page.figure(fig, "training_loss", "train and eval loss by step")
    if evals:
        fig, ax = new_figure(width=6, height=3)
        ax.plot(*zip(*evals), color=_COLOURS["eval"], marker="o", ms=4)
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss")
        page.figure(fig, "training_eval_loss", "eval loss by step")


def _train_and_eval(page: Page, records: list[dict], key: str, label: str, name: str) -> None:
    """``key`` on the train steps and ``eval_<key>`` at the evaluations, in one figure."""
    train = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    evals = [(r["step"], r[f"eval_{key}"]) for r in records if r.get(f"eval_{key}") is not None]
    if len(train) < 2:
        return
    page.heading(label[0].upper() + label[1:])
    fig, ax = new_figure(width=6, height=2.8)
    ax.plot(*zip(*train), color=_COLOURS["train"], lw=1.5, label="train")
    if evals:
        ax.plot(*zip(*evals), color=_COLOURS["eval"], marker="o", ms=4, lw=1.5, label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel(label.split(" (")[0])
    ax.legend(loc="best")
    page.figure(fig, name, f"{label} by step")


def _series(page: Page, records: list[dict], key: str, label: str, name: str) -> None:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if len(points) < 2:
        return
    page.heading(label[0].upper() + label[1:])
    fig, ax = new_figure(width=6, height=2.8)
    ax.plot(*zip(*points), color=_COLOURS["train"], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    page.figure(fig, name, f"{label} by step")


def _before_after(page: Page, output_dir: Path) -> None:
    base, tuned = output_dir / "eval_baseline", output_dir / "eval"
    if not ((base / "eval_results.json").is_file() and (tuned / "eval_results.json").is_file()):
        return
    from sftlab.evaluate.compare import compare, format_change
    from sftlab.evaluate.results import EvalResults

    comparison = compare(EvalResults.read(base), EvalResults.read(tuned))
    page.heading("Before → after training")
    page.table(["metric", "base", "tuned", "change", "result"],
               [[m.name, *format_change(m), m.verdict] for m in comparison.metrics])
    if (output_dir / "compare.html").is_file():
        page.text("The samples that changed most: compare.html.", "note")
