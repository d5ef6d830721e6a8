"""Tool calls at inference: OpenAI-style request messages → the conversation type training renders, and the
template's own tool-call format (Qwen/Hermes ``<tool_call>{json}</tool_call>``, …) parsed back out of an answer.

The format is not a table of known models: it is read off the chat template by rendering a probe call, so the
parser looks for exactly what training taught the model to write.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

from transformers import PreTrainedTokenizerBase

from sftlab.data.formats import Message
from sftlab.data.render import apply_thinking, end_of_turn_token, render, with_default_system

ROLES = ("system", "user", "assistant", "tool")
_PROBE_TOOL = {"type": "function", "function": {"name": "sftlab_probe_tool", "description": "probe",
                                                 "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
_PROBE_CALL = {"type": "function", "function": {"name": "sftlab_probe_tool", "arguments": {"x": 7}}}


class MessageError(ValueError):
    """A request message that cannot become a conversation; ``param`` names it (``messages[2].role``)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCallFormat:
    """What the template writes around one call's JSON: ``open`` ``{"name": …, "arguments": …}`` ``close``.
    ``open`` is empty for templates that write the bare JSON object (Llama 3.1)."""

    open: str = "<tool_call>"
    close: str = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's API carries it


def _text(content: Any, where: str) -> str:
    """A message's content: a string, None, or a list of text parts (OpenAI's content parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise MessageError(f"{where}.content[{i}]: only text parts are supported", f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise MessageError(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _call(raw: Any, where: str) -> dict:
    """An OpenAI tool call (``arguments`` a JSON string) → training's form (``arguments`` an object)."""
    function = raw.get("function") if isinstance(raw, dict) else None
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
        raise MessageError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}", where)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise MessageError(f"{where}.function.arguments is not valid JSON ({e.msg})", f"{where}.function.arguments") from None
    if not isinstance(arguments, dict):
        raise MessageError(f"{where}.function.arguments must be a JSON object", f"{where}.function.arguments")
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def conversation(messages: Sequence[Any], default_system: str | None = None, thinking: str = "train",
                 native_reasoning: bool = False) -> list[Message]:
    """OpenAI chat messages → the conversation training renders (``role``, ``content``, an assistant's
    ``reasoning_content`` and ``tool_calls`` with object arguments; ids dropped, as training data has none), with
    training's ``default_system`` and its ``thinking`` placement of reasoning (``native_reasoning``: the template
    renders ``reasoning_content`` itself). ``developer`` is OpenAI's newer name for ``system``.
    Raises MessageError naming the bad message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MessageError("messages must be a non-empty list", "messages")
    out: list[Message] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise MessageError(f"{where} must be an object with 'role' and 'content'", where)
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise MessageError(f"{where}.role '{m.get('role')}' is not one of {', '.join(ROLES)}", f"{where}.role")
        message: Message = {"role": role, "content": _text(m.get("content"), where)}
        if role == "assistant":
            if isinstance(m.get("reasoning_content"), str) and m["reasoning_content"]:
                message["reasoning_content"] = m["reasoning_content"]
            calls = m.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise MessageError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
                message["tool_calls"] = [_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(message)
    return apply_thinking(with_default_system(out, default_system), thinking, native_reasoning)


def tool_call_format(tokenizer: PreTrainedTokenizerBase, **template_kwargs) -> ToolCallFormat | None:
    """The template's tool-call format, read off a rendered probe call; None when it cannot render tools."""
    asked = [{"role": "user", "content": "Hi"}]
    try:
        prompt = render(tokenizer, asked, add_generation_prompt=True, tools=[_PROBE_TOOL], **template_kwargs)
        full = render(tokenizer, [*asked, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}],
                      tools=[_PROBE_TOOL], **template_kwargs)
    except Exception:  # jinja2 errors and template-raised exceptions alike
        return None
    answer = full[len(os.path.commonprefix([prompt, full])):]  # what the answer adds (a think block may differ in the prompt)
    name = answer.find('"sftlab_probe_tool"')
    start = answer.rfind("{", 0, name)
    if name < 0 or start < 0:
        return None
    try:
        _, end = json.JSONDecoder().raw_decode(answer, start)
    except json.JSONDecodeError:
        return None
    opening = answer[:start].rpartition("</think>")[2].strip()  # an empty think block the template writes first
    eot = end_of_turn_token(tokenizer)
    closing = answer[end:].split(eot)[0].strip() if eot else answer[end:].strip()
    return ToolCallFormat(opening, closing)


def _parse_call(body: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not (isinstance(value, dict) and isinstance(value.get("name"), str)):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str, fmt: ToolCallFormat) -> tuple[str, list[ToolCall]]:
    """(the answer's text outside the calls, stripped; its calls). An answer whose calls are not all valid JSON
    objects with a ``name`` is returned whole as text, with no calls (a client then sees what the model wrote)."""
    if not fmt.open:  # the bare JSON object is the whole answer
        call = _parse_call(text.strip()) if text.strip().startswith("{") else None
        return ("", [call]) if call else (text.strip(), [])
    pattern = re.escape(fmt.open) + r"(.*?)" + (re.escape(fmt.close) if fmt.close else r"$") + r"|" + re.escape(fmt.open) + r"(.*)$"
    calls, content, pos = [], [], 0
    for match in re.finditer(pattern, text, flags=re.DOTALL):
        call = _parse_call((match.group(1) if match.group(1) is not None else match.group(2)).strip())
        if call is None:
            return text.strip(), []
        content.append(text[pos:match.start()])
        calls.append(call)
        pos = match.end()
    content.append(text[pos:])
    return "".join(content).strip(), calls


def text_before_calls(text: str, fmt: ToolCallFormat) -> str:
    """The part of a growing answer that is certainly not a tool call (what may be streamed as content now): the
    text before the first ``open``, less any end that could be the start of one."""
    if not fmt.open:
        return "" if text.lstrip().startswith("{") or not text.strip() else text
    cut = text.find(fmt.open)
    if cut >= 0:
        return text[:cut]
    for k in range(min(len(fmt.open) - 1, len(text)), 0, -1):
        if text.endswith(fmt.open[:k]):
            return text[:-k]
    return text
