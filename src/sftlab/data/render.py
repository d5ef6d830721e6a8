"""Conversation → (input_ids, labels). The one place where labels are made.

Rendering uses only ``tokenizer.apply_chat_template`` (the model's own template, or the
built-in one that was chosen and will be saved with the model). Assistant spans are derived
from the template itself, no ``{% generation %}`` markers needed:

* a turn's trained span starts where ``render(messages[:i], add_generation_prompt=True)`` ends —
  that text must be a prefix of the full render, or the sample is reported as not prefix-stable;
* it ends with the template's end-of-turn token (found once by probing the template) that
  follows the answer's text, so the stop token is trained and trailing whitespace is not.
  Templates with no end-of-turn token end the span where ``render(messages[:i+1])`` ends;
* an answer the template renders differently once later turns follow (Qwen3 drops ``<think>``) is
  trained in a view of its own, ``messages[:i+1]``, exactly as the model generates it.

Char spans become token spans through the offsets of one tokenization of the full text; a span
boundary inside a token is reported, never rounded. The full text is tokenized with
``add_special_tokens=False`` because the template writes BOS itself: no doubled BOS. A text so long that it must be
over ``cutoff_len`` tokens (``surely_over``: more characters than cutoff_len tokens can hold) is not tokenized at all,
so one huge sample costs no more than rendering it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from sftlab.config import Masking
from sftlab.data.formats import Message

IGNORE_INDEX = -100

# Status of an encoded sample; only TRAINED_STATUSES are trained.
KEPT = "kept"
TURNS_DROPPED = "turns_dropped"
VIEW = "view"  # an extra sample: one answer that the template rewrites in history, trained as the last turn
TOO_LONG = "too_long"
NOT_PREFIX_STABLE = "not_prefix_stable"
NO_TRAINABLE = "no_trainable"
TRAINED_STATUSES = (KEPT, TURNS_DROPPED, VIEW)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    status: str
    detail: str = ""
    rewritten: tuple[int, ...] = ()  # assistant turns left untrained here: the template renders them differently as history


class SpanError(ValueError):
    """The template renders this conversation in a way whose assistant spans cannot be masked exactly."""


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], add_generation_prompt: bool = False, **template_kwargs) -> str:
    """The chat template's text; ``template_kwargs`` reach the template (e.g. ``enable_thinking``)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs)


