"""Stream a dataset's raw rows one at a time, each with where it came from (file:line or file row N).

Training loads data through Hugging Face ``datasets``; the data tools (check, stats, dedup, split,
convert, sample) read the files themselves, so that a broken row is reported with its line and the
rest still get checked, and so that memory stays bounded on a file of any size: JSONL and CSV line
by line, JSON arrays element by element in chunks, Parquet batch by batch.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sftlab.data.formats import FormatSpec, Message, RowError, detect_format, to_messages
from sftlab.data.sources import Source
from sftlab.errors import SftlabError

# Problem kinds found while reading, before a row's format is looked at.
MALFORMED_JSON = "malformed JSON"
NOT_UTF8 = "not UTF-8"
NOT_AN_OBJECT = "not an object"

_CHUNK = 1 << 20
_MAX_ELEMENT = 64 << 20


@dataclass
class RawRow:
    """One row of a data file: its parsed value (a dict when readable), or what stopped it being read."""

    ref: str  # "data.jsonl:12", "data.json:40 (sample 12)" (line where it starts; 0-based sample), "data.parquet row 7" (1-based)
    index: int  # 0-based position in its source (all files of the source, in order)
    value: dict[str, Any] | None
    problem: str | None = None  # one of the kinds above
    detail: str = ""


def iter_rows(source: Source, on_bytes: Callable[[int], None] | None = None) -> Iterator[RawRow]:
    """Every row of every file of ``source``, in order. ``on_bytes(n)`` reports progress in bytes read.

    Raises SftlabError only for what stops a whole file (missing, unknown type, a JSON document
    that is neither an array nor objects); a bad row is yielded with its ``problem``.
    """
    index = 0
    for path in source.files:
        reader = _READERS.get(path.suffix)
        if reader is None:
            raise SftlabError(f"{path}: not .json, .jsonl, .csv or .parquet")
        for row in reader(path, on_bytes or (lambda n: None)):
            row.index = index
            index += 1
            yield row


def total_bytes(source: Source) -> int:
    return sum(p.stat().st_size for p in source.files)


def _checked(ref: str, value: Any) -> RawRow:
    if isinstance(value, dict):
        return RawRow(ref, 0, value)
    return RawRow(ref, 0, None, NOT_AN_OBJECT, f"expected a JSON object, got {_json_type(value)}")


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false", type(None): "null"}.get(type(value), type(value).__name__)


def _read_lines(path: Path, on_bytes: Callable[[int], None]) -> Iterator[RawRow]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            on_bytes(len(raw))
            if not raw.strip():
                continue
            ref = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(ref, 0, None, NOT_UTF8, f"byte {e.start + 1} of the line is not UTF-8; re-save the file as UTF-8")
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield RawRow(ref, 0, None, MALFORMED_JSON, f"{e.msg} at column {e.colno}")
                continue
            yield _checked(ref, value)


def _read_json(path: Path, on_bytes: Callable[[int], None]) -> Iterator[RawRow]:
    """A .json file: an array of objects (read element by element), or JSON Lines under a .json name."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _read_lines(path, on_bytes)
        return
    yield from _read_array(path, on_bytes)


