"""Formats → messages, sources, mixing, splits and the report of dropped samples."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from conftest import ALPACA_ROWS, sftlab_cli
from sftlab.config import load_config
from sftlab.data.formats import FormatSpec, RowError, detect_format, to_messages
from sftlab.data.pipeline import build_data
from sftlab.data.render import IGNORE_INDEX


def test_alpaca_with_system_and_history():
    row = {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be terse.", "history": [["2+2?", "4"]]}
    assert to_messages(row, FormatSpec("alpaca")) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"},
    ]


def test_alpaca_joins_instruction_and_input_with_a_newline():
    row = {"instruction": "Translate", "input": "chat", "output": "cat"}
    assert to_messages(row, FormatSpec("alpaca"))[0] == {"role": "user", "content": "Translate\nchat"}


def test_sharegpt_with_custom_role_tags():
    spec = FormatSpec("sharegpt", {"messages": "dialog"}, {"role_tag": "speaker", "content_tag": "text", "user_tag": "Q", "assistant_tag": "A"})
    row = {"dialog": [{"speaker": "Q", "text": "hi"}, {"speaker": "A", "text": "hello"}]}
    assert to_messages(row, spec) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_openai_messages_and_prompt_completion():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}
    spec = detect_format(["messages"], row)
    assert spec.formatting == "openai" and [m["role"] for m in to_messages(row, spec)] == ["system", "user", "assistant"]
    pc = {"prompt": "P", "completion": "C"}
    assert to_messages(pc, detect_format(["prompt", "completion"], pc)) == [{"role": "user", "content": "P"}, {"role": "assistant", "content": "C"}]


@pytest.mark.parametrize("columns,expected", [
    (["instruction", "input", "output"], "alpaca"), (["conversations"], "sharegpt"), (["text"], "text"), (["foo"], None),
])
def test_detect_format(columns, expected):
    row = {"conversations": [{"from": "human", "value": "x"}]}
    spec = detect_format(columns, row)
    assert (spec.formatting if spec else None) == expected


@pytest.mark.parametrize("row,message", [
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "starts with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "role 'robot'"),
    ({"messages": []}, "empty"),
    ({"messages": [{"role": ["user"], "content": "q"}]}, "has role"),  # unhashable: a RowError, not a crash
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": {"f": 1}}]}, "list of objects"),
])
def test_bad_rows(row, message):
    with pytest.raises(RowError, match=message):
        to_messages(row, FormatSpec("openai"))


def _cfg(tiny_model_dir, **kw):
    return load_config(None, [], model_name_or_path=str(tiny_model_dir), **kw)


def test_several_datasets_are_mixed_and_registered_names_resolve(tmp_path, tiny_model_dir, alpaca_file):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(3)))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "chat.jsonl", "formatting": "sharegpt",
        "columns": {"messages": "messages"}, "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = build_data(_cfg(tiny_model_dir, dataset=f"mine,{alpaca_file}", dataset_dir=str(tmp_path)), tok)
    assert len(data.train) == 3 + len(ALPACA_ROWS) and data.eval is None
    assert data.report.counts["kept"] == 3 + len(ALPACA_ROWS)
    decoded = [tok.decode([t for t, l in zip(r["input_ids"], r["labels"]) if l != IGNORE_INDEX]) for r in data.train]
    assert "a0<|im_end|>" in decoded and "Paris<|im_end|>" in decoded


def test_val_split_is_deterministic_under_seed(tiny_model_dir, alpaca_file):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    a = build_data(_cfg(tiny_model_dir, dataset=str(alpaca_file), val_size=0.25, seed=1), tok)
    b = build_data(_cfg(tiny_model_dir, dataset=str(alpaca_file), val_size=0.25, seed=1), tok)
    c = build_data(_cfg(tiny_model_dir, dataset=str(alpaca_file), val_size=3, seed=2), tok)
    assert len(a.eval) == 2 and len(a.train) == len(ALPACA_ROWS) - 2 and len(c.eval) == 3
    assert a.eval["input_ids"] == b.eval["input_ids"]
    assert not set(map(tuple, a.eval["input_ids"])) & set(map(tuple, a.train["input_ids"]))


def test_max_samples_takes_the_first_rows(tiny_model_dir, alpaca_file):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(build_data(_cfg(tiny_model_dir, dataset=str(alpaca_file), max_samples=3), tok).train) == 3


def test_too_long_samples_are_counted_and_named(tmp_path, tiny_model_dir):
    rows = [{"instruction": "Short?", "input": "", "output": "Yes"}, {"instruction": "Long " * 200, "input": "", "output": "No"}] * 2
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = build_data(_cfg(tiny_model_dir, dataset=str(path), cutoff_len=64), tok)
    assert len(data.train) == 2 and data.report.counts == {"kept": 2, "too_long": 2}
    lines = data.report.lines()
    assert lines[0] == "2 of 4 samples will be trained"
    assert f"too_long: 2 — e.g. {path} sample 1" in lines[1] and "sample 3" in lines[1]
    kept = data.train["input_ids"]
    trained = sum(label != IGNORE_INDEX for labels in data.train["labels"] for label in labels)
    summary = data.report.summary()
    assert summary.startswith("Data: 4 samples read, 2 trained (2 train, 0 validation), 2 left out. ")
    assert "2 (50.0%) are over cutoff_len 64: 0 lost later turns, 2 dropped." in summary
    assert f"{sum(map(len, kept))} tokens, {trained} trained" in summary and "More than 5 % are over cutoff_len" in summary


def test_nothing_left_to_train_is_an_error(tmp_path, tiny_model_dir):
    path = tmp_path / "long.json"
    path.write_text(json.dumps([{"instruction": "Long " * 200, "input": "", "output": "No"}]))
    from sftlab.errors import SftlabError

    with pytest.raises(SftlabError, match="no sample is left to train on.*too_long: 1"):
        build_data(_cfg(tiny_model_dir, dataset=str(path), cutoff_len=64), AutoTokenizer.from_pretrained(tiny_model_dir))


def test_preview_text_marks_trained_spans_when_piped(tmp_path, tiny_model_dir, alpaca_file):
    from conftest import write_config

    cfg = write_config(tmp_path / "c.yaml", model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_file))
    out = sftlab_cli("data", "preview", cfg, "--n", "2")
    assert out.returncode == 0, out.stderr
    assert "<|im_start|>assistant\n[[Hi!<|im_end|>]]" in out.stdout and "[[4<|im_end|>]]" in out.stdout
    assert "sample 0 · kept" in out.stdout


def test_preview_json_carries_per_sample_warnings(tmp_path, tiny_model_dir):
    from conftest import write_config

    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "Short?", "input": "", "output": "Yes"}, {"instruction": "Long " * 200, "input": "", "output": "No"}]))
    cfg = write_config(tmp_path / "c.yaml", model_name_or_path=str(tiny_model_dir), dataset=str(path), cutoff_len=64,
                       default_system="You answer briefly.")
    out = sftlab_cli("data", "preview", cfg, "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert rows[0]["status"] == "kept" and rows[0]["warnings"] == []
    assert rows[1]["status"] == "too_long" and rows[1]["warnings"][0].startswith("not trained: too_long")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert "You answer briefly." in tok.decode(rows[0]["input_ids"])


@pytest.mark.parametrize("thinking,expected", [("train", "<think>\nTwo and two.\n</think>\n\n4<|im_end|>"), ("mask", "4<|im_end|>")])
def test_cot_file_through_the_pipeline(tmp_path, tiny_model_dir, thinking, expected):
    path = tmp_path / "cot.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "thinking": "Two and two.", "answer": "4"}) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = build_data(_cfg(tiny_model_dir, dataset=str(path), thinking=thinking), tok).train[0]
    assert tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != IGNORE_INDEX]) == expected


def test_training_names_rows_that_check_finds_wrong_but_still_trains(tmp_path, tiny_model_dir):
    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say nothing", "output": "   "},
            {"instruction": "Think", "output": "<think>unfinished"}, {"instruction": "Also nothing", "output": ""}]
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(rows))
    data = build_data(_cfg(tiny_model_dir, dataset=str(path)), AutoTokenizer.from_pretrained(tiny_model_dir))
    assert data.report.problems == {"empty answer": 2, "unbalanced <think>": 1}
    lines = data.report.lines()
    assert f"  check: empty answer: 2 — e.g. {path} sample 1; {path} sample 3 (sftlab data check lists why)" in lines
    assert any(line.startswith("  check: unbalanced <think>: 1 — e.g. ") and "sample 2" in line for line in lines)


def test_problems_are_counted_when_only_one_worker_shard_has_any(tmp_path, tiny_model_dir):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(600)]
    rows[590]["output"] = " "  # in the second of two shards
    path = tmp_path / "two_shards.json"
    path.write_text(json.dumps(rows))
    cfg = _cfg(tiny_model_dir, dataset=str(path), preprocessing_num_workers=2)
    data = build_data(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert data.report.problems == {"empty answer": 1} and data.report.problem_refs == {"empty answer": [f"{path} sample 590"]}


def test_a_batch_encodes_as_each_row_alone_and_bad_rows_stay_in_place(qwen_tokenizer):
    """encode_rows tokenizes a batch in one call; each row's result equals encoding it alone, and a row the
    format (or the template) refuses gets its error in its place without failing the batch."""
    from jinja2 import TemplateError

    from sftlab.data.pipeline import encode_options, encode_row, encode_rows

    cfg = load_config(None, [], model_name_or_path="qwen", dataset="x", cutoff_len=40)
    options = encode_options(cfg, qwen_tokenizer)
    spec = detect_format(["messages"], {"messages": [{"role": "user", "content": "q"}]})
    chat = lambda *turns: {"messages": [{"role": r, "content": c} for r, c in turns]}  # noqa: E731
    rows = [
        chat(("user", "Hi"), ("assistant", "Hello!")),
        {"messages": [{"role": "user", "content": "no answer"}]},                            # RowError
        chat(("user", "Long " * 30), ("assistant", "x")),                                    # too long for cutoff_len 40
        chat(("user", "a"), ("assistant", "b")),
        chat(("user", "2+2?"), ("assistant", "<think>\nadd\n</think>\n\n4"), ("user", "3+3?"), ("assistant", "6")),
    ]
    batch = encode_rows(rows, spec, qwen_tokenizer, options)
    assert len(batch) == len(rows) and isinstance(batch[1], RowError)
    for row, result in zip(rows, batch):
        try:
            alone = encode_row(row, spec, qwen_tokenizer, options)
        except (RowError, TemplateError) as e:
            assert type(result) is type(e) and str(result) == str(e)
            continue
        assert [(e.input_ids, e.labels, e.status) for e in result] == [(e.input_ids, e.labels, e.status) for e in alone]
    assert batch[2][0].status == "too_long" and batch[0][0].status == "kept" and len(batch[4]) == 2  # a view: history drops <think>
    assert encode_rows([rows[1]], spec, qwen_tokenizer, options)[0].args == batch[1].args  # a batch of only bad rows


def test_cached_encodings_are_keyed_by_the_encoding_code(tmp_path, tiny_model_dir, alpaca_file, monkeypatch):
    """datasets fingerprints a module-level map function by name only: a changed sftlab must not reuse
    encodings an older version cached. The same code and inputs do reuse them."""
    from sftlab.data import pipeline
    from sftlab.data.sources import resolve_sources

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = load_config(None, [], model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_file))
    source = resolve_sources(cfg.dataset, cfg.dataset_dir)[0]
    options = pipeline.encode_options(cfg, tokenizer)
    first = pipeline.encode_source(cfg, tokenizer, source, options).cache_files
    assert pipeline.encode_source(cfg, tokenizer, source, options).cache_files == first
    for changed in (dataclasses.replace(options, cutoff_len=options.cutoff_len // 2), dataclasses.replace(options, masking="all")):
        assert pipeline.encode_source(cfg, tokenizer, source, changed).cache_files != first
    monkeypatch.setattr(pipeline, "encoding_code_version", lambda: "another version")
    assert pipeline.encode_source(cfg, tokenizer, source, options).cache_files != first


_BUILD_DATA = """
import sys
import datasets
from transformers import AutoTokenizer
from sftlab.config import load_config
from sftlab.data.pipeline import build_data

