"""Validate every row of a dataset against its format, without a tokenizer: ``sftlab data check``.

Each problem is reported with the row's file:line and a reason. Check never passes a row that training
rejects: a row that passes the checks here is still run through ``to_messages``/``to_tools`` (``to_text``
for plain text) and a rejection is reported. It is stricter than training where a row would train but
teach the wrong thing (empty answers, roles that do not alternate, unbalanced <think> tags, …).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from sftlab.data.formats import FormatSpec, RowError, to_messages, to_text, to_tools
from sftlab.data.rows import MALFORMED_JSON, NOT_AN_OBJECT, NOT_UTF8, iter_rows, row_spec
from sftlab.data.sources import Source
from sftlab.errors import SftlabError

# Problem kinds (MALFORMED_JSON, NOT_UTF8 and NOT_AN_OBJECT come from the reader).
MISSING_FIELD = "missing field"
EMPTY_FIELD = "empty field"
WRONG_TYPE = "wrong type"
UNKNOWN_ROLE = "unknown role"
ROLE_ORDER = "roles out of order"
NO_ASSISTANT = "no assistant turn"
EMPTY_ANSWER = "empty answer"
UNBALANCED_THINK = "unbalanced <think>"
BAD_TOOL_CALL = "bad tool call"
BAD_TOOLS = "bad tools"
NO_SAMPLES = "no samples"
REJECTED = "rejected by training"  # a rejection of to_messages that no check above explains (should not happen)
KINDS = (MALFORMED_JSON, NOT_UTF8, NOT_AN_OBJECT, MISSING_FIELD, EMPTY_FIELD, WRONG_TYPE, UNKNOWN_ROLE, ROLE_ORDER,
         NO_ASSISTANT, EMPTY_ANSWER, UNBALANCED_THINK, BAD_TOOL_CALL, BAD_TOOLS, NO_SAMPLES, REJECTED)

Problem = tuple[str, str]  # (kind, message)

_SURROGATE = re.compile("[\ud800-\udfff]")
_THINK_TAG = re.compile(r"</?think>")
_OPENAI_TAGS = FormatSpec("openai").tags  # conversational prompt/completion columns are OpenAI messages


@dataclass
class _Turn:
    """One message of a row as far as it could be read: enough to check the conversation's shape."""

    role: str  # system, user, assistant or tool
    where: str  # how messages name it, e.g. "'conversations'[3]" or "'output'"
    content: str
    has_calls: bool = False
    reasoning: str = ""
    judged: bool = True  # False: its field is missing or not text (reported as such), so it is not also "empty"


