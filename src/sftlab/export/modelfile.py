"""An Ollama ``Modelfile`` beside an exported GGUF: ``FROM``, a ``TEMPLATE`` translated from the chat template training
used, the template's default system prompt (``SYSTEM``) and its end-of-turn token (``PARAMETER stop``).

The translation renders the Hugging Face chat template on sentinel conversations and reads off the text each role
puts before and after its content (``derive_pieces``), then writes them in Ollama's Go template form: the system
block, then ``range .Messages`` with one branch per role, the generation prompt after the last user message. This
covers templates that wrap every message the same way whatever its position (ChatML, Qwen, SmolLM2, Llama 3,
Gemma…). Before it is used, the translation is checked against the chat template on real conversations of several
shapes; a template it cannot express (one that moves the system prompt into a user turn, renders turns differently
by position, or drops content) gets a Modelfile without ``TEMPLATE`` — Ollama then falls back to the GGUF's own
``tokenizer.chat_template`` — and a warning that says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from sftlab.data.render import end_of_turn_token, render

_S, _U1, _A1, _U2 = "SFTLABSYSTEMTEXT", "SFTLABUSERONE", "SFTLABANSWERONE", "SFTLABUSERTWO"


class Untranslatable(ValueError):
    """The chat template cannot be written as per-role prefix/suffix strings; the message says why."""


@dataclass(frozen=True)
class Pieces:
    """The text a chat template writes around each message. ``start``: the text before the first user message when
    there is no system message (the template's default system block, if any); ``system_prefix``/``system_suffix``
    surround a given system prompt (None: the template refuses system messages); ``generation``: the generation
    prompt after the last user message; ``default_system``: the system prompt ``start`` holds."""

    start: str
    system_prefix: str | None
    system_suffix: str | None
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation: str
    default_system: str | None

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template renders for ``messages`` (Ollama's semantics: system messages become ``.System``)."""
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        out = [self.system_prefix + system + self.system_suffix if system and self.system_prefix is not None else self.start]
        rest = [m for m in messages if m["role"] != "system"]
        for i, m in enumerate(rest):
            last = i == len(rest) - 1
            if m["role"] == "user":
                out.append(self.user_prefix + m["content"] + self.user_suffix + (self.generation if last else ""))
            elif m["role"] == "assistant":
                out.append(self.assistant_prefix + m["content"] + ("" if last else self.assistant_suffix))
        return "".join(out)


def _split(text: str, *sentinels: str) -> list[str]:
    """``text`` cut at each sentinel, in order; Untranslatable when one is missing, repeated or out of order."""
    parts, rest = [], text
    for s in sentinels:
        if text.count(s) != 1 or s not in rest:
            raise Untranslatable(f"the chat template does not write each message's content once, in order (looking for {s})")
        head, rest = rest.split(s)
        parts.append(head)
    return [*parts, rest]


def _cut_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise Untranslatable(f"the chat template writes {what} differently depending on the turn's position")
    return text[len(prefix):]


def _cut_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise Untranslatable(f"the chat template writes {what} differently depending on the turn's position")
    return text[: len(text) - len(suffix)]


def derive_pieces(tokenizer: PreTrainedTokenizerBase) -> Pieces:
    """The per-role strings of ``tokenizer``'s chat template; Untranslatable when it does not wrap messages that way."""
    u1, a1, u2 = ({"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2})
    try:
        t_u, t_ug = render(tokenizer, [u1]), render(tokenizer, [u1], add_generation_prompt=True)
        t_ua, t_uau = render(tokenizer, [u1, a1]), render(tokenizer, [u1, a1, u2])
    except Exception as e:  # jinja2 errors and template-raised exceptions alike
        raise Untranslatable(f"the chat template cannot render a plain user/assistant conversation ({type(e).__name__})") from e
    generation = _cut_prefix(t_ug, t_u, "the generation prompt")
    start_user, user_suffix = _split(t_u, _U1)
    assistant_suffix = _split(t_ua, _U1, _A1)[2]
    pre, mid1, mid2, tail = _split(t_uau, _U1, _A1, _U2)
    if pre != start_user or tail != user_suffix:
        raise Untranslatable("the chat template writes the user turns differently depending on their position")
    assistant_prefix = _cut_prefix(mid1, user_suffix, "the end of a user turn")
    user_prefix = _cut_prefix(mid2, assistant_suffix, "the end of an answer")
    start = _cut_suffix(start_user, user_prefix, "the start of a user turn")

    system_prefix = system_suffix = default_system = None
    try:
        t_su = render(tokenizer, [{"role": "system", "content": _S}, u1])
    except Exception:  # the template refuses system messages (Gemma): no system block
        t_su = None
    if t_su is not None:
        system_prefix, between, after = _split(t_su, _S, _U1)
        if after != user_suffix:
            raise Untranslatable("the chat template writes a user turn after a system prompt differently")
        system_suffix = _cut_suffix(between, user_prefix, "the start of a user turn after a system prompt")
        if start.startswith(system_prefix) and start.endswith(system_suffix) and len(start) >= len(system_prefix) + len(system_suffix):
            default_system = start[len(system_prefix): len(start) - len(system_suffix)] or None
    return Pieces(start, system_prefix, system_suffix, user_prefix, user_suffix, assistant_prefix, assistant_suffix,
                  generation, default_system)


# Conversation shapes the translation must render exactly as the chat template does (with the generation prompt,
# as Ollama renders a chat request).
_CHECKS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Give me a synonym for 'happy'."}, {"role": "assistant", "content": "Joyful."},
     {"role": "user", "content": "And an antonym?"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "1加1等于几？"},
     {"role": "assistant", "content": "1加1等于2。"}, {"role": "user", "content": "2加2呢？"}],
]


def go_template(p: Pieces) -> str:
    """The pieces in Ollama's Go template syntax. Literal text always touches ``}}`` and ``{{`` without a trim marker,
    so the ``{{-`` markers only remove the line breaks between actions, never the template's own whitespace."""
    if p.system_prefix is not None:
        head = f"{{{{ if .System }}}}{p.system_prefix}{{{{ .System }}}}{p.system_suffix}{{{{ else }}}}{p.start}{{{{ end }}}}"
    else:
        head = p.start
    return (
        f"{head}\n"
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        f'{{{{- if eq .Role "user" }}}}{p.user_prefix}{{{{ .Content }}}}{p.user_suffix}{{{{ if $last }}}}{p.generation}{{{{ end }}}}\n'
        f'{{{{- else if eq .Role "assistant" }}}}{p.assistant_prefix}{{{{ .Content }}}}{{{{ if not $last }}}}{p.assistant_suffix}{{{{ end }}}}\n'
        "{{- end }}\n"
        "{{- end }}"
    )


def modelfile(gguf_file: str, tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[str], bool]:
    """(Modelfile text, warnings, whether it has a TEMPLATE) for ``gguf_file`` (a name beside the Modelfile)."""
    warnings: list[str] = []
    lines = ["# Ollama: ollama create NAME -f Modelfile   (written by sftlab export from the chat template training used)",
             f"FROM ./{gguf_file}"]
    pieces = None
    try:
        pieces = derive_pieces(tokenizer)
        texts = [m for m in [pieces.system_prefix, pieces.system_suffix, pieces.start, pieces.user_prefix, pieces.user_suffix,
                             pieces.assistant_prefix, pieces.assistant_suffix, pieces.generation] if m]
        if any("{{" in t or '"""' in t for t in texts):
            raise Untranslatable('the chat template writes "{{" or \'"""\', which a Modelfile TEMPLATE cannot hold')
        for messages in _CHECKS:
            if pieces.system_prefix is None and messages[0]["role"] == "system":
                continue
            if pieces.render(messages) != render(tokenizer, messages, add_generation_prompt=True):
                raise Untranslatable(f"the translation renders a {len(messages)}-message conversation differently from the chat template")
    except Untranslatable as e:
        pieces = None
        warnings.append(f"Modelfile without TEMPLATE: {e}; Ollama will use the GGUF's chat template as it understands it")
    if pieces is not None:
        lines.append(f'TEMPLATE """{go_template(pieces)}"""')
        if pieces.default_system:
            lines.append(f'SYSTEM """{pieces.default_system}"""')
        if pieces.system_prefix is None:
            warnings.append("the chat template refuses system messages, so the Modelfile's TEMPLATE has no system block")
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        lines.append(f'PARAMETER stop "{eot}"')
    return "\n".join(lines) + "\n", warnings, pieces is not None