datasets.logging.set_verbosity_info()
cfg = load_config(None, [], model_name_or_path=sys.argv[1], dataset=sys.argv[2])
build_data(cfg, AutoTokenizer.from_pretrained(sys.argv[1]))
"""


def test_a_new_process_reuses_the_cached_encodings(tmp_path, tiny_model_dir, alpaca_file):
    """The map's fingerprint hashes the EncodeOptions: the same in every process, so a second run of the same config
    on the same data encodes nothing again."""
    cache = tmp_path / "hf_datasets"
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}

    def build() -> tuple[str, dict]:
        done = subprocess.run([sys.executable, "-c", _BUILD_DATA, str(tiny_model_dir), str(alpaca_file)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stderr, {p: p.stat().st_mtime_ns for p in cache.rglob("cache-*.arrow")}

    first_log, first = build()
    second_log, second = build()
    assert first and second == first  # no cache file written or rewritten
    assert "Loading cached processed dataset" not in first_log and "Loading cached processed dataset" in second_log


class _Letters:
    """A tokenizer stand-in: token i decodes to the i-th letter."""

    def decode(self, ids):
        return "".join("abcdefgh"[i] for i in ids)


def test_preview_segments_group_tokens_by_whether_they_are_trained():
    from sftlab.data.pipeline import preview_heading, preview_segments

    row = {"ref": "d.jsonl:1", "status": "kept", "input_ids": [0, 1, 2, 3, 4, 5],
           "labels": [IGNORE_INDEX, IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]}
    assert preview_segments(row, _Letters()) == [("ab", False), ("cd", True), ("e", False), ("f", True)]
    assert preview_heading(row) == "d.jsonl:1 · kept · 6 tokens, 3 trained"
    assert preview_segments({**row, "input_ids": [], "labels": []}, _Letters()) == []
