"""``sftlab chat``: a multi-turn conversation in the terminal, answers streamed as they are generated."""

from __future__ import annotations

from typing import TextIO

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftlab.data.formats import Message
from sftlab.infer.generate import GenerationSettings, prompt_ids, stream

HELP = "commands: /clear (new conversation), /system TEXT (set the system prompt and start over), /exit"


def chat_loop(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: GenerationSettings, system: str | None,
              inp: TextIO, out: TextIO, template_kwargs: dict | None = None) -> list[Message]:
    """Read user turns from ``inp`` (one per line) until /exit or end of input; stream each answer to ``out``.
    Returns the conversation as it stands at the end. The prompt marks are shown only on a terminal."""
    interactive = inp.isatty()
    history: list[Message] = []

    def start() -> list[Message]:
        return [{"role": "system", "content": system}] if system else []

    history = start()
    if interactive:
        out.write(f"sftlab chat — {HELP}\n")
    while True:
        if interactive:
            out.write("\nuser> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/clear":
            history = start()
            out.write("(conversation cleared)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = start()
            out.write(f"(system prompt {'set' if system else 'removed'}; conversation cleared)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        if interactive:
            out.write("assistant> ")
        answer, shown = "", 0
        for piece in stream(model, tokenizer, prompt_ids(tokenizer, history, **(template_kwargs or {})), settings):
            answer += piece
            visible = answer.strip()  # whitespace at either end is held back: what is shown is the stripped answer
            lead = len(answer) - len(answer.lstrip())
            out.write(answer[lead + shown:lead + len(visible)])
            out.flush()
            shown = len(visible)
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": answer.strip()})
    return history