def row_problems(value: dict[str, Any], spec: FormatSpec) -> list[Problem]:
    """Every problem of one row (a parsed JSON object) in format ``spec``, as (kind, message) pairs.

    Empty only if training accepts the row. Cheap: no tokenizer, one pass over the row.
    """
    out: list[Problem] = []
    _surrogates(value, "", out)
    missing = spec.missing_columns(list(value))
    for col in missing:
        needed = ", ".join(repr(c) for c in spec.missing_columns([]))
        out.append((MISSING_FIELD, f"no '{col}' field; {spec.formatting} samples need {needed} "
                                   "(map other names with 'columns' in dataset_info.json)"))
    if spec.formatting == "text":
        col, before = spec.columns["prompt"], len(out)
        if not missing and not _string(value[col], f"'{col}'", out).strip() and len(out) == before:
            out.append((EMPTY_FIELD, f"'{col}' is empty"))
    else:
        turns = _turns(value, spec, set(missing), out)
        if turns is not None:
            _conversation_problems(turns, out)
        _tools_problems(value, spec, out)
    if not out:  # the safety net that keeps check and training in agreement
        try:
            if spec.formatting == "text":
                to_text(value, spec)
            else:
                to_messages(value, spec)
                to_tools(value, spec)
        except RowError as e:
            out.append((REJECTED, str(e)))
        except Exception as e:  # a value of a type that training does not expect: it would crash on it
            out.append((REJECTED, f"training cannot read it ({type(e).__name__}: {e})"))
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {list: "a list", tuple: "a list", dict: "an object", str: "text", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _string(value: Any, where: str, out: list[Problem]) -> str:
    """``value`` as text (null is empty); anything else is a WRONG_TYPE problem and reads as ''."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    out.append((WRONG_TYPE, f"{where} is {_json_type(value)}, expected text"))
    return ""


def _surrogates(value: Any, path: str, out: list[Problem]) -> None:
    """Lone surrogates ("\\udc80" in JSON): valid JSON escapes, but not characters, so no UTF-8 encodes them."""
    if isinstance(value, str):
        if (m := _SURROGATE.search(value)) is not None:
            out.append((NOT_UTF8, f"{_printable(path) or 'a value'} holds a lone surrogate \\u{ord(m.group()):04x}, which is not "
                                  "a character and cannot be written as UTF-8 (text cut inside an emoji, or decoded wrongly)"))
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and _SURROGATE.search(k):
                out.append((NOT_UTF8, f"the key {_printable(k)!r} holds a lone surrogate; rename it"))
            _surrogates(v, f"{path}.{k}" if path else f"'{k}'", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _surrogates(v, f"{path}[{i}]", out)


def _printable(text: str) -> str:
    """``text`` with lone surrogates written as \\udc80, so that a message about one can be printed."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _turns(value: dict[str, Any], spec: FormatSpec, missing: set[str], out: list[Problem]) -> list[_Turn] | None:
    """The row's messages as far as they can be read, with problems of fields and types added to ``out``.

    None when a turn could not be read at all (its role is unknown), so its shape cannot be judged.
    """
    c = spec.columns
    turns: list[_Turn] = []
    system = _string(value.get(c.get("system", "")), f"'{c.get('system')}'", out)
    if system:
        turns.append(_Turn("system", f"'{c['system']}'", system))
    fmt = spec.formatting
    if fmt == "alpaca":
        history = value.get(c["history"])
        if history and not isinstance(history, list):  # training skips a falsy one ('' in a CSV file)
            out.append((WRONG_TYPE, f"'{c['history']}' is {_json_type(history)}, expected a list of [instruction, answer] pairs"))
        for i, pair in enumerate(history if isinstance(history, list) else []):
            where = f"'{c['history']}'[{i}]"
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                size = f" of {len(pair)} item(s)" if isinstance(pair, list) else ""
                out.append((WRONG_TYPE, f"{where} is {_json_type(pair)}{size}, expected an [instruction, answer] pair"))
                continue
            turns.append(_text_turn("user", f"{where}[0]", pair[0], out))
            turns.append(_text_turn("assistant", f"{where}[1]", pair[1], out))
        before = len(out)
        prompt = _string(value.get(c["prompt"]), f"'{c['prompt']}'", out)
        query = _string(value.get(c["query"]), f"'{c['query']}'", out)
        where = f"the prompt ('{c['prompt']}' and '{c['query']}')" if c["query"] in value else f"'{c['prompt']}'"
        turns.append(_Turn("user", where, f"{prompt}\n{query}" if prompt and query else prompt or query,
                           judged=c["prompt"] not in missing and len(out) == before))
        turns.append(_text_turn("assistant", f"'{c['response']}'", value.get(c["response"]), out, c["response"] in missing))
    elif fmt in ("sharegpt", "openai"):
        col = c["messages"]
        if col in missing:
            return None
        chat = _chat(value.get(col), f"'{col}'", spec.tags, out)
        if chat is None:
            return None
        turns += chat
    elif fmt == "prompt_completion":
        for key, role in (("prompt", "user"), ("completion", "assistant")):
            col, raw = c[key], value.get(c[key])
            if col in missing:
                turns.append(_Turn(role, f"'{col}'", "", judged=False))
            elif isinstance(raw, list):  # a conversational prompt or completion: already messages
                chat = _chat(raw, f"'{col}'", _OPENAI_TAGS, out, empty_kind=EMPTY_FIELD if role == "user" else EMPTY_ANSWER)
                if chat is None:
                    return None
                turns += chat
            else:
                turns.append(_text_turn(role, f"'{col}'", raw, out))
    elif fmt == "cot":
        turns.append(_text_turn("user", f"'{c['question']}'", value.get(c["question"]), out, c["question"] in missing))
        turns.append(_text_turn("assistant", f"'{c['answer']}'", value.get(c["answer"]), out, c["answer"] in missing))
        turns[-1].reasoning = _string(value.get(c["thinking"]), f"'{c['thinking']}'", out)
    return turns


def _text_turn(role: str, where: str, raw: Any, out: list[Problem], missing: bool = False) -> _Turn:
    before = len(out)
    return _Turn(role, where, _string(raw, where, out), judged=not missing and len(out) == before)


def _chat(raw: Any, col: str, tags: dict[str, str], out: list[Problem], empty_kind: str = EMPTY_FIELD) -> list[_Turn] | None:
    """The turns of a conversation column (ShareGPT or OpenAI style); None when one cannot be read."""
    if raw is not None and not isinstance(raw, list):
        out.append((WRONG_TYPE, f"{col} is {_json_type(raw)}, expected a list of turns"))
        return None
    if not raw:
        out.append((empty_kind, f"{col} is empty: the conversation has no turns"))
        return None
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
             tags["observation_tag"]: "tool", tags["function_tag"]: "function_call"}
    turns: list[_Turn] = []
    readable = True
    for i, turn in enumerate(raw):
        where = f"{col}[{i}]"
        if not isinstance(turn, dict):
            out.append((WRONG_TYPE, f"{where} is {_json_type(turn)}, expected an object with '{role_tag}' and '{content_tag}'"))
            readable = False
            continue
        tag = turn.get(role_tag)
        if tag is None:
            out.append((MISSING_FIELD, f"{where} has no '{role_tag}'"))
            readable = False
            continue
        if not isinstance(tag, str) or tag not in roles:
            out.append((UNKNOWN_ROLE, f"{where} has {role_tag} {tag!r}; expected one of {', '.join(repr(r) for r in roles)} "
                                      "(set 'tags' in dataset_info.json if the dataset names roles differently)"))
            readable = False
            continue
        role = roles[tag]
        if role == "function_call":  # ShareGPT: a turn of its own holding the call(s) as JSON
            _function_call(turn.get(content_tag), where, out)
            turns.append(_Turn("assistant", where, "", has_calls=True))
            continue
        t = _text_turn(role, f"{where}.{content_tag}", turn.get(content_tag), out)
        t.where = where  # messages name the turn; a wrong type names its content field
        if role == "assistant":
            t.reasoning = _string(turn.get("reasoning_content"), f"{where}.reasoning_content", out)
            if calls := turn.get("tool_calls"):
                t.has_calls = True
                _tool_calls(calls, f"{where}.tool_calls", out)
        turns.append(t)
    return turns if readable else None


