"""Dataset rows → the one conversation type: a list of ``{"role", "content"}`` messages.

Roles are ``system``, ``user``, ``assistant`` and ``tool`` (a tool's result); an assistant message
may carry ``reasoning_content`` and OpenAI-style ``tool_calls``. A row's tool definitions come from
its ``tools`` column (``to_tools``). Formats and their column/tag mapping follow
LLaMA-Factory's ``dataset_info.json`` (``formatting``, ``columns``, ``tags``); ``openai``,
``prompt_completion`` and ``text`` are named formats of their own here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]

FORMATS = ("alpaca", "sharegpt", "openai", "prompt_completion", "cot", "text")

_DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
    "openai": {"messages": "messages", "system": "system", "tools": "tools"},
    "prompt_completion": {"prompt": "prompt", "completion": "completion", "system": "system"},
    "cot": {"question": "question", "thinking": "thinking", "answer": "answer", "system": "system"},
    "text": {"prompt": "text"},
}
# Columns a row must have, per format (by their logical name).
_REQUIRED = {"alpaca": ("prompt", "response"), "sharegpt": ("messages",), "openai": ("messages",), "prompt_completion": ("prompt", "completion"), "cot": ("question", "answer"), "text": ("prompt",)}
_SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt", "system_tag": "system",
                  "observation_tag": "observation", "function_tag": "function_call"}
_OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", "system_tag": "system",
                "observation_tag": "tool", "function_tag": "function_call"}


class RowError(ValueError):
    """A row that cannot become a conversation; the message names what is wrong with it."""


@dataclass
class FormatSpec:
    """How to read one dataset's rows: format name, logical → actual column names, role tags."""

    formatting: str
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.columns = {**_DEFAULT_COLUMNS[self.formatting], **self.columns}
        default_tags = _OPENAI_TAGS if self.formatting == "openai" else _SHAREGPT_TAGS
        self.tags = {**default_tags, **self.tags}

    def missing_columns(self, present: list[str]) -> list[str]:
        return [self.columns[k] for k in _REQUIRED[self.formatting] if self.columns[k] not in present]


def detect_format(columns: list[str], first_row: dict[str, Any]) -> FormatSpec | None:
    """Guess the format of a data file from its column names (and, for chats, the message keys)."""
    cols = set(columns)
    for chat_col in ("messages", "conversations"):
        if chat_col in cols:
            turns = first_row.get(chat_col)
            first = turns[0] if isinstance(turns, list) and turns else None
            keys = set(first) if isinstance(first, dict) else set()
            if {"role", "content"} <= keys:
                return FormatSpec("openai", {"messages": chat_col})
            return FormatSpec("sharegpt", {"messages": chat_col})
    if {"instruction", "output"} <= cols:
        return FormatSpec("alpaca")
    if {"prompt", "completion"} <= cols:
        return FormatSpec("prompt_completion")
    if {"question", "answer"} <= cols:
        return FormatSpec("cot")
    if "text" in cols:
        return FormatSpec("text")
    return None


def to_messages(row: dict[str, Any], spec: FormatSpec) -> list[Message]:
    """One row → messages. Raises RowError for a malformed row (no assistant turn, bad roles, …)."""
    c = spec.columns
    system = _text(row.get(c.get("system", ""), None))
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    if spec.formatting == "alpaca":
        for pair in row.get(c["history"]) or []:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise RowError("history must be a list of [instruction, answer] pairs")
            messages += [{"role": "user", "content": _text(pair[0])}, {"role": "assistant", "content": _text(pair[1])}]
        prompt, query = _text(row.get(c["prompt"])), _text(row.get(c["query"]))
        messages.append({"role": "user", "content": f"{prompt}\n{query}" if prompt and query else prompt or query})
        messages.append({"role": "assistant", "content": _text(row.get(c["response"]))})
    elif spec.formatting in ("sharegpt", "openai"):
        messages += _chat_turns(row.get(c["messages"]), spec.tags, has_system=bool(system))
    elif spec.formatting == "prompt_completion":
        prompt = row.get(c["prompt"])
        if isinstance(prompt, list):  # conversational prompt: already messages
            messages += _chat_turns(prompt, _OPENAI_TAGS, has_system=bool(system))
        else:
            messages.append({"role": "user", "content": _text(prompt)})
        completion = row.get(c["completion"])
        if isinstance(completion, list):
            messages += _chat_turns(completion, _OPENAI_TAGS, has_system=True)
        else:
            messages.append({"role": "assistant", "content": _text(completion)})
    elif spec.formatting == "cot":
        messages.append({"role": "user", "content": _text(row.get(c["question"]))})
        answer = {"role": "assistant", "content": _text(row.get(c["answer"]))}
        if thinking := _text(row.get(c["thinking"])):
            answer["reasoning_content"] = thinking
        messages.append(answer)
    else:
        raise RowError(f"format '{spec.formatting}' holds plain text, which only stage: pt trains on")
    _check_roles(messages)
    return messages