def special_token_strings(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return specials


def _probe(tokenizer: PreTrainedTokenizerBase, messages: list[Message], **kw) -> str | None:
    """Render a probe conversation; None when the template rejects it (templates may demand more)."""
    try:
        return render(tokenizer, messages, **kw)
    except Exception:  # jinja2 errors and template-raised exceptions alike
        return None


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the template writes after an assistant answer (``<|im_end|>``, ``<|eot_id|>``, EOS…).

    Found by rendering a probe conversation; None when the template writes no special token there.
    """
    probe = "sftlab-probe-answer"
    text = _probe(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}])
    if text is None:  # then spans end where the whole turn's render ends
        return None
    after = text[text.rfind(probe) + len(probe):]
    specials = special_token_strings(tokenizer)
    first = None
    for token in specials:
        pos = after.find(token)
        if pos >= 0 and (first is None or pos < first[0] or (pos == first[0] and len(token) > len(first[1]))):
            first = (pos, token)
    return first[1] if first else None


def template_warnings(tokenizer: PreTrainedTokenizerBase, eot: str | None) -> list[str]:
    """Problems of the tokenizer/template pair that hold for every sample (report them once per run)."""
    out = []
    if eot is None:
        out.append("the chat template writes no end-of-turn special token after an answer, so none is trained and the "
                   "model may not learn to stop; use a template that ends answers with EOS (e.g. template: default)")
    bos_id = tokenizer.bos_token_id
    if bos_id is not None:
        adds_bos = tokenizer("a")["input_ids"][:1] == [bos_id]
        text = _probe(tokenizer, [{"role": "user", "content": "a"}], add_generation_prompt=True)
        renders_bos = None if text is None else text.startswith(tokenizer.bos_token)
        if adds_bos and renders_bos:
            out.append(f"the tokenizer adds {tokenizer.bos_token} to plain text and the template writes it too: sftlab tokenizes "
                       "rendered chats without special tokens; at inference do the same (apply_chat_template) or BOS is doubled")
        elif adds_bos and renders_bos is False:
            out.append(f"the tokenizer adds {tokenizer.bos_token} to plain text but the chat template does not write it: "
                       "samples start without BOS, as the template says")
    return out


def renders_reasoning_content(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the template writes an assistant message's ``reasoning_content`` (Qwen3 does, ChatML does not)."""
    probe = "sftlab-probe-reasoning"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A", "reasoning_content": probe}]
    return probe in (_probe(tokenizer, messages) or "")


def split_reasoning(message: Message) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message: its ``reasoning_content``, or a ``<think>…</think>``
    block that leads its content (split at the last ``</think>``, as Qwen3's template does)."""
    content, reasoning = message["content"], message.get("reasoning_content") or ""
    if not reasoning and "</think>" in content:
        head, _, content = content.rpartition("</think>")
        reasoning = head.split("<think>", 1)[-1]
    return reasoning.strip(), content.strip()


def apply_thinking(messages: Sequence[Message], thinking: str, native: bool) -> list[Message]:
    """Put each answer's reasoning where the template renders it, or drop it (``thinking: drop``).

    ``native``: the template renders ``reasoning_content`` itself; otherwise the reasoning is written
    into the content as ``<think>\n…\n</think>\n\n`` so that no template silently loses it.
    """
    out = []
    for m in messages:
        if m["role"] != "assistant" or not (m.get("reasoning_content") or "</think>" in m["content"]):
            out.append(m)
            continue
        reasoning, answer = split_reasoning(m)
        rest = {k: v for k, v in m.items() if k not in ("content", "reasoning_content")}  # e.g. tool_calls
        if thinking == "drop" or not reasoning:
            out.append({**rest, "content": answer})
        elif native:
            out.append({**rest, "content": answer, "reasoning_content": reasoning})
        else:
            out.append({**rest, "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"})
    return out


_PROBE_TOOL = {"type": "function", "function": {"name": "sftlab_probe_tool", "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}


def renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the template writes both tool definitions and an assistant's tool_calls (Qwen3 does, ChatML does not)."""
    call = {"type": "function", "function": {"name": "sftlab_probe_call", "arguments": {}}}
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    text = _probe(tokenizer, messages, tools=[_PROBE_TOOL]) or ""
    return "sftlab_probe_tool" in text and "sftlab_probe_call" in text


def with_default_system(messages: Sequence[Message], default_system: str | None) -> list[Message]:
    """The conversation's own system prompt wins; else ``default_system``; else none (the template may add its own)."""
    if default_system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": default_system}, *messages]
    return list(messages)


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], text: str, eot: str | None,
    mask_thinking: bool = False, template_kwargs: dict | None = None,
) -> list[tuple[int, int, bool]]:
    """Character spans of ``text`` (the full render) that the model must learn, one per assistant turn:
    (start, end, as_generated). ``as_generated`` is false when the template renders that answer
    differently once later turns follow (Qwen3 drops its <think> block): the span then shows the
    answer as history, not as the model generates it.

    A span starts where the generation prompt ends (so a think block the template writes is trained),
    or at the answer itself with ``mask_thinking``. Raises SpanError when the conversation up to an
    answer does not render as a prefix of the whole.
    """
    template_kwargs = template_kwargs or {}
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True, **template_kwargs)
        if not text.startswith(prompt):
            raise SpanError(f"turn {i}: the conversation up to this answer renders differently inside the whole conversation")
        start = len(prompt)
        reasoning, answer = split_reasoning(message)
        after_reasoning = start
        if reasoning and (at := text.find(reasoning, start)) >= 0:  # the answer comes after it (earlier turns may lose it)
            after_reasoning = at + len(reasoning)
        answer_at = text.find(answer, after_reasoning) if answer else after_reasoning
        if answer_at < 0:
            raise SpanError(f"turn {i}: the template changes the answer's text, so it cannot be located")
        if mask_thinking:
            start = answer_at
        turn = render(tokenizer, messages[: i + 1], **template_kwargs)
        as_generated = text.startswith(turn)
        if eot is not None:
            end = text.find(eot, answer_at + len(answer))
            if end < 0:
                raise SpanError(f"turn {i}: no end-of-turn token {eot!r} after the answer")
            end += len(eot)
        else:
            end = len(turn) if as_generated else start  # a rewritten turn is trained in its own view
        spans.append((start, end, as_generated))
    return spans


# text, token ids, character offsets of each token (ids and offsets None: not tokenized, surely over cutoff_len)
Rendered = tuple[str, "list[int] | None", "list[tuple[int, int]] | None"]

# Unicode normalization composes at most 4 code points into one (α + U+0313 + U+0301 + U+0345 → ᾄ)
_MOST_COMPOSED = 4
# Tokenizer parts that never delete characters (a Split only with a behaviour that keeps what it matches)
_KEEPS_CHARACTERS = {"NFC", "NFKC", "NFD", "NFKD", "Prepend", "Replace", "Sequence", "ByteLevel", "Metaspace", "Digits",
                     "Split", "Punctuation"}


def tokenize_rendered(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], cutoff_len: int | None = None) -> list[Rendered]:
    """Rendered conversations (``render``) tokenized in one call: the fast tokenizer works through a batch on all cores.
    With ``cutoff_len``, a text that ``surely_over`` it is not tokenized (its ids and offsets are None)."""
    over = [cutoff_len is not None and surely_over(tokenizer, text, cutoff_len) for text in texts]
    todo = [text for text, skip in zip(texts, over) if not skip]
    enc = tokenizer(todo, add_special_tokens=False, return_offsets_mapping=True) if todo else {}  # it fails on an empty batch
    done = iter(zip(enc.get("input_ids", []), enc.get("offset_mapping", [])))
    return [(text, None, None) if skip else (text, *next(done)) for text, skip in zip(texts, over)]


