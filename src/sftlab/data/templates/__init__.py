"""Which chat template renders conversations: the tokenizer's own, or a built-in Jinja file for tokenizers that ship none.

``template:`` takes three kinds of names (see docs/templates.md):

* empty: the tokenizer's own template.
* a LLaMA-Factory template name (``qwen3_nothink``, ``llama3``, ``glm4``, … listed in ``llamafactory.json``; sftlab's
  built-in names are all among them): the tokenizer's own template when it has one (``*_nothink`` names also make
  ``enable_thinking: false`` its default), with a warning when the built-in equivalent renders other tokens; else
  the built-in equivalent, or an error when sftlab has none.
* ``builtin:NAME``: the built-in ``NAME``, replacing the tokenizer's own (with a warning).

The template used is saved with the trained model.
"""

from __future__ import annotations

import difflib
import json
import logging
from functools import lru_cache
from importlib import resources
from typing import Any

from transformers import PreTrainedTokenizerBase

from sftlab.errors import SftlabError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"  # template: builtin:NAME forces a built-in over the tokenizer's own template

# Written in front of the tokenizer's own template for a thinking-disabled name: enable_thinking defaults to false,
# and a value passed explicitly (inference with enable_thinking: true) still wins.
NOTHINK_DEFAULT = "{%- if enable_thinking is not defined -%}{%- set enable_thinking = false -%}{%- endif -%}\n"

# Conversations both templates render when the tokenizer's own is compared with a built-in equivalent.
PROBES = (
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
)


def builtin_names() -> list[str]:
    files = resources.files(__package__).iterdir()
    return sorted(f.name.removesuffix(".jinja") for f in files if f.name.endswith(".jinja"))


