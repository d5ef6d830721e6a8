"""Convert datasets between formats, and draw a seeded sample for human review.

Conversion goes row → messages (``formats.to_messages``, the reader training uses) → the target
format, so whatever training would read from the input is what gets written. Where the target
cannot hold something (Alpaca has no tool calls; ShareGPT keeps an assistant's text and its tool
calls as separate turns) it is counted and named, never dropped silently.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sftlab.data.formats import Message, RowError, to_tools
from sftlab.data.rows import RawRow, conversation, iter_rows, row_spec
from sftlab.data.sources import Source, source_files
from sftlab.errors import SftlabError
from sftlab.files import check_outputs

TARGETS = ("messages", "sharegpt", "alpaca")
_NAMED = 3  # samples named per problem
_INVALID = "not a valid sample (sftlab data check lists why)"
# ShareGPT role tags (LLaMA-Factory's defaults, which formats.py reads back)
_SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "tool": "observation", "system": "system"}


class Unrepresentable(ValueError):
    """The sample cannot be written in the target format at all; the message says why."""


@dataclass
class ConvertResult:
    rows: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason → samples not written
    lost: Counter = field(default_factory=Counter)  # what → samples written without it
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason or loss → first refs

    def note(self, what: str, ref: str) -> None:
        refs = self.examples.setdefault(what, [])
        if len(refs) < _NAMED:
            refs.append(ref)

    def lines(self) -> list[str]:
        out = [f"{self.written} of {self.rows} samples written"]
        for kind, counts in (("not written", self.skipped), ("written without", self.lost)):
            for what, n in counts.most_common():
                out.append(f"  {kind}: {what}: {n} — e.g. {', '.join(self.examples.get(what, []))}")
        return out


def to_openai(messages: list[Message], tools: list[dict] | None) -> dict[str, Any]:
    """OpenAI ``messages`` (system as the first message): holds everything sftlab reads. Lossless."""
    row: dict[str, Any] = {"messages": messages}
    if tools:
        row["tools"] = tools
    return row


def to_sharegpt(messages: list[Message], tools: list[dict] | None) -> tuple[dict[str, Any], list[str]]:
    """ShareGPT ``conversations`` with a ``system`` column and ``tools`` as a JSON string (LLaMA-Factory's layout).

    Returns the row and what it could not keep: an assistant turn with both text and tool calls
    becomes one ``function_call`` turn (the text is lost, as ShareGPT has no turn holding both).
    ``reasoning_content`` stays on its ``gpt`` turn (sftlab reads it back; LLaMA-Factory ignores it).
    """
    row: dict[str, Any] = {}
    turns, lost = [], []
    for m in messages:
        if m["role"] == "system":
            row["system"] = m["content"]
            continue
        if calls := m.get("tool_calls"):
            if m.get("content"):
                lost.append("assistant text beside tool calls (ShareGPT has no turn holding both)")
            if any(set(c) - {"type", "function"} for c in calls):
                lost.append("tool call ids (ShareGPT's function_call turn holds only name and arguments)")
            value = [{"name": c["function"]["name"], "arguments": c["function"].get("arguments", {})} for c in calls]
            turns.append({"from": "function_call", "value": json.dumps(value[0] if len(value) == 1 else value, ensure_ascii=False)})
            continue
        turn = {"from": _SHAREGPT_FROM[m["role"]], "value": m["content"]}
        if m.get("reasoning_content"):
            turn["reasoning_content"] = m["reasoning_content"]
        turns.append(turn)
    row = {"conversations": turns, **row}
    if tools:
        row["tools"] = json.dumps(tools, ensure_ascii=False)
    return row, lost


def to_alpaca(messages: list[Message], tools: list[dict] | None) -> tuple[dict[str, Any], list[str]]:
    """Alpaca ``instruction``/``output`` with earlier turns as ``history`` pairs.

    Raises Unrepresentable for tools, tool calls or turns that do not alternate user/assistant.
    Returns the row and what it could not keep (reasoning, which Alpaca has no column for).
    """
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        raise Unrepresentable("tools or tool calls (Alpaca has no place for them; use messages or sharegpt)")
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = messages[1:] if system else messages
    if len(turns) % 2 or any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(turns)):
        raise Unrepresentable("turns that do not alternate user/assistant ending with the assistant")
    lost = ["reasoning_content (Alpaca has no column for it; use messages, sharegpt or cot)"] \
        if any(m.get("reasoning_content") for m in turns) else []
    pairs = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 2, 2)]
    row: dict[str, Any] = {"instruction": turns[-2]["content"], "input": "", "output": turns[-1]["content"]}
    if system:
        row["system"] = system
    if pairs:
        row["history"] = pairs
    return row, lost


def _rows(sources: list[Source], on_bytes: Callable[[int], None] | None) -> Iterator[tuple[RawRow, Any]]:
    for source in sources:
        spec = None
        for row in iter_rows(source, on_bytes):
            if spec is None and row.value is not None:
                spec = row_spec(source, row.value)
            yield row, spec


def convert(sources: list[Source], out: Path, to: str, on_bytes: Callable[[int], None] | None = None,
            force: bool = False) -> ConvertResult:
    """Write every convertible row of ``sources`` to ``out`` (JSONL; a JSON array if it ends in .json).

    Rows that cannot be read or converted are skipped and counted (run ``sftlab data check`` for
    the details). The file appears only when complete. Raises SftlabError for a bad target, an ``out`` that is
    an input or (unless ``force``) exists already.
    """
    if to not in TARGETS:
        raise SftlabError(f"--to {to}: choose one of {', '.join(TARGETS)}")
    if out.suffix not in (".json", ".jsonl"):
        raise SftlabError(f"{out}: write to a .jsonl (or .json) file")
    check_outputs([out], source_files(sources), force)
    result = ConvertResult()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    as_array = out.suffix == ".json"
    try:  # a failure leaves no temporary behind
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[\n" if as_array else "")
            for row, spec in _rows(sources, on_bytes):
                result.rows += 1
                try:
                    messages = conversation(row, spec)
                    tools = to_tools(row.value, spec)
                    if to == "messages":
                        converted, lost = to_openai(messages, tools), []
                    else:
                        converted, lost = (to_sharegpt if to == "sharegpt" else to_alpaca)(messages, tools)
                except Unrepresentable as e:
                    result.skipped[str(e)] += 1
                    result.note(str(e), row.ref)
                    continue
                except RowError as e:
                    result.skipped[_INVALID] += 1
                    result.note(_INVALID, f"{row.ref} ({e})")
                    continue
                for what in lost:
                    result.lost[what] += 1
                    result.note(what, row.ref)
                text = json.dumps(converted, ensure_ascii=False)
                f.write(("" if result.written == 0 else ",\n") + text if as_array else text + "\n")
                result.written += 1
            f.write("\n]\n" if as_array else "")
            f.flush()
            os.fsync(f.fileno())
        if result.written == 0:
            raise SftlabError(f"no sample could be converted to {to}: " + " ".join(result.lines()[1:]).strip())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return result


def sample_rows(sources: list[Source], n: int, seed: int = 42,
                on_bytes: Callable[[int], None] | None = None) -> list[tuple[Source, RawRow]]:
    """A uniform random sample of ``n`` rows (all rows if fewer), in file order; the same for the same seed.

    One pass, memory for ``n`` rows only (reservoir sampling). Unreadable rows are candidates too,
    so a reviewer sees them.
    """
    if n < 1:
        raise SftlabError(f"--n {n}: ask for at least one sample")
    rng = random.Random(seed)
    reservoir: list[tuple[int, RawRow]] = []  # (source number, row)
    seen = 0
    for i, source in enumerate(sources):
        for row in iter_rows(source, on_bytes):
            seen += 1
            if len(reservoir) < n:
                reservoir.append((i, row))
            elif (j := rng.randrange(seen)) < n:
                reservoir[j] = (i, row)
    return [(sources[i], row) for i, row in sorted(reservoir, key=lambda pair: (pair[0], pair[1].index))]
