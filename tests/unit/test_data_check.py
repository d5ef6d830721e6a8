"""sftlab data check: every problem kind on fixture files (exact line and kind, key words of the reason),
agreement with what training accepts, --max-errors, --json, exit codes through the real CLI."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sftlab.data.check import (
    BAD_TOOL_CALL, BAD_TOOLS, EMPTY_ANSWER, EMPTY_FIELD, KINDS, MISSING_FIELD, NO_ASSISTANT, NO_SAMPLES, REJECTED, ROLE_ORDER,
    UNBALANCED_THINK, UNKNOWN_ROLE, WRONG_TYPE, check_sources, row_problems,
)
from sftlab.data.formats import FormatSpec, to_messages, to_text, to_tools
from sftlab.data.rows import MALFORMED_JSON, NOT_AN_OBJECT, NOT_UTF8
from sftlab.data.sources import resolve_sources
from conftest import sftlab_cli

# Each fixture: (row, expected problems as (kind, words in the message)). A row is a JSON value written
# with json.dumps, or bytes written as they are (malformed JSON, bad UTF-8).
CALL = {"name": "weather", "arguments": {"city": "Paris"}}
TOOLS = json.dumps([{"name": "weather", "description": "Weather of a city", "parameters": {"type": "object"}}])

ALPACA = [
    ({"instruction": "Add 2 and 2.", "input": "", "output": "4"}, []),
    ({"instruction": "And 3?", "output": "7", "system": "Be brief.", "history": [["Add 2 and 2.", "4"]]}, []),
    ({"instruction": "", "input": "", "output": "x"}, [(EMPTY_FIELD, ["prompt", "'instruction'", "empty"])]),
    ({"instruction": "Hi", "output": "   "}, [(EMPTY_ANSWER, ["'output'", "whitespace"])]),
    ({"instruction": "Hi"}, [(MISSING_FIELD, ["'output'", "alpaca", "dataset_info.json"])]),
    (b'{"instruction": "Hi", "output": "a"', [(MALFORMED_JSON, ["column"])]),
    ([1, 2], [(NOT_AN_OBJECT, ["array"])]),
    ({"instruction": ["Hi"], "output": "a"}, [(WRONG_TYPE, ["'instruction'", "a list", "expected text"])]),
    ({"instruction": "Hi", "output": "a", "history": [["only one"]]},
     [(WRONG_TYPE, ["'history'[0]", "[instruction, answer] pair"])]),
    ({"instruction": "Hi \udc80", "output": "a"}, [(NOT_UTF8, ["'instruction'", "lone surrogate", "\\udc80"])]),
    (b'{"instruction": "Hi", "output": "caf\xe9"}', [(NOT_UTF8, ["byte", "UTF-8"])]),
    ({"instruction": "Hi", "output": "<think>hmm"}, [(UNBALANCED_THINK, ["'output'", "1 '<think>' but 0 '</think>'"])]),
    ({"instruction": "Hi", "output": "</think>a<think>b"}, [(UNBALANCED_THINK, ["before"])]),
    ({"instruction": "Hi", "output": "plan</think>Hello"}, []),  # the template opens the block (R1 style): fine
    ({"instruction": "Hi", "output": "<think>plan</think>  "}, [(EMPTY_ANSWER, ["reasoning", "no answer"])]),
    ({"instruction": "Hi", "output": 5, "history": "oops"},
     [(WRONG_TYPE, ["'history'", "text", "pairs"]), (WRONG_TYPE, ["'output'", "a number"])]),
]

SHAREGPT = [
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, []),
    ({"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": json.dumps(CALL)},
                        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}], "tools": TOOLS}, []),
    ({"conversations": []}, [(EMPTY_FIELD, ["'conversations'", "no turns"])]),
    ({"conversations": "Hi"}, [(WRONG_TYPE, ["'conversations'", "list of turns"])]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "a"}]},
     [(UNKNOWN_ROLE, ["'conversations'[1]", "'bot'", "'gpt'", "tags"])]),
    ({"conversations": [{"from": "gpt", "value": "a"}]}, [(ROLE_ORDER, ["starts with", "'conversations'[0]", "user"])]),
    ({"conversations": [{"from": "human", "value": "Hi"}]}, [(NO_ASSISTANT, ["nothing to train"])]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hey"}, {"from": "gpt", "value": "a"}]},
     [(ROLE_ORDER, ["'conversations'[1]", "second user turn"])]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]},
     [(ROLE_ORDER, ["'conversations'[2]", "second assistant turn"])]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "observation", "value": "x"}, {"from": "gpt", "value": "a"}]},
     [(ROLE_ORDER, ["'conversations'[1]", "tool result", "no tool call"])]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "{bad"},
                        {"from": "observation", "value": "x"}, {"from": "gpt", "value": "a"}]},
     [(BAD_TOOL_CALL, ["'conversations'[1]", "function_call", "not valid JSON"])]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": '{"arguments": {}}'},
                        {"from": "observation", "value": "x"}, {"from": "gpt", "value": "a"}]},
     [(BAD_TOOL_CALL, ["'conversations'[1]", "name"])]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "a"}], "tools": "[{bad"},
     [(BAD_TOOLS, ["'tools'", "not valid JSON"])]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "a"}], "tools": '{"name": "x"}'},
     [(BAD_TOOLS, ["'tools'", "list"])]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": 5}]},
     [(WRONG_TYPE, ["'conversations'[1].value", "a number"])]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
     [(EMPTY_ANSWER, ["'conversations'[1]", "empty"])]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "a"}, {"from": "system", "value": "S"},
                        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "b"}]},
     [(ROLE_ORDER, ["'conversations'[2]", "system turn", "not the first"])]),
    # ending in a user turn is untrained context, not a problem
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "Bye"}]}, []),
    ({"conversations": [{"from": "human", "value": "Hi"}, "Hello"]}, [(WRONG_TYPE, ["'conversations'[1]", "text", "'from'"])]),
    ({"conversations": [{"from": "human", "value": "<think>x</think></think>"}, {"from": "gpt", "value": "a"}]},
     [(UNBALANCED_THINK, ["'conversations'[0]", "1 '<think>' but 2 '</think>'"])]),
    ({"conversations": [{"value": "Hi"}, {"from": "gpt", "value": "a"}]}, [(MISSING_FIELD, ["'conversations'[0]", "no 'from'"])]),
]

_ASK = {"role": "user", "content": "Weather in Paris?"}
_CALL = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
OPENAI = [
    ({"messages": [{"role": "system", "content": "Be brief."}, _ASK, {"role": "assistant", "content": "Rain."}]}, []),
    ({"messages": [_ASK, {"role": "assistant", "content": None, "tool_calls": [_CALL]}, {"role": "tool", "content": "sunny"},
                   {"role": "assistant", "content": "Sunny.", "reasoning_content": "The tool says so."}]}, []),
    ({"messages": [_ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": '{"city": '}}]}]},
     [(BAD_TOOL_CALL, ["'messages'[1].tool_calls[0].function.arguments", "not valid JSON"])]),
    ({"messages": [_ASK, {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": {}}}]}]},
     [(BAD_TOOL_CALL, ["'messages'[1].tool_calls[0]", "name"])]),
    ({"messages": [_ASK, {"role": "assistant", "content": "", "tool_calls": {"name": "weather"}}]},
     [(WRONG_TYPE, ["'messages'[1].tool_calls", "an object", "list of tool calls"])]),
    ({"messages": {"role": "user", "content": "Hi"}}, [(WRONG_TYPE, ["'messages'", "an object"])]),
    ({"messages": [_ASK, {"role": "assistant", "content": None}]}, [(EMPTY_ANSWER, ["'messages'[1]", "empty"])]),
    ({"messages": [_ASK, {"role": "assistant", "content": "", "reasoning_content": "Let me think."}]},
     [(EMPTY_ANSWER, ["reasoning with no answer"])]),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]},
     [(EMPTY_FIELD, ["'messages'[0]", "whitespace"])]),
    ({"messages": [{"role": ["user"], "content": "Hi"}, {"role": "assistant", "content": "a"}]},
     [(UNKNOWN_ROLE, ["'messages'[0]", "['user']"])]),
    ({"messages": [_ASK, {"role": "assistant", "content": "a", "reasoning_content": 3}]},
     [(WRONG_TYPE, ["'messages'[1].reasoning_content", "a number"])]),
    ({"system": 5, "messages": [_ASK, {"role": "assistant", "content": "a"}]}, [(WRONG_TYPE, ["'system'", "a number"])]),
    ({"system": "S", "messages": [{"role": "system", "content": "T"}, _ASK, {"role": "assistant", "content": "a"}]},
     [(ROLE_ORDER, ["'messages'[0]", "system turn", "'system' field"])]),
    ({"messages": [_ASK, {"role": "assistant", "content": "<think>x</think>a", "reasoning_content": "<think>y"}]},
     [(UNBALANCED_THINK, ["'messages'[1] reasoning", "1 '<think>' but 0"])]),
]

PROMPT_COMPLETION = [
    ({"prompt": "Hi", "completion": "Hello"}, []),
    ({"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}, []),
    ({"prompt": "Hi", "completion": ""}, [(EMPTY_ANSWER, ["'completion'", "empty"])]),
    ({"prompt": [], "completion": "a"}, [(EMPTY_FIELD, ["'prompt'", "no turns"])]),
    ({"prompt": "Hi", "completion": []}, [(EMPTY_ANSWER, ["'completion'", "no turns"])]),
    ({"prompt": 3, "completion": "a"}, [(WRONG_TYPE, ["'prompt'", "a number"])]),
    ({"prompt": "Hi", "completion": [{"role": "user", "content": "x"}]},
     [(NO_ASSISTANT, ["no assistant"]), (ROLE_ORDER, ["'completion'[0]", "second user turn"])]),
]

COT = [
    ({"question": "2+2?", "thinking": "Add them.", "answer": "4"}, []),
    ({"question": "2+2?", "thinking": "Add them.", "answer": ""}, [(EMPTY_ANSWER, ["'answer'", "reasoning with no answer"])]),
    ({"question": "2+2?", "thinking": "<think>Add", "answer": "4"}, [(UNBALANCED_THINK, ["'answer' reasoning", "1 '<think>'"])]),
    ({"thinking": "t", "answer": "4"}, [(MISSING_FIELD, ["'question'", "cot"])]),
    ("just text", [(NOT_AN_OBJECT, ["a string"])]),
    (b'{"question": "q", "answer": }', [(MALFORMED_JSON, ["rest of the file"])]),  # stops the array: keep last
]

TEXT = [
    ({"text": "Once upon a time."}, []),
    ({"text": ""}, [(EMPTY_FIELD, ["'text'", "empty"])]),
    ({"text": 5}, [(WRONG_TYPE, ["'text'", "a number"])]),
    ({"body": "x"}, [(MISSING_FIELD, ["'text'", "text samples"])]),
]

# (name, table, JSON array?, spec as training detects it)
FIXTURES = [
    ("alpaca.jsonl", ALPACA, False, FormatSpec("alpaca")),
    ("sharegpt.json", SHAREGPT, True, FormatSpec("sharegpt", {"messages": "conversations"})),
    ("openai.jsonl", OPENAI, False, FormatSpec("openai", {"messages": "messages"})),
    ("pc.jsonl", PROMPT_COMPLETION, False, FormatSpec("prompt_completion")),
    ("cot.json", COT, True, FormatSpec("cot")),
    ("text.jsonl", TEXT, False, FormatSpec("text")),
]


def _dump(row) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row).encode("utf-8")


def write_fixture(tmp_path: Path, name: str, table, array: bool) -> tuple[Path, list[int]]:
    """The file, and each row's line number. JSONL gets a blank line after the first row (skipped, but counted)."""
    rows = [_dump(row) for row, _ in table]
    path = tmp_path / name
    if array:
        path.write_bytes(b"[\n" + b",\n".join(rows) + b"\n]\n")
        return path, [i + 2 for i in range(len(rows))]
    path.write_bytes(rows[0] + b"\n\n" + b"\n".join(rows[1:]) + b"\n")
    return path, [1] + [i + 2 for i in range(1, len(rows))]


