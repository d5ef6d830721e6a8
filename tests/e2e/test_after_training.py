"""After training, on a tiny model: eval (loss, generation, scores), the before/after comparison in train,
compare, predict, chat through stdin, and export through the CLI."""

import json
import math

import pytest
import torch

from conftest import ALPACA_ROWS, sftlab_cli, write_config
from sftlab.config import load_config
from sftlab.evaluate.results import EvalResults, read_predictions
from sftlab.train.run import run_training


def _cli(*args, **kw):
    return sftlab_cli(*args, **kw)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    """A tiny LoRA run with the before/after evaluation on its validation split (generation and json_fields)."""
    tmp = tmp_path_factory.mktemp("after")
    data = tmp / "data.json"
    rows = ALPACA_ROWS + [{"instruction": "As JSON", "input": f"item {i}", "output": f'{{"item": {i}}}'} for i in range(8)]
    data.write_text(json.dumps(rows), encoding="utf-8")
    cfg = write_config(tmp / "config.yaml", model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp / "out"),
                       max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3, lora_rank=4, cutoff_len=128, val_size=4,
                       logging_steps=2, save_steps=100, do_eval_baseline=True, predict_with_generate=True,
                       eval_scorers=["json_valid"], max_new_tokens=8, export_dir=str(tmp / "export"))
    run_training(load_config(cfg))
    return cfg, tmp / "out"


def test_train_evaluates_before_and_after_and_compares(trained_run):
    cfg, out = trained_run
    base, tuned = EvalResults.read(out / "eval_baseline"), EvalResults.read(out / "eval")
    assert base.adapter is None and tuned.adapter == str(out) and base.n_samples == tuned.n_samples == 4
    for r in (base, tuned):
        assert {"eval_loss", "perplexity", "bleu-4", "chrf", "rouge-l", "exact_match", "json_valid"} <= r.metrics.keys()
        assert r.metrics["perplexity"] == pytest.approx(math.exp(r.metrics["eval_loss"]), rel=1e-4)
    assert tuned.metrics["eval_loss"] < base.metrics["eval_loss"]  # trained on similar samples, lr 3e-3
    # the tuned eval loss is training's own final eval_loss on the same split (same encoding, same tokens)
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line][-1]
    assert tuned.metrics["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-4)
    preds = read_predictions(out / "eval")
    name = load_config(cfg).dataset[0]  # a file's samples are named by its path
    assert [p.index for p in preds] == [0, 1, 2, 3] and all(p.ref.startswith(f"{name} sample ") for p in preds)
    assert {p.prompt for p in preds} == {p.prompt for p in read_predictions(out / "eval_baseline")}
    assert all(set(p.scores) == set(tuned.metrics) - {"eval_loss", "perplexity"} for p in preds)
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert "| eval_loss | lower |" in md and (out / "compare.html").is_file()


def test_eval_cli_matches_the_training_evaluation(trained_run):
    cfg, out = trained_run
    run = _cli("eval", str(cfg), "-o", str(out / "again"))
    assert run.returncode == 0, run.stderr
    again, tuned = EvalResults.read(out / "again"), EvalResults.read(out / "eval")
    assert again.metrics == pytest.approx(tuned.metrics, rel=1e-4)  # loaded from disk = the model in memory after training
    assert [p.prediction for p in read_predictions(out / "again")] == [p.prediction for p in read_predictions(out / "eval")]
    assert "eval_loss" in run.stdout and "json_valid" in run.stdout


def test_eval_cli_with_baseline_compares_before_and_after(trained_run):
    cfg, out = trained_run
    run = _cli("eval", str(cfg), "--baseline", "-o", str(out / "again_b"))
    assert run.returncode == 0, run.stderr
    base, tuned = EvalResults.read(out / "again_b_baseline"), EvalResults.read(out / "again_b")
    assert base.adapter is None and tuned.adapter == str(out)
    assert base.metrics == pytest.approx(EvalResults.read(out / "eval_baseline").metrics, rel=1e-4)  # as training measured it
    assert run.stdout.index("base: ") < run.stdout.index("tuned: ") < run.stdout.index("comparison: ")
    assert (out / "again_b_compare.md").is_file() and (out / "again_b_compare.html").is_file()


def test_eval_on_a_dataset_file_without_generation(trained_run, tmp_path):
    cfg, out = trained_run
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(3)), encoding="utf-8")
    run = _cli("eval", "--model", str(out), "--dataset", str(data), "--no-generate", "--latency", "-o", str(tmp_path / "r"))
    assert run.returncode == 0, run.stderr
    r = EvalResults.read(tmp_path / "r")
    assert r.adapter == str(out) and r.n_samples == 3 and set(r.metrics) == {"eval_loss", "perplexity"}
    assert not (tmp_path / "r" / "generated_predictions.jsonl").exists()
    # time = k·x + b over answers of exactly 1, 8, 32 and 64 tokens
    assert [p["new_tokens"] for p in r.latency["points"]] == [1, 8, 32, 64] and r.latency["per_token_s"] > 0
    assert r.latency["points"][-1]["seconds"] > r.latency["points"][0]["seconds"] and "ms/token" in run.stdout


