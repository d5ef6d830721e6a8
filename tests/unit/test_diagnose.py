"""Training-curve diagnosis: each rule fires on a synthetic curve made for it, with the right steps in its
evidence, and every rule stays quiet on healthy curves (and on the quickstart's real one)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from sftlab.errors import SftlabError
from sftlab.report.diagnose import Finding, RunInfo, diagnose, smooth
from sftlab.report.metrics import read_metrics

TOTAL, EVERY, SPE = 1000, 10, 250  # 4 epochs of 250 steps, a log every 10 steps
STEPS = np.arange(EVERY, TOTAL + 1, EVERY)
EVAL_STEPS = set(range(100, TOTAL + 1, 100))


def _fall(steps, floor=0.9):
    """The healthy shape: a sharp fall, then flat, converging at ``floor``."""
    return floor + 1.6 * np.exp(-np.asarray(steps, dtype=float) / 60)


def _records(steps=STEPS, loss=None, eval_loss=None, grad_norm=None, noise=0.03, seed=0, spe=SPE) -> list[dict]:
    """metrics.jsonl-like records; ``eval_loss`` maps a step to its value; seeded multiplicative noise on loss."""
    rng = np.random.default_rng(seed)
    steps = np.asarray(steps)
    loss = _fall(steps) if loss is None else np.asarray(loss, dtype=float)
    loss = loss * (1 + noise * rng.standard_normal(len(steps)))
    if grad_norm is None:
        grad_norm = (0.3 + np.exp(-steps / 100)) * (1 + 0.2 * rng.standard_normal(len(steps)))
    lr = 5e-5 * np.minimum(steps / 30, 0.5 * (1 + np.cos(np.pi * steps / steps[-1])))
    records = []
    for i, s in enumerate(steps):
        r = {"step": int(s), "epoch": round(s / spe, 4), "loss": float(loss[i]), "lr": float(lr[i]),
             "grad_norm": float(grad_norm[i]), "tokens": int(s) * 900, "tokens_per_s": 120.0}
        if eval_loss is not None and int(s) in eval_loss:
            r["eval_loss"] = float(eval_loss[int(s)])
        records.append(r)
    return records


def _healthy_eval(seed=0, steps=EVAL_STEPS):
    rng = np.random.default_rng(seed + 100)
    return {s: float(_fall(s, 0.95)) * (1 + 0.01 * rng.standard_normal()) for s in steps}


def _only(findings: list[Finding], rule: str) -> Finding:
    hits = [f for f in findings if f.rule == rule]
    assert len(hits) == 1, findings
    return hits[0]


QUICKSTART = [  # saves/quickstart/metrics.jsonl, rounded
    {"step": 10, "epoch": 0.1667, "loss": 0.2078, "lr": 0.000486, "grad_norm": 0.55},
    {"step": 20, "epoch": 0.3333, "loss": 0.0345, "lr": 0.000409, "grad_norm": 0.0775},
    {"step": 30, "epoch": 0.5, "loss": 0.0271, "lr": 0.000284, "grad_norm": 0.222},
    {"step": 40, "epoch": 0.6667, "loss": 0.0086, "lr": 0.00015, "grad_norm": 0.0211},
    {"step": 50, "epoch": 0.8333, "loss": 0.0101, "lr": 4.46e-05, "grad_norm": 0.183, "eval_loss": 0.0105},
    {"step": 60, "epoch": 1.0, "loss": 0.0090, "lr": 3.8e-07, "grad_norm": 0.262, "eval_loss": 0.0102,
     "train_runtime": 421.9, "trained_tokens": 12197},
]


# -- quiet ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_healthy_curve_is_quiet(seed):
    info = RunInfo(finetuning_type="lora", learning_rate=5e-5, warmup_steps=30, total_steps=TOTAL, steps_per_epoch=SPE)
    assert diagnose(_records(eval_loss=_healthy_eval(seed), seed=seed), info) == []
    assert diagnose(_records(seed=seed)) == []  # no eval, no info


def test_healthy_curve_with_uneven_steps_is_quiet():
    """A resumed run: steps strictly increasing but not evenly spaced."""
    steps = np.sort(np.random.default_rng(7).choice(np.arange(1, TOTAL + 1), 90, replace=False))
    evals = _healthy_eval(steps=[int(s) for s in steps[9::10]])
    assert diagnose(_records(steps=steps, eval_loss=evals)) == []


def test_quickstart_curve_gives_no_warning():
    findings = diagnose(QUICKSTART, RunInfo(finetuning_type="lora", learning_rate=5e-4, warmup_steps=0, total_steps=60,
                                            steps_per_epoch=60, num_train_epochs=1))
    assert [f.severity for f in findings] == ["info"]  # at most: a very low loss, eval_loss as low
    assert findings[0].rule == "too_low" and "0.0102" in findings[0].evidence


@pytest.mark.parametrize("records", [[], [{"step": 1}], [{"step": 1, "epoch": 0.5}, {"step": 2, "epoch": 1.0}],
                                     QUICKSTART[:2], [{"step": 10, "eval_loss": 1.0}, {"step": 20, "eval_loss": 2.0}],
                                     [{"epoch": 1.0, "loss": 1.0}, "not a record"]])
def test_short_runs_and_missing_keys_are_quiet(records):
    assert diagnose(records) == []


# -- each rule fires --------------------------------------------------------------------------------


def test_non_finite_is_an_error_naming_the_step():
    records = _records(eval_loss=_healthy_eval())
    records[49]["loss"] = math.nan  # step 500
    records[59]["grad_norm"] = math.inf  # step 600
    findings = diagnose(records)
    f = findings[0]
    assert (f.rule, f.severity) == ("non_finite", "error")
    assert "step 500" in f.title
    assert "loss = nan at step 500" in f.evidence and "grad_norm = inf at step 600" in f.evidence
    assert f.steps == [500, 600]
    assert all(g.severity != "error" for g in findings[1:])  # the other rules read the finite values


def test_overfitting_eval_minimum_then_rising():
    evals = {s: float(_fall(s, 0.95)) + 0.0006 * max(0, s - 400) for s in EVAL_STEPS}  # lowest at 400, +38% at 1000
    f = _only(diagnose(_records(eval_loss=evals)), "overfitting")
    assert f.title == "Overfitting: eval_loss rose 38% since its minimum at step 400"
    assert "eval_loss lowest 0.952 at step 400, 1.31 at step 1000 (+38%)" in f.evidence
    assert "train loss" in f.evidence
    assert "step 400 (epoch 1.6)" in f.advice and "checkpoint-N saved nearest that step" in f.advice
    assert "early_stopping_patience" in f.advice and "load_best_model_at_end" in f.advice
    assert 400 in f.steps and 1000 in f.steps


def test_overfitting_gap_growing_while_eval_stays_flat():
    train = _fall(STEPS) - 0.4 * STEPS / TOTAL  # keeps falling to 0.5
    evals = {s: float(_fall(s, 0.95)) for s in EVAL_STEPS}  # flat at 0.95 from step 300
    f = _only(diagnose(_records(loss=train, eval_loss=evals, noise=0.02)), "overfitting")
    assert "gap" in f.title
    # the second half of the run; train loss is the median of the logs since the previous eval
    assert "from step 600 to 1000 train loss 0.678 -> 0.519 (-23%), eval_loss 0.95 -> 0.95 (-0%); gap 0.272 -> 0.431" in f.evidence
    assert f.steps == [600, 1000]


def test_small_eval_rise_at_a_tiny_loss_is_not_overfitting():
    evals = {100: 0.012, 200: 0.010, 300: 0.0115, 400: 0.0118}  # +18%, but 0.002 nats
    assert not [f for f in diagnose(_records(loss=_fall(STEPS, 0.01), eval_loss=evals)) if f.rule == "overfitting"]


def test_plateau():
    flat = np.full(len(STEPS), 2.0)
    f = _only(diagnose(_records(loss=flat, noise=0.02), RunInfo(warmup_steps=30, learning_rate=1e-6)), "plateau")
    assert f.severity == "warning"
    assert "at the start (steps 40-120)" in f.evidence and "at the end (steps 760-1000)" in f.evidence
    assert "learning_rate 1e-06" in f.evidence
    assert "raise learning_rate" in f.advice and "sftlab data preview" in f.advice


def test_flat_loss_that_is_already_low_is_only_info():
    f = _only(diagnose(_records(loss=np.full(len(STEPS), 0.05), noise=0.02)), "plateau")
    assert f.severity == "info"


def test_divergence():
    rising = _fall(STEPS) + 0.001 * np.maximum(0, STEPS - 300)
    findings = diagnose(_records(loss=rising, noise=0.01))
    f = _only(findings, "divergence")
    assert f.severity == "warning" and "rising since step" in f.title
    assert f.title == "Divergence: train loss rising since step 280 (+73%)" and f.steps == [280, 610]
    # the curve is read as 20 chunks of 5 logs: the lowest, and the last
    assert f.evidence == "train loss median lowest 0.911 over steps 260-300, 1.57 over steps 960-1000 (+73%)"
    assert "lower learning_rate" in f.advice
    assert not [g for g in findings if g.rule == "plateau"]


def test_divergence_above_the_start_is_an_error():
    f = _only(diagnose(_records(loss=_fall(STEPS) + 0.004 * np.maximum(0, STEPS - 300), noise=0.01)), "divergence")
    assert f.severity == "error" and "above where it started" in f.evidence


def test_spikes():
    loss = _fall(STEPS)
    loss[39] *= 2.5  # step 400
    loss[69] *= 2.0  # step 700
    f = _only(diagnose(_records(loss=loss)), "spikes")
    assert f.severity == "info" and f.steps == [400, 700]
    assert "at step 400 (local median" in f.evidence and "at step 700" in f.evidence
    loss[84] *= 3.0  # step 850: a third one
    assert _only(diagnose(_records(loss=loss)), "spikes").severity == "warning"


def test_epoch_drop():
    staircase = _fall(STEPS) * 0.6 ** ((STEPS - 1) // SPE)  # the loss steps down as each epoch starts
    findings = diagnose(_records(loss=staircase, noise=0.02))
    f = _only(findings, "epoch_drop")
    assert f.severity == "warning" and "epochs 2, 3, 4" in f.title
    assert "epoch 1 -> 2 at step 250:" in f.evidence and "epoch 3 -> 4 at step 750:" in f.evidence
    assert f.steps == [250, 500, 750]
    assert "num_train_epochs 1: the first drop follows it" in f.advice
    assert not [g for g in findings if g.rule in ("spikes", "divergence")]
    # without the epoch key, steps_per_epoch gives the boundaries
    records = _records(loss=staircase, noise=0.02)
    for r in records:
        del r["epoch"]
    assert _only(diagnose(records, RunInfo(steps_per_epoch=SPE)), "epoch_drop").steps == [250, 500, 750]
    assert not [g for g in diagnose(records) if g.rule == "epoch_drop"]


def test_too_low_without_eval_and_with_a_much_higher_eval():
    low = _fall(STEPS, 0.003)
    f = _only(diagnose(_records(loss=low)), "too_low")
    assert f.severity == "warning" and "no eval_loss" in f.title
    assert "over steps 760-1000" in f.evidence and "val_size" in f.advice
    f = _only(diagnose(_records(loss=low, eval_loss={s: 0.8 for s in EVAL_STEPS})), "too_low")
    assert f.severity == "warning" and "Memorisation" in f.title and "eval_loss 0.8 at step 1000" in f.evidence


def test_grad_explosion():
    rng = np.random.default_rng(1)
    grads = 0.5 * (1 + 0.2 * rng.standard_normal(len(STEPS)))
    grads[59] = 50.0  # step 600
    f = _only(diagnose(_records(grad_norm=grads)), "grad_explosion")
    assert f.severity == "warning" and f.steps == [600]
    assert f.evidence.startswith("grad_norm 50 at step 600 (running median 0.495, x101)")
    assert "max_grad_norm" in f.advice


def test_schedule():
    f = _only(diagnose(QUICKSTART, RunInfo(warmup_steps=80, total_steps=60)), "schedule")
    assert f.severity == "warning" and "warmup_steps 80 >= total steps 60" in f.evidence
    f = _only(diagnose([], RunInfo(warmup_steps=40, total_steps=60)), "schedule")
    assert f.severity == "info" and "warmup_steps 40 of 60 steps (67%)" in f.evidence
    f = _only(diagnose([], RunInfo(finetuning_type="full", learning_rate=2e-4)), "schedule")
    assert f.severity == "warning" and "1e-05" in f.evidence
    # the peak of the logged lr stands in for learning_rate
    assert _only(diagnose(QUICKSTART, RunInfo(finetuning_type="full")), "schedule").title.startswith("learning_rate 4.9e-04 ")
    assert diagnose([], RunInfo(finetuning_type="lora", learning_rate=2e-4, warmup_steps=3, total_steps=60)) == []


def test_findings_are_ordered_by_severity():
    loss = _fall(STEPS)
    loss[39] *= 2.5
    loss[59] = math.nan
    records = _records(loss=loss)
    findings = diagnose(records, RunInfo(finetuning_type="full", learning_rate=1e-3))
    assert [f.severity for f in findings] == ["error", "warning", "info"]
    assert str(findings[0]).startswith("error: Loss or gradients became NaN/inf at step 600\n  loss = nan")


# -- smoothing and reading ---------------------------------------------------------------------------


def test_smooth_is_tensorboards_debiased_ema():
    assert smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])
    assert smooth([0.0, 1.0]) == pytest.approx([0.0, 0.4 / 0.64])
    assert smooth([1.0, 2.0], weight=0) == [1.0, 2.0]
    out = smooth([1.0, math.nan, 1.0])
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        smooth([1.0], weight=1)


def test_read_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n\n{"step": 2, "loss": Infinity}\n{"step": 3, "lo', encoding="utf-8")
    records = read_metrics(path)  # the truncated last line is a write in progress
    assert [r["step"] for r in records] == [1, 2] and math.isnan(records[0]["loss"]) and records[1]["loss"] == math.inf
    path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(SftlabError, match=r"metrics.jsonl line 2: not valid JSON"):
        read_metrics(path)
    path.write_text('{"step": 1}\n{"step": 2, "lo\n', encoding="utf-8")  # a whole line (it has its newline) is malformed
    with pytest.raises(SftlabError, match="line 2"):
        read_metrics(path)
    path.write_text(json.dumps({"loss": 1.0}) + "\n", encoding="utf-8")
    with pytest.raises(SftlabError, match="line 1: not a metrics record"):
        read_metrics(path)
    with pytest.raises(SftlabError, match="cannot read"):
        read_metrics(tmp_path / "missing.jsonl")


def test_reading_and_reporting_metrics_import_no_torch():
    # sftlab report, --watch and the web UI's once-a-second refresh read metrics.jsonl: a second of imports each is not theirs to pay
    code = ("import sys, sftlab.report.metrics, sftlab.report.training_report, sftlab.report.live; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