def surely_over(tokenizer: PreTrainedTokenizerBase, text: str, cutoff_len: int) -> bool:
    """True only when ``text`` tokenizes to more than ``cutoff_len`` tokens for certain, told from its length: it has more
    characters than ``cutoff_len`` of the tokenizer's longest tokens can cover. False when that cannot be told cheaply."""
    if len(text) <= cutoff_len * 16:  # no real vocabulary's longest token is this short: not worth looking it up
        return False
    most = max_chars_per_token(tokenizer)
    return most is not None and len(text) > cutoff_len * most


@functools.lru_cache(maxsize=4)
def max_chars_per_token(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The most characters of raw text one token can stand for, or None when no bound is known: a slow or non-BPE
    tokenizer, one that fuses a run of unknown characters into one token, or one whose normalizer or pre-tokenizer
    may delete characters. A byte-level token of n bytes covers at most n characters; normalization may compose
    ``_MOST_COMPOSED`` code points into one first."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE":
        return None
    model = backend.model
    if model.unk_token is not None and model.fuse_unk and not model.byte_fallback:
        return None
    parts = [json.loads(part.__getstate__()) for part in (backend.normalizer, backend.pre_tokenizer) if part is not None]
    if not all(_keeps_characters(part) for part in parts):
        return None
    return _MOST_COMPOSED * max(map(len, backend.get_vocab(with_added_tokens=True)))


def _keeps_characters(part: object) -> bool:
    """Whether a tokenizer part (its JSON) keeps every character: only known parts, no Split that removes what it
    matches, no Replace of a longer string by a shorter one."""
    if isinstance(part, list):
        return all(_keeps_characters(p) for p in part)
    if not isinstance(part, dict):
        return True
    kind = part.get("type")
    if kind is not None:
        if kind not in _KEEPS_CHARACTERS or (kind == "Split" and part.get("behavior") == "Removed"):
            return False
        if kind == "Replace" and len(part.get("pattern", {}).get("String") or "xx") > len(part.get("content") or ""):
            return False
    return all(_keeps_characters(v) for v in part.values())


def _token_index(offsets: list[tuple[int, int]], boundary: int, text_len: int) -> int:
    """The index of the first token at or after char ``boundary``; raises SpanError if a token straddles it."""
    if boundary >= text_len:
        return len(offsets)
    for idx, (s, e) in enumerate(offsets):
        if e > boundary:
            if s < boundary:
                raise SpanError(f"a span boundary (char {boundary}) falls inside a token, so prompt and answer share a token")
            return idx
    return len(offsets)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    eot: str | None,
    cutoff_len: int,
    masking: Masking = "assistant",
    mask_thinking: bool = False,
    template_kwargs: dict | None = None,
    rendered: Rendered | None = None,
) -> Encoded:
    """Render and tokenize one conversation; labels are -100 except on trained tokens.

    Trained tokens (``masking``): "assistant", each assistant turn's answer and its end-of-turn token;
    "last", only the last turn's; "all", every token, prompts included. Over ``cutoff_len`` tokens, whole later
    turns are dropped (the sample ends after the last assistant turn that fits); if not even the first
    answer fits, the sample is TOO_LONG and not trained. ``mask_thinking`` leaves reasoning untrained;
    ``template_kwargs`` go to the template (e.g. ``enable_thinking``). ``rendered``: the conversation already
    rendered and tokenized (``tokenize_rendered``), so that a batch is tokenized in one call.

    A text whose last answer ends ``surely_over`` cutoff_len is not tokenized: its later turns are dropped as above
    (the shorter conversations are encoded as usual), or it is TOO_LONG, without its token count.
    """
    text, ids, offsets = rendered or tokenize_rendered(tokenizer, [render(tokenizer, messages, **(template_kwargs or {}))], cutoff_len)[0]
    try:
        char_spans = assistant_char_spans(tokenizer, messages, text, eot, mask_thinking, template_kwargs)
        if ids is not None or not char_spans or not surely_over(tokenizer, text[: char_spans[-1][1]], cutoff_len):
            if ids is None:  # only text after the last answer is that long: tokenize it after all
                text, ids, offsets = tokenize_rendered(tokenizer, [text])[0]
            spans = [(_token_index(offsets, s, len(text)), _token_index(offsets, e, len(text)), ok) for s, e, ok in char_spans]
    except SpanError as e:
        return Encoded([], [], NOT_PREFIX_STABLE, str(e))
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]

    if ids is None or len(ids) > cutoff_len:
        if ids is not None and spans[-1][1] <= cutoff_len:  # only template text after the last answer (a newline) is over
            ids = ids[: spans[-1][1]]
        else:  # drop whole later turns; re-render, so the new last answer appears as generated
            for k in range(len(assistant_turns) - 2, -1, -1):
                shorter = encode_conversation(tokenizer, messages[: assistant_turns[k] + 1], eot=eot, cutoff_len=cutoff_len,
                                              masking=masking, mask_thinking=mask_thinking, template_kwargs=template_kwargs)
                if shorter.status == KEPT:
                    dropped = len(assistant_turns) - 1 - k
                    shorter.status, shorter.detail = TURNS_DROPPED, f"{dropped} later assistant turn(s) dropped to fit cutoff_len {cutoff_len}"
                    return shorter
            size = f"{len(ids)} tokens" if ids is not None else f"{len(text):,} characters, surely over {cutoff_len} tokens"
            return Encoded([], [], TOO_LONG, f"{size}; the first answer does not fit in cutoff_len {cutoff_len}")

    rewritten: tuple[int, ...] = ()
    if masking == "all":
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        chosen = list(zip(assistant_turns, spans))[-1:] if masking == "last" else list(zip(assistant_turns, spans))
        rewritten = tuple(turn for turn, (_, _, as_generated) in chosen if not as_generated)
        for turn, (s, e, as_generated) in chosen:
            if as_generated:
                labels[s:e] = ids[s:e]
    if all(label == IGNORE_INDEX for label in labels):
        return Encoded([], [], NO_TRAINABLE, "no token is trained (empty answers and no end-of-turn token)", rewritten)
    return Encoded(ids, labels, KEPT, "", rewritten)