def _function_call(value: Any, where: str, out: list[Problem]) -> None:
    """A ShareGPT function_call turn's value: JSON of {"name", "arguments"} or of a list of them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            out.append((BAD_TOOL_CALL, f"{where} (function_call) is not valid JSON ({e.msg} at column {e.colno})"))
            return
    calls = value if isinstance(value, list) else [value]
    for j, call in enumerate(calls):
        at = f"{where} (function_call)" + (f" call {j}" if isinstance(value, list) else "")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            out.append((BAD_TOOL_CALL, f'{at} must be {{"name": ..., "arguments": ...}}, got {_json_type(call)}'
                                       + (" without a name" if isinstance(call, dict) else "")))
            continue
        _arguments(call.get("arguments"), at, out)


def _tool_calls(calls: Any, where: str, out: list[Problem]) -> None:
    """OpenAI tool_calls: a list of {"type": "function", "function": {"name", "arguments"}}."""
    if not isinstance(calls, list):
        out.append((WRONG_TYPE, f"{where} is {_json_type(calls)}, expected a list of tool calls"))
        return
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            out.append((BAD_TOOL_CALL, f'{at} must be {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}'))
            continue
        _arguments(function.get("arguments"), f"{at}.function.arguments", out)


def _arguments(args: Any, where: str, out: list[Problem]) -> None:
    """A call's arguments: an object, or a JSON string of one (as the OpenAI API returns them)."""
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            out.append((BAD_TOOL_CALL, f"{where}: the arguments string is not valid JSON ({e.msg} at column {e.colno})"))
            return
    if args is not None and not isinstance(args, dict):
        out.append((BAD_TOOL_CALL, f"{where}: the arguments are {_json_type(args)}, expected an object"))


