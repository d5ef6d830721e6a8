"""sftlab data stats: lengths exactly as training encodes them, the CDF / cutoff numbers, turns, language mix,
diversity, openings, and the command writing its report."""

import json
import random
import statistics
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import sftlab_cli
from sftlab.cli import app
from sftlab.config import load_config
from sftlab.data import stats as stats_module
from sftlab.data.pipeline import build_data, encode_options
from sftlab.data.render import IGNORE_INDEX
from sftlab.data.sources import resolve_sources
from sftlab.data.stats import MALFORMED, UNREADABLE, compute_stats


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(*turns):
    """chat("q1", "a1", "q2", "a2") → an openai-format row."""
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]}


def measure(path, tokenizer, model_dir, cutoff_len=2048, **kw):
    cfg = load_config(None, [], model_name_or_path=str(model_dir), dataset=str(path), dataset_dir=str(path.parent))
    return compute_stats(resolve_sources(cfg.dataset, cfg.dataset_dir), tokenizer, cutoff_len=cutoff_len,
                         options=encode_options(cfg, tokenizer), **kw)


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def ranks(values):
    """1-based ranks, ties sharing their average rank."""
    ordered = sorted(values)
    return [(ordered.index(v) + 1 + len(ordered) - ordered[::-1].index(v)) / 2 for v in values]


def test_lengths_percentiles_and_smallest_cutoffs_on_known_lengths(tmp_path, smol_tokenizer, smol_dir):
    # 200 samples whose answers are k repeated words, k = 1..200, in a seeded shuffled order
    ks = list(range(1, 201))
    random.Random(0).shuffle(ks)
    rows = [{"instruction": "Repeat the word" + " please" * (k % 5), "input": "", "output": " ".join(["hello"] * k)} for k in ks]
    path = write_jsonl(tmp_path / "known.jsonl", rows)
    st = measure(path, smol_tokenizer, smol_dir, cutoff_len=150)

    # independently: the prompt is the template's render up to the generation prompt; the answer is the
    # answer text and its end-of-turn token, tokenized on its own
    prompts, answers = [], []
    for row in rows:
        user = [{"role": "user", "content": row["instruction"]}]
        prompts.append(n_tokens(smol_tokenizer, smol_tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)))
        answers.append(n_tokens(smol_tokenizer, row["output"] + "<|im_end|>"))
    assert st.samples == st.rows == 200 and not st.skipped
    assert st.prompt.tolist() == prompts and st.answer.tolist() == answers
    lengths = sorted(p + a for p, a in zip(prompts, answers))
    assert len(set(lengths)) > 190  # the order statistics below pick distinct values

    def smallest_cutoff(percent):  # by definition: the least c that keeps >= percent % of samples whole
        return next(c for c in range(lengths[-1] + 1) if sum(n <= c for n in lengths) * 100 >= percent * len(lengths))

    for percent in (90, 95, 99, 100):
        assert st.cutoff_for(percent) == smallest_cutoff(percent)
    assert st.cutoff_for(99) != st.cutoff_for(100) and st.cutoff_for(95) != st.cutoff_for(99)
    d = st.to_dict()
    assert d["cutoff_for"] == {str(p): smallest_cutoff(p) for p in (90, 95, 99, 100)}
    assert d["tokens"]["length"]["min"] == lengths[0] and d["tokens"]["length"]["max"] == lengths[-1]
    assert d["tokens"]["length"]["p50"] == lengths[99] and d["tokens"]["length"]["p90"] == lengths[179]
    assert d["tokens"]["answer"]["mean"] == pytest.approx(sum(answers) / 200, abs=0.01)
    assert d["cdf"][0] == lengths[0] and d["cdf"][100] == lengths[-1] and d["cdf"][50] == lengths[99]
    over = sum(n > 150 for n in lengths)
    assert 10 < over < 190
    assert d["over_cutoff"]["count"] == over and d["over_cutoff"]["share"] == over / 200
    assert d["over_cutoff"]["advice"].startswith(f"recommended cutoff_len: {smallest_cutoff(99)} ")
    assert d["turns"] == {"1": 200}
    assert d["answer_vs_prompt"]["pearson"] == pytest.approx(statistics.correlation(prompts, answers), abs=1e-4)
    assert d["answer_vs_prompt"]["spearman"] == pytest.approx(statistics.correlation(ranks(prompts), ranks(answers)), abs=1e-4)
    assert len(d["answer_vs_prompt"]["scatter"]) == 200
    json.dumps(d)  # serialisable as it is