def encode_sample(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    eot: str | None,
    cutoff_len: int,
    masking: Masking = "assistant",
    mask_thinking: bool = False,
    template_kwargs: dict | None = None,
    rendered: Rendered | None = None,
) -> list[Encoded]:
    """A conversation as training samples: the conversation itself, plus one VIEW per answer that the
    template rewrites in history — ``messages[:i+1]`` with only that answer trained (masking "last"), so
    every answer is learnt exactly as the model generates it. Arguments are those of encode_conversation
    (``rendered`` is the whole conversation's)."""
    main = encode_conversation(tokenizer, messages, eot=eot, cutoff_len=cutoff_len, masking=masking,
                               mask_thinking=mask_thinking, template_kwargs=template_kwargs, rendered=rendered)
    views = []
    for turn in main.rewritten:
        view = encode_conversation(tokenizer, messages[: turn + 1], eot=eot, cutoff_len=cutoff_len, masking="last",
                                   mask_thinking=mask_thinking, template_kwargs=template_kwargs)
        if view.status in (KEPT, TURNS_DROPPED):
            view.status, view.detail = VIEW, f"turn {turn} as generated"
        views.append(view)
    return [main, *views]


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, cutoff_len: int) -> list[list[int]]:
    """Plain text for ``stage: pt``: tokenized with the tokenizer's own BOS, EOS appended, split into
    blocks of at most ``cutoff_len`` tokens (every token trained)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return [ids[i : i + cutoff_len] for i in range(0, len(ids), cutoff_len) if len(ids[i : i + cutoff_len]) > 1]