def _tools_problems(value: dict[str, Any], spec: FormatSpec, out: list[Problem]) -> None:
    col = spec.columns.get("tools")
    if not col or value.get(col) is None:
        return
    try:
        tools = to_tools(value, spec)
    except RowError as e:
        out.append((BAD_TOOLS, f"'{col}': {e}"))
        return
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            out.append((BAD_TOOLS, f"'{col}'[{i}] is {_json_type(tool)}, expected a tool definition object"))


def _conversation_problems(turns: list[_Turn], out: list[Problem]) -> None:
    """Problems of a conversation's shape: roles, order, empty turns, <think> tags."""
    if not any(t.role == "assistant" for t in turns):
        out.append((NO_ASSISTANT, "the conversation has no assistant turn, so there is nothing to train on"))
    # Training rejects these two, and so do chat templates: the system prompt comes first, then the user speaks.
    for i, t in enumerate(turns):
        if t.role == "system" and i > 0:
            out.append((ROLE_ORDER, f"{t.where} is a system turn but not the first turn (a 'system' field counts as the first)"))
    first = next((t for t in turns if t.role != "system"), None)
    if first is not None and first.role != "user":
        out.append((ROLE_ORDER, f"the conversation starts with {first.where} ({first.role}), not with a user turn"))
    # Training accepts these, but each means a turn was lost or misplaced when the data was made, and
    # several templates (Llama 2, Mistral, Gemma) refuse roles that do not alternate. Not problems: a
    # conversation ending in a user or tool turn (it is context that is not trained, and costs only tokens),
    # and an assistant turn after a tool call with no result between (parallel or fire-and-forget calls).
    for prev, t in zip(turns, turns[1:]):
        if t.role == "user" and prev.role == "user":
            out.append((ROLE_ORDER, f"{t.where} is a second user turn in a row ({prev.where}); an answer is probably missing"))
        elif t.role == "assistant" and prev.role == "assistant" and not prev.has_calls:
            out.append((ROLE_ORDER, f"{t.where} is a second assistant turn in a row ({prev.where}) with no tool call between; "
                                    "a user turn is probably missing, or one answer was cut in two"))
        elif t.role == "tool" and not (prev.role == "tool" or (prev.role == "assistant" and prev.has_calls)):
            out.append((ROLE_ORDER, f"{t.where} is a tool result, but no tool call comes before it"))
    for t in turns:
        if not t.judged:
            continue
        if t.role == "user" and not t.content.strip():
            out.append((EMPTY_FIELD, f"{t.where} is {'whitespace only' if t.content else 'empty'}: a question with no text"))
        elif t.role == "assistant" and not t.has_calls and not t.content.rpartition("</think>")[2].strip():
            thinks = t.reasoning or "</think>" in t.content
            why = "reasoning with no answer after it" if thinks else "whitespace only" if t.content else "empty"
            out.append((EMPTY_ANSWER, f"{t.where} is {why}, so the model learns to answer with nothing"))
        lone_close_ok = t.role == "assistant" and not t.reasoning
        for text, what, ok in ((t.content, "", lone_close_ok), (t.reasoning, " reasoning", False)):
            if "think>" in text and (problem := _think_problem(text, lone_close_ok=ok)):
                out.append((UNBALANCED_THINK, f"{t.where}{what}: {problem}"))


