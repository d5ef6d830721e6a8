"""Damaged and odd inputs, generated with Hypothesis: every data format and the YAML config, truncated, overwritten with
random bytes, re-encoded (BOM, UTF-16, Latin-1), with fields of the wrong type, ragged CSV rows, lines that end early.

The invariant: what reads them (``sftlab data check``'s reader, training's encoder, the config loader) either accepts
them or raises SftlabError with one line; never another exception, never a traceback. Examples are derandomized, so
every run tries the same inputs (docs/reliability.md gives the counts)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import sftlab_cli
from sftlab.config import load_config
from sftlab.data.check import check_sources
from sftlab.data.sources import resolve_sources
from sftlab.errors import SftlabError

TEXTS = ["Name a colour.", "Blue.", "Translate 你好 into English.", "Hello.", "Café au lait, s'il vous plaît.", "Oui."]
ALPACA = [{"instruction": TEXTS[i], "input": "", "output": TEXTS[i + 1]} for i in range(0, 6, 2)]
SHAREGPT = [{"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]} for r in ALPACA]
MESSAGES = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]} for r in ALPACA]
PROMPTS = [{"prompt": r["instruction"], "completion": r["output"]} for r in ALPACA]


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _csv(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def _parquet(rows: list[dict]) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


# file name → (valid bytes, rows): each format training reads
VALID = {
    "alpaca.json": (json.dumps(ALPACA, ensure_ascii=False).encode(), ALPACA),
    "alpaca.jsonl": (_jsonl(ALPACA), ALPACA),
    "sharegpt.jsonl": (_jsonl(SHAREGPT), SHAREGPT),
    "messages.jsonl": (_jsonl(MESSAGES), MESSAGES),
    "prompts.jsonl": (_jsonl(PROMPTS), PROMPTS),
    "alpaca.csv": (_csv(ALPACA), ALPACA),
    "alpaca.parquet": (_parquet(ALPACA), ALPACA),
}
ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True), st.text(max_size=8),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
TOKENIZERS: dict = {}  # loaded once for the module


def _retype(rows: list[dict], draw) -> list[dict]:
    """One field somewhere in ``rows`` (nested turns included) given a value of another type."""
    rows = json.loads(json.dumps(rows))
    row = rows[draw(st.integers(0, len(rows) - 1))]
    target, key = row, draw(st.sampled_from(sorted(row)))
    if isinstance(row[key], list) and row[key] and draw(st.booleans()):  # inside a conversation: a turn or a turn's field
        turns = row[key]
        index = draw(st.integers(0, len(turns) - 1))
        if draw(st.booleans()):
            target, key = turns[index], draw(st.sampled_from(sorted(turns[index])))
        else:
            target, key = turns, index
    target[key] = draw(ODD_VALUES)
    return rows


@st.composite
def damaged(draw) -> tuple[str, bytes, str]:
    """(file name, its bytes, what was done to it)."""
    name = draw(st.sampled_from(sorted(VALID)))
    data, rows = VALID[name]
    kinds = ["truncate", "random bytes", "overwrite", "encoding", "empty"]
    if not name.endswith(".parquet"):
        kinds += ["retype", "torn line"]
    if name.endswith(".csv"):
        kinds += ["ragged"]
    kind = draw(st.sampled_from(kinds))
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "random bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    elif kind == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=8))
        data = data[:at] + junk + data[at + len(junk):]
    elif kind == "encoding":
        encoding = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-8-sig", "latin-1", "utf-32", "gbk"]))
        if name.endswith(".parquet"):
            data = data.decode("latin-1").encode("utf-8")  # bytes mangled as a text editor would
        else:
            data = data.decode("utf-8").encode(encoding, errors="replace")
    elif kind == "empty":
        data = draw(st.sampled_from([b"", b"\n\n", b"   ", b"[]", b"{}", b"null", b"\xef\xbb\xbf", b"0"]))
    elif kind == "retype":
        changed = _retype(rows, draw)
        data = (json.dumps(changed).encode() if name.endswith(".json") else _csv(changed) if name.endswith(".csv") else _jsonl(changed))
    elif kind == "torn line":  # a writer killed mid-line: the last line ends early, no newline
        lines = data.splitlines(keepends=True)
        last = lines[-1].rstrip(b"\n")
        data = b"".join(lines[:-1]) + last[: draw(st.integers(1, max(1, len(last) - 1)))]
    elif kind == "ragged":
        lines = data.decode().splitlines(keepends=True)
        i = draw(st.integers(1, len(lines) - 1))
        lines[i] = draw(st.sampled_from([",", ",,,,", '"', "a,\"b", ""])) + lines[i]
        data = "".join(lines).encode()
    return name, data, kind


def _one_line(e: SftlabError) -> None:
    message = str(e)
    assert message and "\n" not in message, repr(message)


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@fuzz(1000)
@given(case=damaged())
def test_the_data_checker_names_the_problem_of_any_damaged_file(case, tmp_path_factory):
    name, data, kind = case
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(data)
    try:
        result = check_sources(resolve_sources([str(path)], str(path.parent)))
    except SftlabError as e:
        _one_line(e)
        return
    if kind in ("torn line", "retype") and not result.rows_with_problems:  # a lone field of another type may still be valid text
        assert result.rows, (kind, data)


@fuzz(40)
@given(case=damaged())
@example(case=("alpaca.jsonl", b"null\n", "empty"))  # pyarrow 26's JSON reader segfaults on a file starting with null
@example(case=("alpaca.json", b"\xef\xbb\xbf  null", "empty"))
def test_training_data_encoding_accepts_or_names_the_problem_of_any_damaged_file(case, tmp_path_factory, smol_dir):
    """What ``sftlab train`` does with the file before the first step (read, render with the chat template, tokenize)."""
    from sftlab.data.pipeline import build_data
    from sftlab.model.load import load_tokenizer

    name, data, _ = case
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / name).write_bytes(data)
    cfg = load_config(None, [], model_name_or_path=str(smol_dir), dataset=str(folder / name), output_dir=str(folder / "out"),
                      cutoff_len=64, preprocessing_num_workers=1)
    if "smol" not in TOKENIZERS:
        TOKENIZERS["smol"] = load_tokenizer(cfg, smol_dir)
    try:
        encoded = build_data(cfg, TOKENIZERS["smol"])
    except SftlabError as e:
        _one_line(e)
        return
    assert len(encoded.train) >= 1


QUICKSTART = (Path(__file__).parents[2] / "examples" / "quickstart.yaml").read_text(encoding="utf-8")


@st.composite
def damaged_yaml(draw) -> str:
    lines = QUICKSTART.splitlines(keepends=True)
    kind = draw(st.sampled_from(["truncate", "value", "junk line", "indent", "duplicate", "bytes"]))
    if kind == "truncate":
        return QUICKSTART[: draw(st.integers(0, len(QUICKSTART) - 1))]
    settable = [i for i, line in enumerate(lines) if ":" in line and not line.startswith("#")]
    i = draw(st.sampled_from(settable))
    key = lines[i].split(":")[0]
    if kind == "value":
        value = draw(st.one_of(st.sampled_from(["", "[]", "{}", "null", "-1", "1e999", "nan", "yes", "[1, 2]", "'", "\"x", "*a", "&a b",
                                                "!!python/object:os.system 1", "0x10", "~", "{a: 1}"]),
                               st.text(max_size=10).filter(lambda s: "\n" not in s and "\r" not in s)))
        lines[i] = f"{key}: {value}\n"
    elif kind == "junk line":
        lines.insert(i, draw(st.text(max_size=20)) + "\n")
    elif kind == "indent":
        lines[i] = draw(st.sampled_from(["  ", "\t", " "])) + lines[i]
    elif kind == "duplicate":
        lines.insert(i, lines[i])
    else:
        text = "".join(lines).encode()
        at = draw(st.integers(0, len(text)))
        return (text[:at] + draw(st.binary(min_size=1, max_size=6)) + text[at:]).decode("utf-8", errors="surrogateescape")
    return "".join(lines)


@fuzz(1000)
@given(text=damaged_yaml())
def test_the_config_loader_names_the_problem_of_any_damaged_yaml(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    try:
        load_config(path)
    except SftlabError as e:
        _one_line(e)
        assert str(path) in str(e), str(e)  # the message names the file


@pytest.mark.parametrize("kind", ["utf-16", "torn", "random bytes", "ragged csv"])
def test_the_cli_prints_one_line_for_damaged_data(kind, tmp_path):
    """The same invariant through the real console script: a non-zero exit or a report, never a traceback."""
    data, _ = VALID["alpaca.csv" if kind == "ragged csv" else "alpaca.jsonl"]
    name = "d.csv" if kind == "ragged csv" else "d.jsonl"
    data = {"utf-16": data.decode().encode("utf-16"), "torn": data[:-9], "random bytes": data[:20] + b"\xff\xfe\x00\x9c" + data[20:],
            "ragged csv": data.replace(b"\n", b"\n\",x", 1)}[kind]
    (tmp_path / name).write_bytes(data)
    done = sftlab_cli("data", "check", tmp_path / name, cwd=tmp_path)
    assert "Traceback" not in done.stderr and "╭" not in done.stderr, done.stderr
    assert done.returncode != 0 or "rows checked" in done.stdout, done.stdout + done.stderr