def test_prompt_answer_split_and_cutoff_match_training(tmp_path, smol_tokenizer, smol_dir):
    rows = [
        {"instruction": "Say hi", "input": "", "output": "Hi there!"},
        {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be terse.", "history": [["2+2?", "4"], ["1+1?", "2"]]},
        {"instruction": "Write a long line", "input": "please", "output": " ".join(["word"] * 40)},
        {"instruction": "Two turns", "input": "", "output": "last " * 10, "history": [["first?", "first answer " * 8]]},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    st = measure(path, smol_tokenizer, smol_dir)
    cfg = load_config(None, [], model_name_or_path=str(smol_dir), dataset=str(path))
    trained = build_data(cfg, smol_tokenizer).train
    assert len(trained) == st.samples == 4
    for i, sample in enumerate(trained):
        labels = sample["labels"]
        is_trained = [label != IGNORE_INDEX for label in labels]
        last = max(j for j, t in enumerate(is_trained) if t)
        assert st.answer[i] == sum(is_trained)
        assert st.prompt[i] == last + 1 - sum(is_trained)
    assert st.turns.tolist() == [1, 3, 1, 2]

    # the smallest cutoff covering 100 % keeps every sample whole in training; one token less changes the longest
    longest = st.cutoff_for(100)
    kept = build_data(load_config(None, [], model_name_or_path=str(smol_dir), dataset=str(path), cutoff_len=longest), smol_tokenizer)
    assert kept.report.counts == Counter(kept=4)
    cut = build_data(load_config(None, [], model_name_or_path=str(smol_dir), dataset=str(path), cutoff_len=longest - 1), smol_tokenizer)
    assert cut.report.counts["kept"] == 4 - st.over(longest - 1) == 3


def test_turns_language_mix_and_skipped_rows(tmp_path, smol_tokenizer, smol_dir):
    path = tmp_path / "lang.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in [
        chat("hello there", "general kenobi"),                       # latin
        chat("你好", "世界和平", "再见", "好的"),                        # cjk, 2 turns
        chat("cat", "猫咪", "dog", "小狗", "bird", "鸟"),               # mixed: 10 Latin letters, 5 CJK; 3 turns
        chat("Привет", "Здравствуйте"),                               # another script
    ]]
    lines.insert(2, '{"messages": [')  # malformed JSON at line 3
    lines.append(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))  # line 6: no assistant turn
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    d = measure(path, smol_tokenizer, smol_dir).to_dict()

    assert d["rows"] == 6 and d["samples"] == 4
    assert d["skipped"] == {UNREADABLE: 1, MALFORMED: 1}
    assert d["skipped_examples"][UNREADABLE][0].startswith(f"{path}:3 (malformed JSON")
    assert d["skipped_examples"][MALFORMED][0].startswith(f"{path}:6 (the conversation has no assistant turn")
    assert d["turns"] == {"1": 2, "2": 1, "3": 1}
    assert d["language"]["samples"] == {"cjk": 1, "latin": 1, "other": 1, "mixed": 1}
    latin = len("hellotheregeneralkenobi") + len("catdogbird")
    cjk = len("你好世界和平再见好的") + len("猫咪小狗鸟")
    cyrillic = len("ПриветЗдравствуйте")
    assert d["language"]["cjk_char_share"] == pytest.approx(cjk / (latin + cjk + cyrillic))