def _read_array(path: Path, on_bytes: Callable[[int], None]) -> Iterator[RawRow]:
    """Elements of a top-level JSON array, decoded from a sliding buffer (memory ~ one element + 1 MiB)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("strict")
    with open(path, "rb") as f:
        buf, pos, line, eof = "", 0, 1, False  # line: line number of buf[pos]

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            data = f.read(_CHUNK)
            on_bytes(len(data))
            try:
                chunk = utf8.decode(data, final=not data)
            except UnicodeDecodeError as e:  # bad bytes cut the array: name their line, nothing after can be trusted
                bad_line = line + buf.count("\n", pos) + data[: e.start].count(b"\n")
                raise SftlabError(f"{path}:{bad_line}: not UTF-8 ({e.reason}); re-save the file as UTF-8") from None
            buf, pos = buf[pos:] + chunk, 0
            eof = not data
            return bool(chunk) or not eof

        def skip_space() -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or not more():
                    return

        skip_space()
        if pos >= len(buf) or buf[pos] != "[":
            raise SftlabError(f"{path}:{line}: expected a JSON array of samples")
        pos += 1
        expect_value, k = True, -1  # k: 0-based number of the element, as training names samples
        while True:
            skip_space()
            if pos >= len(buf):
                yield RawRow(f"{path}:{line}", 0, None, MALFORMED_JSON, "the array is not closed with ']'; the rest of the file cannot be read")
                return
            if buf[pos] == "]":
                return
            if not expect_value:
                if buf[pos] != ",":
                    yield RawRow(f"{path}:{line}", 0, None, MALFORMED_JSON, f"expected ',' or ']' between samples, found {buf[pos]!r}; the rest of the file cannot be read")
                    return
                pos += 1
                expect_value = True
                continue
            start_line, k = line, k + 1
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end == len(buf) and not eof and more():  # a number may continue in the next chunk
                        continue
                    break
                except json.JSONDecodeError as e:
                    error_line = start_line + buf.count("\n", pos, e.pos)  # before more() moves the buffer
                    # the element may just be cut by the chunk boundary (but no sample is 64 MiB)
                    if len(buf) - pos < _MAX_ELEMENT and not eof and more():
                        continue
                    yield RawRow(f"{path}:{error_line}", 0, None, MALFORMED_JSON, f"{e.msg}; the rest of the file cannot be read")
                    return
            line += buf.count("\n", pos, end)
            pos = end
            expect_value = False
            yield _checked(f"{path}:{start_line} (sample {k})", value)


def _read_csv(path: Path, on_bytes: Callable[[int], None]) -> Iterator[RawRow]:
    with open(path, "rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="strict", newline="")
        reader = csv.DictReader(text)
        row_no, seen = 0, 0
        try:
            for row in reader:
                row_no += 1
                where = f.tell()
                on_bytes(max(0, where - seen))
                seen = where
                yield RawRow(f"{path} row {row_no} (line {reader.line_num})", 0, dict(row))
        except UnicodeDecodeError as e:
            raise SftlabError(f"{path}: not UTF-8 after row {row_no} ({e.reason}); re-save the file as UTF-8") from None


def _read_parquet(path: Path, on_bytes: Callable[[int], None]) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    row_no = 0
    try:
        pf = pq.ParquetFile(path)
        per_group = path.stat().st_size / max(1, pf.metadata.num_rows)
        for batch in pf.iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                row_no += 1
                yield RawRow(f"{path} row {row_no}", 0, value)
            on_bytes(int(per_group * batch.num_rows))
    except (OSError, ValueError, UnicodeDecodeError) as e:  # pyarrow's errors for a damaged file derive from these
        after = f" after row {row_no}" if row_no else ""
        raise SftlabError(f"{path}: not a readable Parquet file{after} ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                          "write it again from its source") from None


_READERS = {".jsonl": _read_lines, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def row_spec(source: Source, first: dict[str, Any]) -> FormatSpec:
    """The source's declared format, or the one its first readable row shows. Raises SftlabError if unknown."""
    spec = source.spec or detect_format(list(first), first)
    if spec is None:
        raise SftlabError(
            f"{source.files[0]}: unknown data format (keys: {', '.join(first) or 'none'}); expected alpaca "
            "(instruction, output), sharegpt (conversations), openai (messages), prompt/completion or text, "
            "or register it in dataset_info.json with its columns"
        )
    return spec


def first_value(source: Source) -> dict[str, Any]:
    """The first readable row of ``source`` (to detect its format). Raises SftlabError if there is none."""
    for row in iter_rows(source):
        if row.value is not None:
            return row.value
    raise SftlabError(f"{source.files[0]}: no readable sample; run sftlab data check on it")


def conversation(row: RawRow, spec: FormatSpec) -> list[Message]:
    """The row as messages. Raises RowError (the row's problem) for unreadable or malformed rows."""
    if row.value is None:
        raise RowError(f"{row.problem}: {row.detail}")
    return to_messages(row.value, spec)


def prompt_and_answer(messages: list[Message]) -> tuple[str, str]:
    """(everything before the last assistant turn, the last assistant turn) as text, for comparing samples.

    Tool calls count as part of a turn's text (as compact JSON); reasoning does not.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")

    def text(m: Message) -> str:
        calls = m.get("tool_calls")
        return (m.get("content") or "") if not calls else f"{m.get('content') or ''}{json.dumps(calls, ensure_ascii=False, sort_keys=True)}"

    prompt = "\n".join(f"{m['role']}: {text(m)}" for m in messages[:last])
    return prompt, text(messages[last])


def write_jsonl(path: Path, objects: Iterable[dict[str, Any]]) -> int:
    """Write ``objects`` as JSON Lines, atomically (the file appears only when complete); returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for obj in objects:
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n