def to_tools(row: dict[str, Any], spec: FormatSpec) -> list[dict] | None:
    """The row's tool definitions (a list, or a JSON string of one, as LLaMA-Factory stores them), or None."""
    value = row.get(spec.columns.get("tools", ""))
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"the tools column is not valid JSON ({e.msg})") from None
    if value is None:
        return None
    if not isinstance(value, list):
        raise RowError("the tools column must be a list of tool definitions")
    return [_without_nulls(tool) for tool in value] or None


def _without_nulls(value: Any) -> Any:
    """Drop None values from dicts: Arrow gives every row of a column the union of all rows' keys."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _tool_calls(value: Any) -> list[dict]:
    """A function_call turn's value (JSON of one call or a list of calls) → OpenAI tool_calls."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"a function_call turn is not valid JSON ({e.msg})") from None
    calls = value if isinstance(value, list) else [value]
    if not all(isinstance(c, dict) and "name" in c for c in calls):
        raise RowError('a function_call turn must be {"name": ..., "arguments": ...} (or a list of them)')
    return [{"type": "function", "function": {"name": c["name"], "arguments": _without_nulls(c.get("arguments", {}))}} for c in calls]


def to_text(row: dict[str, Any], spec: FormatSpec) -> str:
    """Plain text for ``stage: pt``: the text column, or a conversation's contents joined."""
    if spec.formatting == "text":
        return _text(row.get(spec.columns["prompt"]))
    return "\n\n".join(m["content"] for m in to_messages(row, spec) if m["content"])


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"expected text, got {type(value).__name__}")
    return value


def _chat_turns(turns: Any, tags: dict[str, str], has_system: bool) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise RowError("the conversation is empty")
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
             tags["observation_tag"]: "tool", tags["function_tag"]: "function_call"}
    out: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"turn {i} is not an object with '{tags['role_tag']}' and '{tags['content_tag']}'")
        tag = turn.get(tags["role_tag"])
        if not isinstance(tag, str) or tag not in roles:
            raise RowError(f"turn {i} has role '{tag}'; expected one of {', '.join(repr(r) for r in roles)} (set 'tags' in dataset_info.json)")
        role = roles[tag]
        if role == "function_call":  # ShareGPT: a separate turn holding the call
            out.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(turn.get(tags["content_tag"]))})
            continue
        message = {"role": role, "content": _text(turn.get(tags["content_tag"]))}
        if role == "assistant":
            if reasoning := _text(turn.get("reasoning_content")):
                message["reasoning_content"] = reasoning
            if calls := turn.get("tool_calls"):
                if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                    raise RowError(f"turn {i}: tool_calls must be a list of objects")
                message["tool_calls"] = [_without_nulls(c) for c in calls]
        out.append(message)
    return out


def _check_roles(messages: list[Message]) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("the conversation has no assistant turn, so there is nothing to train on")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise RowError(f"turn {i} is a system message; only the first message may be one")
    first = next(m["role"] for m in messages if m["role"] != "system")
    if first != "user":
        raise RowError("the conversation starts with an assistant turn; it must start with a user turn")