def _line(ref: str) -> int:
    """The line of a ref: "data.jsonl:12", or "data.json:40 (sample 12)" in a JSON array."""
    return int(re.fullmatch(r".*:(\d+)(?: \(sample \d+\))?", ref).group(1))


@pytest.mark.parametrize("name,table,array,spec", FIXTURES, ids=[f[0] for f in FIXTURES])
def test_each_problem_at_its_line(tmp_path, name, table, array, spec):
    path, lines = write_fixture(tmp_path, name, table, array)
    result = check_sources(resolve_sources([str(path)], "data"), max_errors=None)

    found = sorted((_line(ref), kind) for ref, kind, _ in result.problems)
    expected = sorted((line, kind) for line, (_, problems) in zip(lines, table) for kind, _ in problems)
    assert found == expected
    for line, (_, problems) in zip(lines, table):
        messages = [(k, m) for ref, k, m in result.problems if _line(ref) == line]
        for kind, words in problems:
            assert any(k == kind and all(w in m for w in words) for k, m in messages), (line, kind, words, messages)
    assert result.rows == len(table)
    assert result.rows_with_problems == sum(1 for _, problems in table if problems)
    assert sum(result.counts.values()) == len(expected) and set(result.counts) <= set(KINDS)


def _accepted(row: dict, spec: FormatSpec) -> bool:
    """What training does with a row: to_messages and to_tools (to_text for plain text), any exception rejects."""
    try:
        if spec.formatting == "text":
            to_text(row, spec)
        else:
            to_messages(row, spec)
            to_tools(row, spec)
    except Exception:
        return False
    return True