def test_distinct_ngrams_of_answer_tokens(tmp_path, smol_tokenizer, smol_dir):
    answers = ["the cat sat on the mat", "the cat sat on the hat", "a dog ran", "the cat sat on the mat"]
    path = write_jsonl(tmp_path / "div.jsonl", [chat(f"q{i}", a) for i, a in enumerate(answers)])
    st = measure(path, smol_tokenizer, smol_dir)
    # independently: each answer's tokens (its end-of-turn token is special, so not counted); n-grams per answer
    seqs = [smol_tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    for n in (1, 2, 3):
        grams = [tuple(s[i:i + n]) for s in seqs for i in range(len(s) - n + 1)]
        assert st.ngrams[n] == len(grams)
        assert st.distinct_ngrams[n] == len(set(grams))
    d = st.to_dict()["diversity"]
    assert d["method"] == "exact"
    assert d["distinct"]["1"] == pytest.approx(len({t for s in seqs for t in s}) / sum(map(len, seqs)))
    assert d["distinct"]["3"] == pytest.approx(len(set(grams)) / len(grams))  # grams: the 3-grams
    assert d["distinct"]["3"] < 1  # the repeated answer repeats its 3-grams


def test_hyperloglog_matches_datasketch_and_estimates_large_sets(monkeypatch):
    from datasketch import HyperLogLogPlusPlus

    keys = np.random.default_rng(0).integers(0, 2**63, 3000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    ours = stats_module._Distinct()
    ours.registers = np.zeros(1 << stats_module._HLL_P, np.int8)
    ours.add(keys)
    theirs = HyperLogLogPlusPlus(p=stats_module._HLL_P, hashfunc=lambda x: x)
    for k in keys.tolist():
        theirs.update(k)
    assert np.array_equal(ours.registers, theirs.reg)

    monkeypatch.setattr(stats_module, "_EXACT_LIMIT", 10_000)  # switch to HyperLogLog early
    distinct = stats_module._Distinct()
    values = stats_module._mix(np.random.default_rng(1).integers(0, 60_000, 200_000).astype(np.uint64))
    for chunk in np.array_split(values, 50):
        distinct.add(np.unique(chunk))
    count, exact = distinct.count()
    assert not exact and distinct.registers is not None
    assert count == pytest.approx(len(np.unique(values)), rel=0.03)


def test_most_repeated_openings(tmp_path, smol_tokenizer, smol_dir):
    rows = ([chat("Tell me about cats please", f"Sure, here is a fact {i}.") for i in range(3)]
            + [chat("Tell me about dogs", f"As an AI language model, I {i}") for i in range(2)]
            + [chat("讲个故事吧", f"好的，以下是一个故事{i}") for i in range(2)]
            + [chat("why", "Because.", "why again", "sure, HERE IS more")])
    path = write_jsonl(tmp_path / "open.jsonl", rows)
    d = measure(path, smol_tokenizer, smol_dir).to_dict()["openings"]
    answers = {o["opening"]: (o["count"], o["share"]) for o in d["answers"]}
    assert answers["sure, here is a"] == (3, 3 / 9)  # 4 words, lowercased; "sure, HERE IS more" has a different 4th word
    assert answers["as an ai language"] == (2, 2 / 9)
    assert answers["好的，以下是一个"] == (2, 2 / 9)  # CJK: first 8 characters
    assert d["answers"][0]["opening"] == "sure, here is a"
    prompts = {o["opening"]: o["count"] for o in d["prompts"]}
    assert prompts["tell me about cats"] == 3 and prompts["讲个故事吧"] == 2 and prompts["why"] == 1
    assert d["exact"]


def test_two_workers_give_the_same_numbers(tmp_path, smol_tokenizer, smol_dir):
    rows = [chat(f"question {i} " * (i % 5 + 1), "answer " * (i % 13 + 1)) for i in range(600)]
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    one = measure(path, smol_tokenizer, smol_dir).to_dict()
    two = measure(path, smol_tokenizer, smol_dir, workers=2).to_dict()
    one.pop("seconds"), two.pop("seconds")
    assert one == two and one["samples"] == 600


def test_cli_writes_report_and_json(tmp_path, smol_dir):
    data = write_jsonl(tmp_path / "data.jsonl", [chat(f"q{i}", "answer " * (i + 1)) for i in range(30)]
                       + [chat("q", "a", "q2", "b")])
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["data", "stats", str(data), "--model", str(smol_dir), "--cutoff-len", "40", "-o", str(out),
                                      "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "recommended cutoff_len:" in result.output and f"wrote {out / 'stats.html'}" in result.output
    html = (out / "stats.html").read_text(encoding="utf-8")
    assert html.count('src="data:image/png;base64,') == 4  # histogram, CDF, turns, scatter
    assert all((out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in ("length_histogram", "length_cdf", "turns"))
    summary = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert summary["samples"] == 31 and summary["cutoff_len"] == 40 and summary["turns"] == {"1": 30, "2": 1}
    assert 0 < summary["over_cutoff"]["count"] < 31
    assert not list(out.glob(".*.tmp"))

    # from a training config, with a key=value override
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model_name_or_path: {smol_dir}\ndataset: {data}\ncutoff_len: 64\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["data", "stats", "--config", str(cfg), "cutoff_len=32", "-o", str(tmp_path / "r2"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r2" / "stats.json").read_text())["cutoff_len"] == 32


def test_cli_needs_data_and_model_or_a_config(tmp_path):
    run = sftlab_cli("data", "stats", "x.jsonl", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == ("error: give the data and the model (sftlab data stats data.jsonl --model MODEL) "
                                                   "or a training config (sftlab data stats --config train.yaml)")


def test_summary_lines_of_a_small_stats():
    """The lines both front ends show: coverage cutoffs, over-length share, turns, languages, diversity, openings."""
    from sftlab.data.stats import Stats, summary_lines

    st = Stats(["x.jsonl"], cutoff_len=9, rows=11, prompt=np.arange(1, 11, dtype=np.int32), answer=np.ones(10, np.int32),
               turns=np.array([1] * 9 + [2], np.int32), language=np.array([1] * 8 + [0] * 2, np.int8), cjk_chars=20, letters=100,
               ngrams={1: 20, 2: 10}, distinct_ngrams={1: 10, 2: 10}, answer_openings=[("Sure, here is", 3)], answers=6)
    st.skipped[UNREADABLE] = 1
    assert summary_lines(st.to_dict(), see="the report") == [  # lengths 2..11
        "10 samples of 11 rows (skipped unreadable row: 1; see the report)",
        "smallest cutoff_len keeping 90/95/99/100 % whole: 10 / 11 / 11 / 11",
        "over cutoff_len 9: 2 (20.00%)",
        "assistant turns: 1: 90.0%, 2: 10.0%",
        "language: 20.0% of letters CJK; samples cjk 20.0%, latin 80.0%",
        "distinct-1/2/3 of answers: 0.5000 / 1.0000 / n/a (exact)",
        "most repeated answer opening: 'Sure, here is' (50.0%)",
        "answer vs prompt length: Pearson None, Spearman None",  # answers all one token long: undefined
    ]
    assert summary_lines(st.to_dict())[0] == "10 samples of 11 rows (skipped unreadable row: 1)"
    assert summary_lines(Stats([], 2048).to_dict()) == [
        "0 samples of 0 rows", "smallest cutoff_len keeping 90/95/99/100 % whole: None / None / None / None", "over cutoff_len 2048: 0 (0.00%)"]


def test_stats_for_config_measures_as_the_config_trains(tmp_path, smol_tokenizer, smol_dir):
    from sftlab.data.stats import stats_for_config

    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}?", "a " * (i + 1)) for i in range(6)])
    cfg = load_config(None, [], model_name_or_path=str(smol_dir), dataset=str(path), cutoff_len=12, max_samples=4)
    st = stats_for_config(cfg, smol_tokenizer)
    assert st.samples == 4 and st.cutoff_len == 12
    direct = compute_stats(resolve_sources(cfg.dataset, cfg.dataset_dir), smol_tokenizer, cutoff_len=12,
                           options=encode_options(cfg, smol_tokenizer), max_samples=4)
    assert st.length.tolist() == direct.length.tolist()