def test_predict_and_chat_answer_as_eval_generates(trained_run, tmp_path):
    """predict, chat (stdin) and eval all render with the trained template and decode greedily: same answers."""
    cfg, out = trained_run
    data = load_config(cfg).dataset[0]
    run = _cli("predict", str(cfg), "--dataset", data, "-o", str(tmp_path / "p.jsonl"))
    assert run.returncode == 0, run.stderr
    predicted = {p["ref"]: p for p in map(json.loads, (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines())}
    assert len(predicted) == 16 and "16 predictions" in run.stdout
    for p in read_predictions(out / "eval"):  # the validation samples, answered by training's evaluation
        assert predicted[p.ref]["prediction"] == p.prediction and predicted[p.ref]["prompt"] == p.prompt

    say_hi = predicted[f"{data} sample 0"]  # "Say hi": one line, as chat reads one line per turn
    script = "Say hi\n/system Be brief.\nSay hi\n/bogus\n/clear\nSay hi\n/exit\nnever read\n"
    chat = _cli("chat", str(cfg), input=script)
    assert chat.returncode == 0, chat.stderr
    lines = chat.stdout.splitlines()
    assert lines[0] == say_hi["prediction"]  # streamed, token by token = the batched greedy answer
    assert lines[1] == "(system prompt set; conversation cleared)" and lines[3].startswith("unknown command /bogus")
    assert lines[4] == "(conversation cleared)" and lines[5] == lines[2]  # /clear keeps the system prompt, drops the turns
    assert "never read" not in chat.stdout and len(lines) == 6


def test_export_cli_merges_the_adapter(trained_run, tmp_path):
    cfg, out = trained_run
    run = _cli("export", str(cfg))
    assert run.returncode == 0, run.stderr
    export = out.parent / "export"
    assert (export / "model.safetensors").is_file() and (export / "chat_template.jinja").is_file()
    assert not (export / "adapter_config.json").exists()
    info = json.loads((export / "export.json").read_text())
    assert info["merged"] and info["max_abs_diff"] < 1e-4

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:]
    chat = _cli("chat", str(cfg), input="Say hi\n")
    assert chat.returncode == 0, chat.stderr
    assert tokenizer.decode(new, skip_special_tokens=True).strip() == chat.stdout.strip()  # plain transformers = sftlab chat
    merged = _cli("chat", "--model", str(export), "--max-new-tokens", "8", input="Say hi\n")  # the merged model in chat
    assert merged.returncode == 0 and merged.stdout == chat.stdout


def test_training_writes_the_report_and_the_cli_renders_it_again(trained_run):
    cfg, out = trained_run
    page = (out / "report.html").read_text(encoding="utf-8")  # written at the end of training (plot_loss: true)
    for png in ("training_loss.png", "training_eval_loss.png", "training_lr.png", "training_grad_norm.png", "training_token_accuracy.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
    assert page.count('<img src="data:image/png;base64,') >= 4 and "Diagnosis" in page
    assert "Before → after training" in page and "exact_match" in page and "per_device_train_batch_size: 4" in page
    (out / "report.html").unlink()
    run = _cli("report", str(out))
    assert run.returncode == 0, run.stderr
    assert (out / "report.html").is_file() and f"report: {out / 'report.html'}" in run.stdout
    missing = _cli("report", str(out.parent))
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr


def test_after_training_commands_name_what_is_missing(tmp_path, tiny_model_dir, alpaca_file):
    from sftlab.config import ConfigError

    with pytest.raises(ConfigError, match="do_eval_baseline: true needs an evaluation set; set val_size"):
        load_config(None, [], model_name_or_path="m", dataset="d", do_eval_baseline=True)
    cfg = write_config(tmp_path / "c.yaml", model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_file),
                       output_dir=str(tmp_path / "never"), finetuning_type="lora")
    cases = [
        (("eval",), "give a training config, or the model with --model"),
        (("eval", str(cfg), "oops"), "extra argument 'oops': arguments after the config are key=value overrides"),
        (("eval", str(cfg)), "holds no trained adapter yet; train first"),
        (("export", "--model", str(tiny_model_dir)), "no export_dir: set it in the config or pass --export-dir"),
        (("eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path)), "not a LoRA adapter directory (no adapter_config.json)"),
    ]
    for args, message in cases:
        run = _cli(*args)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)


def test_eval_of_a_config_without_a_validation_split_asks_for_a_dataset(trained_run):
    cfg, _ = trained_run
    run = _cli("eval", str(cfg), "val_size=0", "do_eval_baseline=false")
    assert run.returncode == 2 and "no evaluation set (val_size: 0 and no eval_dataset); give --dataset to evaluate on" in run.stderr, run.stderr