# Values that end up where they do not belong, to probe check against training.
ODD = [None, "", "  ", "x", "{bad", "[]", 0, 2.5, True, [], {}, ["x"], [["a", "b"]], [{"role": "user"}], {"name": "f"}]
BASES = [
    (FormatSpec("alpaca"), {"instruction": "Hi", "input": "there", "output": "a", "system": "S", "history": [["q", "a"]]},
     [("instruction",), ("input",), ("output",), ("system",), ("history",), ("history", 0), ("history", 0, 1)]),
    (FormatSpec("sharegpt", {"messages": "conversations"}), SHAREGPT[1][0],
     [("conversations",), ("conversations", 0), ("conversations", 0, "from"), ("conversations", 0, "value"),
      ("conversations", 1, "value"), ("conversations", 3, "from"), ("conversations", 3, "value"), ("tools",), ("system",)]),
    (FormatSpec("openai", {"messages": "messages"}), OPENAI[1][0],
     [("messages",), ("messages", 1), ("messages", 1, "role"), ("messages", 1, "content"), ("messages", 1, "tool_calls"),
      ("messages", 1, "tool_calls", 0), ("messages", 1, "tool_calls", 0, "function"),
      ("messages", 1, "tool_calls", 0, "function", "name"), ("messages", 1, "tool_calls", 0, "function", "arguments"),
      ("messages", 3, "reasoning_content"), ("messages", 3, "role")]),
    (FormatSpec("prompt_completion"), PROMPT_COMPLETION[1][0],
     [("prompt",), ("completion",), ("prompt", 0), ("prompt", 0, "role"), ("completion", 0, "content")]),
    (FormatSpec("cot"), COT[0][0], [("question",), ("thinking",), ("answer",)]),
    (FormatSpec("text"), TEXT[0][0], [("text",)]),
]


