"""What protects a run: early stopping with the best model kept, and the NaN guard (with an injected NaN)."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_config
from sftlab.config import load_config
from sftlab.report.diagnose import RunInfo, diagnose
from sftlab.report.metrics import read_metrics
from sftlab.train import run as train_run
from sftlab.train.loop import NonFiniteLoss
from sftlab.train.run import run_training

WORDS = "apple river stone cloud green seven table music horse paper light ocean winter silver garden candle".split()


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_early_stopping_keeps_the_best_model_of_a_run_forced_to_overfit(tmp_path, tiny_model_dir):
    # Answers are random words: nothing generalises, so held-out loss falls (format, word list) then rises (memorising).
    rng = random.Random(0)
    rows = [{"instruction": f"Code word {i}?", "input": "", "output": " ".join(rng.choice(WORDS) for _ in range(4))} for i in range(16)]
    (tmp_path / "codes.json").write_text(json.dumps(rows))
    cfg = load_config(write_config(
        tmp_path / "c.yaml", model_name_or_path=str(tiny_model_dir), dataset=str(tmp_path / "codes.json"), output_dir=str(tmp_path / "out"),
        finetuning_type="full", val_size=6, per_device_train_batch_size=5, learning_rate=0.01, lr_scheduler_type="constant",
        max_steps=80, logging_steps=5, eval_steps=5, save_steps=1000, save_total_limit=1, cutoff_len=64, plot_loss=False,
        early_stopping_patience=2, load_best_model_at_end=True))
    out = run_training(cfg)

    records = _records(out)
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    best_step, best = min(evals, key=lambda e: e[1])
    last = records[-1]
    assert last["step"] < 80, "it trained to the end: no early stop"
    # stopped after exactly `patience` evaluations without a new best
    assert [s for s, _ in evals][-3] == best_step and all(loss > best for _, loss in evals[-2:])
    assert (last["best_step"], last["best_eval_loss"]) == (best_step, best) and last["train_runtime"] > 0 and last["early_stopped"]
    assert evals[-1][1] > best + 0.05  # it really was overfitting

    # the best checkpoint survives save_total_limit=1 next to the last one, and it is the final model
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({f"checkpoint-{best_step}", f"checkpoint-{last['step']}"})
    final, at_best = load_file(out / "model.safetensors"), load_file(out / f"checkpoint-{best_step}" / "model.safetensors")
    at_last = load_file(out / f"checkpoint-{last['step']}" / "model.safetensors")
    assert final.keys() == at_best.keys()
    assert all(torch.equal(final[k], at_best[k]) for k in final)
    assert not all(torch.equal(final[k], at_last[k]) for k in final)
    state = json.loads((out / f"checkpoint-{last['step']}" / "trainer_state.json").read_text())
    assert state["early_stopped"] and state["best_step"] == best_step


def test_early_stopping_needs_evaluations(tmp_path, tiny_model_dir, alpaca_file):
    with pytest.raises(Exception, match="early_stopping_patience needs evaluations during training.*eval_steps"):
        load_config(None, [], model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_file), early_stopping_patience=3, val_size=2)


def _nan_at(monkeypatch, steps: set[int]):
    """Make the embeddings output NaN on the given (1-based) forward calls: one call per training step here."""
    calls = [0]
    load = train_run.load_model

    def load_with_fault(*args, **kw):
        model = load(*args, **kw)

        def hook(module, inputs, output):
            calls[0] += 1
            return output * math.nan if calls[0] in steps else output

        model.get_input_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_run, "load_model", load_with_fault)


def _guard_config(tmp_path, tiny_model_dir, alpaca_file, **over):
    values = dict(model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_file), output_dir=str(tmp_path / "out"),
                  per_device_train_batch_size=8, max_steps=5, logging_steps=1, save_steps=1, learning_rate=1e-3, cutoff_len=128)
    return load_config(write_config(tmp_path / "c.yaml", **{**values, **over}))


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, alpaca_file, monkeypatch):
    _nan_at(monkeypatch, {3})
    cfg = _guard_config(tmp_path, tiny_model_dir, alpaca_file, save_steps=10)
    with pytest.raises(NonFiniteLoss) as err:
        run_training(cfg)
    message = str(err.value)
    out = tmp_path / "out"
    assert "step 3: the loss is nan" in message and str(out / "checkpoint-2") in message and "learning_rate" in message
    assert "\n" not in message
    # the state before the bad step is a complete checkpoint with finite weights; nothing after it exists
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    weights = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "adapter_model.safetensors").exists()  # no final model that looks valid
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and math.isnan(records[-1]["loss"])
    [finding] = [f for f in diagnose(records, RunInfo()) if f.rule == "non_finite"]
    assert finding.steps == [3]

    # after the fix (here: no more fault), the run resumes from that checkpoint
    monkeypatch.undo()
    out = run_training(cfg.model_copy(update={"resume_from_checkpoint": True}))
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4, 5] and math.isfinite(_records(out)[-1]["loss"])


def test_nan_policy_skip_step_drops_the_bad_update_and_goes_on(tmp_path, tiny_model_dir, alpaca_file, monkeypatch):
    _nan_at(monkeypatch, {3})
    out = run_training(_guard_config(tmp_path, tiny_model_dir, alpaca_file, nan_policy="skip_step"))
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert math.isnan(records[2]["loss"]) and records[3]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in records[3:])
    # step 3 changed nothing: its checkpoint holds step 2's weights
    two, three = (load_file(out / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (2, 3))
    assert all(torch.equal(two[k], three[k]) for k in two)
    four = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    assert not all(torch.equal(three[k], four[k]) for k in three)
    assert json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())["skipped_steps"] == 1
    assert (out / "report.html").is_file()  # the report is written with the NaN in the curve
    [finding] = [f for f in diagnose(read_metrics(out / "metrics.jsonl"), RunInfo()) if f.rule == "non_finite"]
    assert finding.severity == "warning" and finding.title.startswith("1 step(s)") and finding.steps == [3]


def test_nan_policy_skip_step_still_stops_a_broken_run(tmp_path, tiny_model_dir, alpaca_file, monkeypatch):
    _nan_at(monkeypatch, set(range(2, 100)))
    with pytest.raises(NonFiniteLoss, match="10 steps in a row were not finite"):
        run_training(_guard_config(tmp_path, tiny_model_dir, alpaca_file, nan_policy="skip_step", max_steps=20, save_steps=100))