def _think_problem(text: str, lone_close_ok: bool) -> str | None:
    """What is wrong with the <think> tags of ``text`` (count and order), or None.

    ``lone_close_ok``: an answer with one '</think>' and no '<think>' is fine — the template's generation
    prompt opens the block (DeepSeek-R1, Qwen3) and training takes the text before '</think>' as reasoning.
    """
    depth, opened, closed = 0, 0, 0
    early = False
    for m in _THINK_TAG.finditer(text):
        if m.group() == "<think>":
            depth, opened = depth + 1, opened + 1
        else:
            depth, closed = depth - 1, closed + 1
            early = early or depth < 0
    if opened == closed and not early:
        return None
    if lone_close_ok and opened == 0 and closed == 1:
        return None
    if opened == closed:
        return "'</think>' comes before its '<think>'"
    return f"{opened} '<think>' but {closed} '</think>'"


@dataclass
class CheckResult:
    """What checking found: counts per kind of ALL problems, and the first ``max_errors`` of them listed."""

    max_errors: int | None = 50
    rows: int = 0  # rows read (readable or not)
    rows_with_problems: int = 0
    counts: Counter = field(default_factory=Counter)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (ref, kind, message), the first max_errors

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, ref: str, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if self.max_errors is None or len(self.problems) < self.max_errors:
            self.problems.append((ref, kind, message))

    def summary_lines(self) -> list[str]:
        out = []
        if hidden := self.total - len(self.problems):
            out.append(f"... and {hidden} more problem(s) not listed")
        if self.counts:
            out.append("problems by kind:")
            out += [f"  {kind}: {n}" for kind, n in self.counts.most_common()]
        out.append(f"{self.rows} rows checked, {self.rows_with_problems} with problems")
        return out

    def lines(self) -> list[str]:
        """The listed problems as ``ref: kind: message``, then the summary."""
        return [f"{ref}: {kind}: {message}" for ref, kind, message in self.problems] + self.summary_lines()


def check_sources(sources: Iterable[Source], *, max_errors: int | None = 50,
                  on_bytes: Callable[[int], None] | None = None) -> CheckResult:
    """Check every row of every source (streamed; memory does not grow with the data).

    The format of a source is its declared one, or the one its first readable row shows. Raises
    SftlabError for what stops a whole file (missing, unknown format, see ``rows.iter_rows``).
    """
    result = CheckResult(max_errors=max_errors)
    for source in sources:
        spec: FormatSpec | None = None
        seen = 0
        for row in iter_rows(source, on_bytes):
            seen += 1
            if row.value is None:
                problems = [(row.problem or MALFORMED_JSON, row.detail)]
            else:
                if spec is None:
                    spec = _spec(source, row.value, row.ref)
                problems = row_problems(row.value, spec)
            if problems:
                result.rows_with_problems += 1
                for kind, message in problems:
                    result.add(row.ref, kind, message)
        result.rows += seen
        if not seen:
            result.add(source.name, NO_SAMPLES, "no samples in this dataset; training would stop here")
    return result


def _spec(source: Source, first: dict[str, Any], ref: str) -> FormatSpec:
    try:
        return row_spec(source, first)
    except SftlabError:
        raise
    except (KeyError, IndexError, TypeError):  # format detection indexes the first conversation
        raise SftlabError(f"{ref}: the format cannot be detected from this first sample (its conversation is not a "
                          "list of turns); fix it, or declare the format in dataset_info.json") from None