def test_check_and_training_agree():
    """Every row that training rejects has a problem, and check itself explains every rejection."""
    rows = [(spec, row) for _, table, _, spec in FIXTURES for row, _ in table if isinstance(row, dict)]
    for spec, base, paths in BASES:
        for path in paths:
            for value in [*ODD, "<drop>"]:
                row = copy.deepcopy(base)
                parent = row
                for key in path[:-1]:
                    parent = parent[key]
                if value == "<drop>" and isinstance(parent, dict):
                    parent.pop(path[-1], None)
                elif value == "<drop>":
                    del parent[path[-1]]
                else:
                    parent[path[-1]] = copy.deepcopy(value)
                rows.append((spec, row))
    assert len(rows) > 500
    rejected = 0
    for spec, row in rows:
        problems = row_problems(row, spec)
        accepted = _accepted(row, spec)
        rejected += not accepted
        # What training rejects has a problem (equivalently: a row with none is accepted). Check may be
        # stricter (empty answers, roles that do not alternate, <think> tags), never laxer.
        assert accepted or problems, row
        assert REJECTED not in {kind for kind, _ in problems}, (row, problems)
    assert rejected > 100  # the probe rows do reach training's rejections


def test_max_errors_limits_the_list_not_the_counts(tmp_path):
    path, _ = write_fixture(tmp_path, "sharegpt.json", SHAREGPT, True)
    sources = resolve_sources([str(path)], "data")
    full, short = check_sources(sources, max_errors=None), check_sources(sources, max_errors=3)
    assert len(short.problems) == 3 and short.problems == full.problems[:3]
    assert short.counts == full.counts and short.rows_with_problems == full.rows_with_problems and short.rows == full.rows
    assert f"... and {full.total - 3} more problem(s) not listed" in short.lines()
    assert short.lines()[-1] == f"{len(SHAREGPT)} rows checked, {full.rows_with_problems} with problems"


