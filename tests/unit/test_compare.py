"""eval_results.json / generated_predictions.jsonl round trips and errors, and sftlab compare's table, samples and reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sftlab.errors import SftlabError
from sftlab.evaluate.compare import compare, main_score
from sftlab.evaluate.metrics import score
from sftlab.evaluate.results import PREDICTIONS_FILE, RESULTS_FILE, EvalResults, Prediction, read_predictions
from sftlab.report.compare_report import write_compare_report

PROMPTS = ["What is 2+2?", "Capital of France?", "把这句话翻译成英文：你好", "Say <b>hi</b>", "Name a colour.", "JSON please"]
REFERENCES = ["4", "Paris", "Hello", "hi", "blue", '{"ok": true}']


def _preds(rouge: list[float], answers: list[str] | None = None, prompts: list[str] = PROMPTS,
           extra: dict[str, list[float]] | None = None) -> list[Prediction]:
    answers = answers or [f"answer {i}" for i in range(len(prompts))]
    return [Prediction(i, f"data/test.jsonl:{i + 1}", prompts[i], REFERENCES[i], answers[i],
                       {"rouge-l": rouge[i], **{k: v[i] for k, v in (extra or {}).items()}})
            for i in range(len(prompts))]


def _results(metrics: dict[str, float], adapter: str | None = None) -> EvalResults:
    return EvalResults(model="HuggingFaceTB/SmolLM2-135M-Instruct", adapter=adapter, dataset=["data/test.jsonl"],
                       n_samples=len(PROMPTS), metrics=metrics, generation={"max_new_tokens": 64, "do_sample": False})


BASE = {"eval_loss": 2.0, "perplexity": math.exp(2.0), "bleu-4": 10.0, "rouge-l": 30.0, "exact_match": 20.0}
TUNED = {"eval_loss": 1.5, "perplexity": math.exp(1.5), "bleu-4": 12.5, "rouge-l": 25.0, "exact_match": 20.0, "json_valid": 90.0}
BASE_ROUGE = [10.0, 50.0, 40.0, 80.0, 30.0, 0.0]
TUNED_ROUGE = [90.0, 50.0, 60.0, 20.0, 25.0, 100.0]  # changes: +80, 0, +20, -60, -5, +100


# ---------------------------------------------------------------- files


def test_results_and_predictions_round_trip(tmp_path):
    results = _results({**TUNED, "perplexity": float("inf")}, adapter="out/lora")
    results.latency = {"first_token_s": 0.2, "per_token_s": 0.01, "tokens_per_s": 100.0, "r2": 0.99, "n_points": 6}
    preds = _preds(TUNED_ROUGE, ["4", "Paris", "你好→Hello", "<b>hi</b>", "blue", '{"ok": true}'])
    written = results.write(tmp_path / "run", preds)
    assert [p.name for p in written] == [PREDICTIONS_FILE, RESULTS_FILE]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted([PREDICTIONS_FILE, RESULTS_FILE])  # no temp files left
    raw = json.loads((tmp_path / "run" / RESULTS_FILE).read_text(encoding="utf-8"))  # strict JSON: inf became null
    assert raw["metrics"]["perplexity"] is None and raw["adapter"] == "out/lora"
    assert "你好→Hello" in (tmp_path / "run" / PREDICTIONS_FILE).read_text(encoding="utf-8")  # not \u-escaped

    back = EvalResults.read(tmp_path / "run")
    assert back == EvalResults(**{**results.__dict__, "metrics": {**TUNED, "perplexity": None}})
    assert EvalResults.read(tmp_path / "run" / RESULTS_FILE) == back
    for path in (tmp_path / "run", tmp_path / "run" / RESULTS_FILE, tmp_path / "run" / PREDICTIONS_FILE):
        assert read_predictions(path) == preds
    assert back.label == "out/lora"


def test_missing_and_malformed_files_are_one_line_errors_naming_the_file(tmp_path):
    with pytest.raises(SftlabError, match=f"{tmp_path / 'nope'}: no such file"):
        EvalResults.read(tmp_path / "nope")
    assert read_predictions(tmp_path, missing_ok=True) is None
    with pytest.raises(SftlabError, match=f"{PREDICTIONS_FILE}: no such file"):
        read_predictions(tmp_path)

    path = tmp_path / RESULTS_FILE
    good = {"model": "m", "adapter": None, "dataset": ["d.jsonl"], "n_samples": 3, "metrics": {"eval_loss": 1.0}}
    cases = [("{not json", "not valid JSON"), ("[1]", "expected a JSON object"),
             (json.dumps({**good, "model": None}), "'model' is NoneType, expected str"),
             (json.dumps({k: v for k, v in good.items() if k != "n_samples"}), "missing 'n_samples'"),
             (json.dumps({**good, "n_samples": True}), "'n_samples' is bool"),
             (json.dumps({**good, "metrics": {"bleu-4": "high"}}), "metric 'bleu-4' is 'high'")]
    for text, message in cases:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(SftlabError) as e:
            EvalResults.read(tmp_path)
        assert str(e.value).startswith(str(path)) and message in str(e.value) and "\n" not in str(e.value)
    path.write_text(json.dumps({**good, "future_key": 1}), encoding="utf-8")
    assert EvalResults.read(path).n_samples == 3  # keys from a newer sftlab are ignored

    lines = [json.dumps({"index": 0, "ref": "a:1", "prompt": "p", "reference": "r", "prediction": "x", "scores": {}}),
             json.dumps({"index": "1", "ref": "a:2", "prompt": "p", "reference": "r", "prediction": "x"})]
    (tmp_path / PREDICTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SftlabError, match=f"{PREDICTIONS_FILE}:2: not a valid prediction line .'index' is str"):
        read_predictions(tmp_path)


# ---------------------------------------------------------------- compare


def _comparison(tmp_path: Path, top: int = 2):
    """Both runs written and read back, as sftlab compare will."""
    _results(BASE).write(tmp_path / "base", _preds(BASE_ROUGE))
    _results(TUNED, "out/lora").write(tmp_path / "tuned", _preds(TUNED_ROUGE, ["4", "Paris", "Hello", "<b>bye</b>", "red", '{"ok": true}']))
    runs = [tmp_path / "base", tmp_path / "tuned"]
    return compare(*map(EvalResults.read, runs), *map(read_predictions, runs), top=top)


def test_compare_metrics_direction_and_deltas(tmp_path):
    c = _comparison(tmp_path)
    by_name = {m.name: m for m in c.metrics}
    assert list(by_name) == ["eval_loss", "perplexity", "bleu-4", "rouge-l", "exact_match", "json_valid"]
    assert by_name["eval_loss"].delta == -0.5 and by_name["eval_loss"].lower_is_better
    assert by_name["eval_loss"].verdict == "better"  # lower loss
    assert by_name["perplexity"].verdict == "better"
    assert by_name["bleu-4"].delta == 2.5 and by_name["bleu-4"].verdict == "better"
    assert by_name["rouge-l"].delta == -5.0 and by_name["rouge-l"].verdict == "worse"  # lower score
    assert by_name["exact_match"].verdict == "same"
    json_valid = by_name["json_valid"]  # only the tuned run has it
    assert (json_valid.before, json_valid.after, json_valid.delta, json_valid.verdict) == (None, 90.0, None, "")


def test_compare_picks_the_samples_that_changed_most(tmp_path):
    c = _comparison(tmp_path, top=2)
    assert c.key == "rouge-l"
    assert [(s.index, s.delta) for s in c.improved] == [(5, 100.0), (0, 80.0)]
    assert [(s.index, s.delta) for s in c.regressed] == [(3, -60.0), (4, -5.0)]
    assert c.deltas == [80.0, 0.0, 20.0, -60.0, -5.0, 100.0]
    assert c.counts == (3, 2, 1)
    worst = c.regressed[0]
    assert (worst.ref, worst.before, worst.after, worst.prompt) == ("data/test.jsonl:4", "answer 3", "<b>bye</b>", "Say <b>hi</b>")
    assert [s.index for s in _comparison(tmp_path, top=5).improved] == [5, 0, 2]


def test_a_task_scorer_is_the_main_per_sample_score():
    assert main_score(["bleu-4", "rouge-l", "exact_match", "json_fields", "regex:x"]) == "json_fields"
    assert main_score(["bleu-4", "chrf", "rouge-l", "exact_match"]) == "rouge-l"
    assert main_score(["exact_match"]) == "exact_match"
    assert main_score([]) is None
    c = compare(_results(BASE), _results(TUNED), _preds(BASE_ROUGE, extra={"json_fields": [0, 0, 0, 0, 50, 50]}),
                _preds(TUNED_ROUGE, extra={"json_fields": [0, 0, 0, 100, 50, 0]}), top=3)
    assert c.key == "json_fields"
    assert [s.index for s in c.improved] == [3] and [s.index for s in c.regressed] == [5]
    with pytest.raises(SftlabError, match="'chrf' is not in both runs"):
        compare(_results(BASE), _results(TUNED), _preds(BASE_ROUGE), _preds(TUNED_ROUGE), key="chrf")


def test_compare_refuses_predictions_of_different_datasets():
    other = [*PROMPTS[:2], "A different question", *PROMPTS[3:]]
    with pytest.raises(SftlabError, match=r"different datasets: sample 2 \(data/test.jsonl:3\) has a different prompt"):
        compare(_results(BASE), _results(TUNED), _preds(BASE_ROUGE), _preds(TUNED_ROUGE, prompts=other))
    with pytest.raises(SftlabError, match=r"different datasets \(6 and 5 samples"):
        compare(_results(BASE), _results(TUNED), _preds(BASE_ROUGE), _preds(TUNED_ROUGE)[:5])


def test_compare_without_predictions_compares_metrics_only():
    c = compare(_results(BASE), _results(TUNED), _preds(BASE_ROUGE), None)
    assert c.key is None and c.improved is None and len(c.metrics) == 6
    assert "the tuned run has no generated predictions" in c.note
    assert "tuned run has no generated predictions" in c.markdown()


def test_markdown_has_the_table_and_the_samples(tmp_path):
    md = _comparison(tmp_path).markdown()
    assert "| metric | better when | base | tuned | change | result |" in md
    assert "| eval_loss | lower | 2.0000 | 1.5000 | -0.5000 | better |" in md
    assert "| rouge-l | higher | 30.00 | 25.00 | -5.00 | worse |" in md
    assert "| json_valid | higher | – | 90.00 | – |  |" in md
    assert "3 improved, 2 regressed, 1 unchanged" in md
    improved, regressed = md.split("### Improved most")[1].split("### Regressed most")
    assert "Sample 5 (`data/test.jsonl:6`): rouge-l 0.00 → 100.00 (+100.00)" in improved
    assert "Sample 3 (`data/test.jsonl:4`): rouge-l 80.00 → 20.00 (-60.00)" in regressed
    assert "```text\n<b>bye</b>\n```" in regressed


def test_html_report_is_written_with_the_table_and_escaped_answers(tmp_path):
    c = _comparison(tmp_path)
    written = write_compare_report(c, tmp_path / "compare.html")
    assert [p.name for p in written] == ["compare.deltas.png", "compare.html"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    page = (tmp_path / "compare.html").read_text(encoding="utf-8")
    assert "<th>metric</th><th>better when</th>" in page
    assert "<td>eval_loss</td><td>lower</td><td>2.0000</td><td>1.5000</td><td>-0.5000</td><td>better</td>" in page
    assert "&lt;b&gt;bye&lt;/b&gt;" in page and "<b>bye</b>" not in page
    assert "Regressed most" in page and "data:image/png;base64," in page


def test_compare_of_scored_runs_end_to_end(tmp_path):
    """score() fills both runs; a tuned model that answers more samples exactly ranks them as improved."""
    base_answers = ["5", "Lyon", "Hi", "hi", "green", "{}"]
    tuned_answers = ["4", "Paris", "Hi", "hi", "blue", '{"ok": true}']
    runs = []
    for name, answers in (("base", base_answers), ("tuned", tuned_answers)):
        s = score(answers, REFERENCES, ["json_valid"])
        preds = [Prediction(i, f"data/test.jsonl:{i + 1}", PROMPTS[i], REFERENCES[i], a, s.per_sample[i]) for i, a in enumerate(answers)]
        _results(s.corpus).write(tmp_path / name, preds)
        runs.append(tmp_path / name)
    c = compare(*map(EvalResults.read, runs), *map(read_predictions, runs), top=10)
    assert c.key == "json_valid"  # the task scorer ranks the samples
    em = next(m for m in c.metrics if m.name == "exact_match")
    assert (em.before, em.after, em.verdict) == (pytest.approx(100 / 6, abs=1e-3), pytest.approx(500 / 6, abs=1e-3), "better")
    assert c.counts == (0, 0, 6)  # both answer JSON where JSON parses: "5" and "{}" are JSON too
    rouge = compare(*map(EvalResults.read, runs), *map(read_predictions, runs), top=10, key="rouge-l")
    assert sorted(s.index for s in rouge.improved) == [0, 1, 4, 5] and rouge.regressed == []


def test_compare_dirs_compares_two_folders_and_writes_md_and_html(tmp_path):
    from sftlab.evaluate.comparison import compare_dirs

    _results(BASE).write(tmp_path / "eval_baseline", _preds(BASE_ROUGE))
    _results(TUNED).write(tmp_path / "eval", _preds(TUNED_ROUGE))
    comparison, files = compare_dirs(tmp_path / "eval_baseline", tmp_path / "eval" / RESULTS_FILE, tmp_path / "compare")
    assert {p.name for p in files} >= {"compare.md", "compare.html"} and all(p.is_file() for p in files)
    assert (tmp_path / "compare.md").read_text(encoding="utf-8") == comparison.markdown()
    assert next(m for m in comparison.metrics if m.name == "eval_loss").verdict == "better"
    assert comparison.improved  # the samples were compared too
    with pytest.raises(SftlabError, match="nope"):
        compare_dirs(tmp_path / "nope", tmp_path / "eval", tmp_path / "compare")


def test_evaluate_runs_with_a_baseline_evaluates_both_and_compares(tmp_path, tiny_model_dir, alpaca_file):
    """--model without an adapter: the baseline is the same model, so before and after agree exactly."""
    from sftlab.config import load_config
    from sftlab.evaluate.runs import evaluate_runs
    from sftlab.model.load import locate_trained

    cfg = load_config(None, [], model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_file), predict_with_generate=False)
    seen = []
    compared = evaluate_runs(cfg, locate_trained(str(tiny_model_dir)), tmp_path / "eval", from_config=False, validation=False,
                             baseline=True, max_samples=3, on_run=seen.append)
    assert [(r.which, r.out_dir.name) for r in seen] == [("base", "eval_baseline"), ("tuned", "eval")]
    assert seen[0].results.n_samples == 3 and seen[0].results.metrics == seen[1].results.metrics
    assert EvalResults.read(tmp_path / "eval") == seen[1].results
    comparison, files = compared
    assert (tmp_path / "compare.md") in files and [m.verdict for m in comparison.metrics if m.name == "eval_loss"] == ["same"]
    assert evaluate_runs(cfg, seen[1].trained, tmp_path / "r", from_config=False, validation=False, max_samples=1) is None
    assert (tmp_path / "r" / RESULTS_FILE).is_file() and not (tmp_path / "r_baseline").exists()
