"""sftlab data convert (round trips, what a format cannot hold) and sftlab data sample."""

import json

import pytest

from sftlab.data.convert import convert, sample_rows
from sftlab.data.formats import FormatSpec, detect_format, to_messages, to_tools
from sftlab.data.rows import iter_rows
from sftlab.data.sources import Source
from sftlab.errors import SftlabError
from conftest import sftlab_cli

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
OPENAI_ROWS = [
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "3+3 is 6"}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "18C."}],
     "tools": TOOLS},
    {"messages": [{"role": "user", "content": "城市？"}, {"role": "assistant", "content": "北京"}]},
]


def _source(path):
    return [Source(str(path), [path], None)]


def _read(path):
    """(messages, tools) of every row of a converted file, read back the way training reads it."""
    rows = [r.value for r in iter_rows(_source(path)[0])]
    spec = detect_format(list(rows[0]), rows[0])
    return [(to_messages(r, spec), to_tools(r, spec)) for r in rows]


def _write(path, rows, jsonl=True):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) if jsonl else json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("to", ["messages", "sharegpt"])
def test_chats_with_reasoning_and_tools_round_trip(tmp_path, to):
    src = _write(tmp_path / "in.jsonl", OPENAI_ROWS)
    result = convert(_source(src), tmp_path / "out.jsonl", to)
    assert (result.rows, result.written, dict(result.skipped), dict(result.lost)) == (3, 3, {}, {})
    original = [(to_messages(r, FormatSpec("openai")), to_tools(r, FormatSpec("openai"))) for r in OPENAI_ROWS]
    assert _read(tmp_path / "out.jsonl") == original
    back = convert(_source(tmp_path / "out.jsonl"), tmp_path / "back.json", "messages")  # .json: one array
    assert back.written == 3 and json.loads((tmp_path / "back.json").read_text())[2] == OPENAI_ROWS[2]


def test_alpaca_keeps_history_and_says_what_it_cannot_hold(tmp_path):
    src = _write(tmp_path / "in.jsonl", OPENAI_ROWS)
    result = convert(_source(src), tmp_path / "out.jsonl", "alpaca")
    assert (result.rows, result.written) == (3, 2)
    [(reason, n)] = result.skipped.items()
    assert n == 1 and "tool calls" in reason and result.examples[reason] == [f"{src}:2"]
    [(lost, n)] = result.lost.items()
    assert n == 1 and lost.startswith("reasoning_content") and result.examples[lost] == [f"{src}:1"]
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert first == {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be terse.", "history": [["2+2?", "4"]]}
    # alpaca → messages → alpaca: training reads the same conversations at every step
    convert(_source(tmp_path / "out.jsonl"), tmp_path / "m.jsonl", "messages")
    convert(_source(tmp_path / "m.jsonl"), tmp_path / "a.jsonl", "alpaca")
    assert _read(tmp_path / "a.jsonl") == _read(tmp_path / "out.jsonl")


def test_sharegpt_names_text_beside_tool_calls_as_lost(tmp_path):
    row = {"messages": [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "content": "Let me check.", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
    result = convert(_source(_write(tmp_path / "in.jsonl", [row])), tmp_path / "out.jsonl", "sharegpt")
    assert result.written == 1 and len(result.lost) == 2
    assert {k.split(" (")[0] for k in result.lost} == {"assistant text beside tool calls", "tool call ids"}


def test_invalid_rows_are_skipped_and_named_and_nothing_convertible_writes_no_file(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q2"\n{"instruction": "q3", "output": 5}\n', encoding="utf-8")
    result = convert(_source(src), tmp_path / "out.jsonl", "messages")
    assert (result.rows, result.written, sum(result.skipped.values())) == (3, 1, 2)
    [(reason, refs)] = result.examples.items()
    assert "sftlab data check" in reason and refs[0].startswith(f"{src}:2 (malformed JSON") and refs[1].startswith(f"{src}:3 (expected text")
    bad = _write(tmp_path / "bad.jsonl", [{"instruction": "q", "output": 1}])
    with pytest.raises(SftlabError, match="no sample could be converted"):
        convert(_source(bad), tmp_path / "none.jsonl", "messages")
    assert not list(tmp_path.glob("*none*"))  # no file, not even a temporary one


def test_sample_is_seeded_uniform_and_in_file_order(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(60)])
    b = _write(tmp_path / "b.json", [{"instruction": f"b{i}", "output": "x"} for i in range(40)], jsonl=False)
    sources = _source(a) + _source(b)
    picked = sample_rows(sources, 10, seed=1)
    refs = [row.ref for _, row in picked]
    assert len(set(refs)) == 10 and refs == [row.ref for _, row in sample_rows(sources, 10, seed=1)]
    assert refs != [row.ref for _, row in sample_rows(sources, 10, seed=2)]
    order = [(sources.index(s), row.index) for s, row in picked]
    assert order == sorted(order)
    assert len(sample_rows(sources, 500)) == 100
    # uniform: over many seeds every row is drawn about equally often (10 of 100 → 10 % each)
    hits = [0] * 100
    for seed in range(300):
        for s, row in sample_rows(sources, 10, seed=seed):
            hits[sources.index(s) * 60 + row.index] += 1
    assert min(hits) > 10 and max(hits) < 60  # expectation 30, binomial sd ~5


def test_cli_sample_and_convert(tmp_path):
    src = _write(tmp_path / "in.jsonl", OPENAI_ROWS)
    run = lambda *args: sftlab_cli("data", *args, cwd=tmp_path)  # noqa: E731
    shown = run("sample", str(src), "--n", "2", "-o", str(tmp_path / "s.jsonl"))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("── ") == 2 and "assistant" in shown.stdout and len((tmp_path / "s.jsonl").read_text().splitlines()) == 2
    done = run("convert", str(src), str(tmp_path / "a.jsonl"), "--to", "alpaca")
    assert done.returncode == 0 and "2 of 3 samples written" in done.stdout and "not written: tools or tool calls" in done.stdout
    wrong = run("convert", str(src), str(tmp_path / "x.jsonl"), "--to", "csv")
    assert wrong.returncode == 2 and "choose one of messages, sharegpt, alpaca" in wrong.stderr


def test_bad_convert_target_file_and_sample_size_are_named(tmp_path):
    src = _write(tmp_path / "in.jsonl", OPENAI_ROWS)
    with pytest.raises(SftlabError, match=r"out\.csv: write to a \.jsonl \(or \.json\) file"):
        convert(_source(src), tmp_path / "out.csv", "messages")
    with pytest.raises(SftlabError, match="--n 0: ask for at least one sample"):
        sample_rows(_source(src), 0)