def test_empty_file_has_no_samples(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    result = check_sources(resolve_sources([str(tmp_path / "empty.jsonl")], "data"))
    assert result.rows == 0 and [kind for _, kind, _ in result.problems] == [NO_SAMPLES]


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "NO_COLOR": "1"}
    return sftlab_cli(*args, cwd=cwd, env=env, timeout=300)


def test_cli_exit_codes_and_plain_output(tmp_path):
    clean = tmp_path / "clean.jsonl"
    good = [row for row, problems in ALPACA if not problems]
    clean.write_text("".join(json.dumps(row) + "\n" for row in good))
    ok = run_cli("data", "check", clean, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [f"{len(good)} rows checked, 0 with problems"]

    path, lines = write_fixture(tmp_path, "alpaca.jsonl", ALPACA, False)
    bad = run_cli("data", "check", path, cwd=tmp_path)
    assert bad.returncode == 1, bad.stderr
    out = bad.stdout.splitlines()
    assert f"{path}:{lines[4]}: missing field: no 'output' field" in out[2]
    assert "\x1b[" not in bad.stdout  # piped: plain text
    assert "problems by kind:" in out and "  unbalanced <think>: 2" in out
    assert out[-1] == f"{len(ALPACA)} rows checked, {sum(1 for _, p in ALPACA if p)} with problems"

    one = run_cli("data", "check", "--leakage", clean, cwd=tmp_path)
    assert one.returncode == 2 and "error: --leakage compares two datasets, got 1" in one.stderr


def test_cli_json_max_errors_and_dataset_names(tmp_path):
    from sftlab.cli import app

    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "Hi", "a": ""}) + "\n" + json.dumps({"q": "Hi", "a": "Hello"}) + "\n")
    info = {"mine": {"file_name": "d.jsonl", "columns": {"prompt": "q", "response": "a"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    runner = CliRunner()
    result = runner.invoke(app, ["data", "check", "mine", "--dataset-dir", str(tmp_path), "--json"])
    assert result.exit_code == 1, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert objects[0] == {"ref": f"{tmp_path / 'd.jsonl'}:1", "kind": EMPTY_ANSWER,
                          "message": "'a' is empty, so the model learns to answer with nothing"}
    assert objects[1] == {"summary": True, "rows": 2, "rows_with_problems": 1, "problems": 1, "listed": 1,
                          "counts": {EMPTY_ANSWER: 1}}

    path, _ = write_fixture(tmp_path, "openai.jsonl", OPENAI, False)
    result = runner.invoke(app, ["data", "check", str(path), "--max-errors", "2"])
    assert result.exit_code == 1
    listed = [line for line in result.stdout.splitlines() if line.startswith(f"{path}:")]
    assert len(listed) == 2
    total = sum(len(p) for _, p in OPENAI)
    assert f"... and {total - 2} more problem(s) not listed" in result.stdout


def test_cli_leakage(tmp_path):
    from sftlab.cli import app
    from sftlab.data.split import leakage  # noqa: F401  (the CLI imports it lazily: a broken module fails here, plainly)

    rows = [{"instruction": f"Question number {i} about topic {i * 7}", "output": f"Answer {i}"} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [rows[1], rows[5]]))
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    runner = CliRunner()
    train, test, other = (str(tmp_path / name) for name in ("train.jsonl", "eval.jsonl", "other.jsonl"))
    leaked = runner.invoke(app, ["data", "check", "--leakage", train, test, "--json"])
    assert leaked.exit_code == 1, leaked.output
    pair, summary = [json.loads(line) for line in leaked.stdout.splitlines()]
    assert pair == {"ref_a": f"{train}:2", "ref_b": f"{test}:1", "match": "exact", "similarity": 1.0}
    assert (summary["n_a"], summary["n_b"], summary["n_b_leaked"]) == (4, 2, 1)
    clean = runner.invoke(app, ["data", "check", "--leakage", train, other])
    assert clean.exit_code == 0, clean.output