def builtin_template(name: str) -> str:
    """The text of the built-in template ``name``. Raises SftlabError for a name that is not one."""
    if name not in builtin_names():
        raise SftlabError(f"template: unknown template '{name}'; built-in ones are {', '.join(builtin_names())} "
                          "(or leave it empty to use the tokenizer's own)")
    return resources.files(__package__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def llamafactory_templates() -> dict[str, dict[str, Any]]:
    """LLaMA-Factory's template names → ``{"builtin": sftlab equivalent or None, "thinking": False (optional),
    "note": how a same-named built-in differs (optional)}``, from ``llamafactory.json`` (which names its source)."""
    text = resources.files(__package__).joinpath("llamafactory.json").read_text(encoding="utf-8")
    return json.loads(text)["templates"]


def resolve_template(name: str | None, own: str | dict | None, tokenizer: PreTrainedTokenizerBase | None = None,
                     enable_thinking: bool | None = None) -> str:
    """The Jinja chat template to render with, for ``template: name`` and the tokenizer's own template ``own``.

    ``tokenizer`` (optional) renders the probe conversations that compare ``own`` with a built-in equivalent;
    ``enable_thinking`` is the config's setting. Raises SftlabError for an unknown name, a thinking-disabled name
    with ``enable_thinking: true``, or no template at all (no own template and no built-in for ``name``).
    """
    if isinstance(own, dict):  # several named templates: the default one renders conversations
        own = own.get("default")
    if not name:
        if not own:
            raise SftlabError("this tokenizer has no chat template: set template: default (base models), chatml or llama3")
        return own
    if name.startswith(BUILTIN_PREFIX):
        return _forced_builtin(name.removeprefix(BUILTIN_PREFIX), own)
    entry = llamafactory_templates().get(name)
    if entry is None:
        if name in builtin_names():  # a built-in LLaMA-Factory lacks keeps the meaning "replace the own template"
            return _forced_builtin(name, own)
        raise SftlabError(_unknown_message(name))
    _check_thinking(name, entry, enable_thinking)
    if own:
        return _own_for(name, entry, own, tokenizer, enable_thinking)
    return _builtin_for(name, entry)


def _forced_builtin(name: str, own: str | None) -> str:
    """The built-in ``name``, replacing the tokenizer's own template (warned)."""
    if name not in builtin_names():
        close = difflib.get_close_matches(name, builtin_names(), n=3, cutoff=0.5)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise SftlabError(f"template: {BUILTIN_PREFIX}{name}: no built-in template '{name}'{hint}; built-in ones are {', '.join(builtin_names())}")
    text = builtin_template(name)
    if own and own != text:
        log.warning("template: %s replaces the tokenizer's own chat template (the one used is saved with the model)", name)
    return text


def _check_thinking(name: str, entry: dict[str, Any], enable_thinking: bool | None) -> None:
    """A thinking-disabled LLaMA-Factory name and ``enable_thinking: true`` contradict each other."""
    if entry.get("thinking") is False and enable_thinking is True:
        raise SftlabError(f"template: {name} means enable_thinking: false (LLaMA-Factory's template without thinking), "
                          "but enable_thinking: true is set; remove one of them")


def _own_for(name: str, entry: dict[str, Any], own: str, tokenizer: PreTrainedTokenizerBase | None, enable_thinking: bool | None) -> str:
    """The tokenizer's own template for the LLaMA-Factory name ``name`` (thinking off by default for a
    thinking-disabled name), with a warning when the built-in equivalent renders other tokens."""
    text, extra = own, ""
    if entry.get("thinking") is False:
        if "enable_thinking" in own:
            text = own if own.startswith(NOTHINK_DEFAULT) else NOTHINK_DEFAULT + own
            extra = ", with enable_thinking: false as its default (written into the saved template)"
        else:
            extra = "; it has no thinking switch, so enable_thinking: false changes nothing"
    log.info("template: %s (a LLaMA-Factory name) means the tokenizer's own chat template%s", name, extra)
    builtin = entry.get("builtin") or (name if name in builtin_names() else None)
    if builtin is None or tokenizer is None:
        return text
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    diff = first_difference(tokenizer, text, builtin_template(builtin), kwargs)
    if diff:
        origin = f"LLaMA-Factory's {name} format" if entry.get("builtin") else f"not LLaMA-Factory's format: {entry.get('note')}"
        log.warning("template: %s: the tokenizer's own chat template (used) renders other tokens than the built-in %s (%s): %s; "
                    "to train with the built-in set template: %s%s", name, builtin, origin, diff, BUILTIN_PREFIX, builtin)
    return text


def _builtin_for(name: str, entry: dict[str, Any]) -> str:
    """The built-in for the LLaMA-Factory name ``name`` when the tokenizer ships no template."""
    equivalent = entry.get("builtin")
    if equivalent:
        log.info("template: %s (a LLaMA-Factory name): the tokenizer has no chat template; the built-in %s renders the same format",
                 name, equivalent)
        return builtin_template(equivalent)
    if name in builtin_names():  # sftlab's same-named built-in, a different format (llamafactory.json says how)
        log.warning("template: %s: sftlab's built-in %s is used, which is not LLaMA-Factory's format (%s)", name, name, entry.get("note"))
        return builtin_template(name)
    usable = builtin_names() + [n for n, e in llamafactory_templates().items() if e.get("builtin")]
    close = difflib.get_close_matches(name, sorted(set(usable)), n=5, cutoff=0.5)
    hint = f"; close names that work here: {', '.join(close)}" if close else ""
    raise SftlabError(f"template: {name} is a LLaMA-Factory template sftlab has no built-in equivalent for, and this tokenizer ships "
                      f"no chat template{hint}; use a model whose tokenizer ships a chat template, or a built-in: {', '.join(builtin_names())}")


def _unknown_message(name: str) -> str:
    known = sorted(set(llamafactory_templates()) | set(builtin_names()))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return (f"template: unknown template '{name}' (neither a LLaMA-Factory template name nor a built-in){hint}; "
            f"built-in ones are {', '.join(builtin_names())} ({BUILTIN_PREFIX}NAME forces one over the tokenizer's own), "
            "or leave it empty to use the tokenizer's own")


def first_difference(tokenizer: PreTrainedTokenizerBase, own: str, builtin: str, template_kwargs: dict[str, Any] | None = None) -> str | None:
    """Where the two templates first render different token ids on ``PROBES`` ("probe N, token I: own '…' vs
    built-in '…'"), or None when they agree on every probe either can render."""
    kwargs = template_kwargs or {}
    for n, messages in enumerate(PROBES, 1):
        try:
            a = _ids(tokenizer, messages, own, kwargs)
            b = _ids(tokenizer, messages, builtin, kwargs)
        except Exception:  # jinja2 errors and template-raised exceptions alike: a template that refuses a probe is not compared on it
            continue
        if a != b:
            i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            snippet = lambda ids: tokenizer.decode(ids[max(0, i - 2): i + 6])  # noqa: E731
            return f"probe {n}, token {i}: own {snippet(a)!r} vs built-in {snippet(b)!r}"
    return None


def _ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template: str, kwargs: dict[str, Any]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])
