"""Answer scores (BLEU, chrF, ROUGE with jieba, exact match, task scorers) and the latency fit, on hand-checkable strings."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from sftlab.errors import SftlabError
from sftlab.evaluate.metrics import (METRICS, RougeTokenizer, fit_latency, json_fields, json_valid, parse_json,
                                     resolve_scorers, score)

# ---------------------------------------------------------------- overlap metrics


def test_identical_answers_score_100_everywhere_in_english_and_chinese():
    texts = ["The capital of France is Paris.", "北京是中国的首都。", "GPT-4 是一个模型"]
    s = score(texts, texts)
    assert list(s.corpus) == list(METRICS)
    assert s.corpus == {k: 100.0 for k in METRICS}
    assert s.per_sample == [{k: 100.0 for k in METRICS}] * 3


def test_rouge_on_a_partial_english_overlap():
    # ref: the cat sat on the mat / pred: the cat lay on a rug; shared unigrams the, cat, on (3 of 6 each side),
    # shared bigram "the cat" (1 of 5 each side), longest common subsequence "the cat on" (3)
    s = score(["The cat lay on a rug"], ["the cat sat on the mat"]).per_sample[0]
    assert s["rouge-1"] == 50.0
    assert s["rouge-2"] == 20.0
    assert s["rouge-l"] == 50.0
    assert s["exact_match"] == 0.0


def test_tokenizer_keeps_non_ascii_letters_and_digits_and_segments_chinese():
    tok = RougeTokenizer()
    assert tok.tokenize("Café GPT-4, naïve_Ünïcode!") == ["café", "gpt", "4", "naïve", "ünïcode"]
    assert tok.tokenize("我喜欢吃苹果") == ["我", "喜欢", "吃", "苹果"]
    assert tok.tokenize("ＧＰＴ模型") == ["gpt", "模型"]  # full-width Latin folded (NFKC), then split from the Han run


def test_chinese_rouge_is_right_where_the_default_tokenizer_gives_zero():
    ref, pred = "我喜欢吃苹果", "我喜欢吃香蕉"  # 我/喜欢/吃/苹果 vs 我/喜欢/吃/香蕉
    assert RougeScorer(["rouge1"]).score(ref, pred)["rouge1"].fmeasure == 0.0  # why we pass our own tokenizer
    s = score([pred], [ref]).per_sample[0]
    assert s["rouge-1"] == 75.0  # 3 of 4 words
    assert s["rouge-2"] == pytest.approx(200 / 3, abs=1e-4)  # 我喜欢, 喜欢吃 of 3 bigrams
    assert s["rouge-l"] == 75.0


def test_bleu_exact_is_100_disjoint_is_0_and_empty_answers_do_not_crash():
    s = score(["a b c d e", "foo bar baz qux", "", ""], ["a b c d e", "one two three four", "some reference", ""])
    assert [p["bleu-4"] for p in s.per_sample] == [100.0, 0.0, 0.0, 100.0]
    assert [p["rouge-1"] for p in s.per_sample] == [100.0, 0.0, 0.0, 100.0]
    assert [p["exact_match"] for p in s.per_sample] == [100.0, 0.0, 0.0, 100.0]
    assert s.corpus["exact_match"] == 50.0
    assert s.corpus["rouge-1"] == 50.0


def test_bleu_uses_the_zh_tokenizer_for_chinese_references():
    preds, refs = ["我喜欢猫", "the cat sat on the mat"], ["我喜欢狗", "the cat sat on a mat"]
    s = score(preds, refs)
    zh = sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score
    assert s.corpus["bleu-4"] == pytest.approx(zh, abs=1e-4)
    assert zh != pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)  # 13a sees one "word" per Chinese sentence
    # per sample: zh for the Chinese pair (13a would give 0), 13a for the English one
    assert s.per_sample[0]["bleu-4"] == pytest.approx(sacrebleu.sentence_bleu(preds[0], [refs[0]], tokenize="zh").score, abs=1e-4)
    assert s.per_sample[0]["bleu-4"] > 50
    assert s.per_sample[1]["bleu-4"] == pytest.approx(sacrebleu.sentence_bleu(preds[1], [refs[1]]).score, abs=1e-4)
    english = score(preds[1:], refs[1:])
    assert english.corpus["bleu-4"] == pytest.approx(sacrebleu.corpus_bleu(preds[1:], [refs[1:]], tokenize="13a").score, abs=1e-4)


def test_chrf_matches_sacrebleu():
    preds, refs = ["the cat sat on the mat", "模型很好"], ["a cat sat on a mat", "模型非常好"]
    s = score(preds, refs)
    assert s.corpus["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score, abs=1e-4)
    for p, r, sample in zip(preds, refs, s.per_sample):
        assert sample["chrf"] == pytest.approx(sacrebleu.sentence_chrf(p, [r]).score, abs=1e-4)
        assert 0 < sample["chrf"] < 100


def test_exact_match_strips_surrounding_whitespace_only():
    s = score([" 42\n", "42.", "4 2"], ["42", "42", "42"])
    assert [p["exact_match"] for p in s.per_sample] == [100.0, 0.0, 0.0]
    assert s.corpus["exact_match"] == pytest.approx(100 / 3, abs=1e-4)


def test_score_refuses_an_empty_set():
    with pytest.raises(SftlabError, match="empty"):
        score([], [])


# ---------------------------------------------------------------- task scorers


def test_json_valid_accepts_plain_and_fenced_json():
    assert json_valid('{"a": 1}', "") == 1.0
    assert json_valid('```json\n{"a": [1, 2]}\n```', "") == 1.0
    assert json_valid('Here it is:\n```\n{"a": 1}\n```\nDone.', "") == 1.0
    assert json_valid('{"a": 1', "") == 0.0
    assert json_valid("```json\nnot json\n```", "") == 0.0
    assert parse_json('```JSON\n[1]\n```') == [1]


def test_json_fields_counts_equal_top_level_fields():
    ref = '{"name": "Ada", "age": 36, "admin": true, "tags": ["x", "y"]}'
    assert json_fields('{"name": "Ada", "age": 36.0, "admin": true, "tags": ["x", "y"], "extra": 1}', ref) == 1.0
    # age wrong, admin 1 is not true, tags in another order, name right
    assert json_fields('{"name": "Ada", "age": 37, "admin": 1, "tags": ["y", "x"]}', ref) == 0.25
    assert json_fields('```json\n{"name": "Ada", "age": 36}\n```', ref) == 0.5
    assert json_fields('["Ada", 36]', ref) == 0.0
    assert json_fields("Ada, 36", ref) == 0.0
    assert json_fields('{"a": 1}', "{}") == 1.0


def test_json_fields_names_the_sample_whose_reference_is_not_an_object():
    with pytest.raises(SftlabError, match=r"data/test\.jsonl:8: scorer 'json_fields'.*not"):
        score(['{"a": 1}', '{"a": 1}'], ['{"a": 1}', "[1, 2]"], ["json_fields"], names=["data/test.jsonl:7", "data/test.jsonl:8"])


def test_task_scores_are_on_0_to_100_with_corpus_means():
    s = score(["123", "12a", '{"a": 1}'], ["x", "x", "x"], ["regex:^\\d+$", "json_valid"])
    assert list(s.corpus) == [*METRICS, "regex:^\\d+$", "json_valid"]
    assert [p["regex:^\\d+$"] for p in s.per_sample] == [100.0, 0.0, 0.0]
    assert [p["json_valid"] for p in s.per_sample] == [100.0, 0.0, 100.0]  # "123" is JSON too
    assert s.corpus["json_valid"] == pytest.approx(200 / 3, abs=1e-4)


def test_user_scorer_from_a_file_and_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "helpera_scorers.py").write_text(
        "def shorter(prediction, reference):\n    return len(prediction) <= len(reference)\n"
        "def half(prediction, reference):\n    return 0.5\n"
        "NOT_A_FUNCTION = 3\n"
        "def too_big(prediction, reference):\n    return 2\n"
        "def broken(prediction, reference):\n    raise KeyError('boom')\n", encoding="utf-8")
    by_file = f"{tmp_path / 'helpera_scorers.py'}:shorter"
    s = score(["short", "much longer answer"], ["reference", "ref"], [by_file])
    assert [p[by_file] for p in s.per_sample] == [100.0, 0.0]

    monkeypatch.syspath_prepend(str(tmp_path))
    s = score(["a"], ["b"], ["helpera_scorers:half"])
    assert s.per_sample[0]["helpera_scorers:half"] == 50.0

    with pytest.raises(SftlabError, match="not a function"):
        resolve_scorers(["helpera_scorers:NOT_A_FUNCTION"])
    with pytest.raises(SftlabError, match="has no 'missing'"):
        resolve_scorers(["helpera_scorers:missing"])
    with pytest.raises(SftlabError, match=r"sample 0: scorer 'helpera_scorers:too_big' returned 2; .*\[0, 1\]"):
        score(["a"], ["b"], ["helpera_scorers:too_big"])
    with pytest.raises(SftlabError, match="sample 0: scorer 'helpera_scorers:broken' raised KeyError"):
        score(["a"], ["b"], ["helpera_scorers:broken"])


def test_bad_scorer_names_fail_up_front_with_one_line(tmp_path):
    (tmp_path / "bad.py").write_text("import no_such_module_helpera\n", encoding="utf-8")
    cases = {
        "json_vaild": "unknown scorer 'json_vaild'; use one of: json_valid, json_fields, regex:PATTERN",
        "regex:(": "bad regular expression",
        "no_such_module_helpera:fn": "cannot import module 'no_such_module_helpera'",
        f"{tmp_path / 'missing.py'}:fn": "no file",
        f"{tmp_path / 'bad.py'}:fn": "cannot load",
    }
    for name, message in cases.items():
        with pytest.raises(SftlabError) as e:
            resolve_scorers([name])
        assert message in str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(SftlabError, match="twice"):
        resolve_scorers(["json_valid", "json_valid"])


# ---------------------------------------------------------------- latency


def test_latency_fit_recovers_a_noiseless_line_exactly():
    k, b = 0.021, 0.35
    fit = fit_latency([(x, k * x + b) for x in (1, 7, 20, 128, 300)])
    assert fit.per_token_s == pytest.approx(k, rel=1e-9)
    assert fit.first_token_s == pytest.approx(b, rel=1e-9)
    assert fit.tokens_per_s == pytest.approx(1 / k, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.n_points == 5
    assert set(fit.to_dict()) == {"first_token_s", "per_token_s", "tokens_per_s", "r2", "n_points"}


def test_latency_fit_is_close_on_noisy_timings():
    rng = np.random.default_rng(0)
    k, b = 0.02, 0.5
    xs = rng.integers(1, 512, size=200)
    fit = fit_latency([(int(x), k * x + b + rng.normal(0, 0.02)) for x in xs])
    assert fit.per_token_s == pytest.approx(k, rel=0.02)
    assert fit.first_token_s == pytest.approx(b, abs=0.02)
    assert 0.99 < fit.r2 < 1.0


def test_latency_fit_needs_two_lengths():
    with pytest.raises(SftlabError, match="2 different lengths"):
        fit_latency([(64, 1.0), (64, 1.1)])
    with pytest.raises(SftlabError):
        fit_latency([])
    flat = fit_latency([(10, 1.0), (20, 1.0)])  # time that does not grow with length has no tokens/s
    assert flat.tokens_per_s is None and flat.r2 == 1.0


# ---------------------------------------------------------------- which samples are evaluated


def test_eval_reads_at_most_max_samples_of_each_dataset(tmp_path):
    """The config's max_samples (LLaMA-Factory's key) limits eval as it limits training; --max-samples wins over it."""
    import json

    from sftlab.config import load_config
    from sftlab.evaluate.runs import eval_samples

    files = []
    for name in ("a", "b"):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps({"instruction": f"{name}{i}", "output": "x"}) + "\n" for i in range(10)))
    cfg = load_config(None, [], model_name_or_path="m", dataset=[str(f) for f in files], max_samples=3)
    samples, _ = eval_samples(cfg, None, validation=False)
    assert [s.row["instruction"] for s in samples] == ["a0", "a1", "a2", "b0", "b1", "b2"]
    samples, _ = eval_samples(cfg, None, validation=False, max_samples=1)
    assert [s.row["instruction"] for s in samples] == ["a0", "b0"]
