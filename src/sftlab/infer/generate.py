"""Generation with the chat template the model was trained with: batched (eval, predict) or streamed (chat).

Prompts are rendered exactly as training rendered them (``apply_chat_template`` with the generation prompt,
tokenized without adding special tokens), so inference sees what training taught.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer

from sftlab.config import SFTConfig
from sftlab.data.formats import Message
from sftlab.data.render import end_of_turn_token, render
from sftlab.model.load import Trained, load_for_inference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated; ``temperature`` 0 is greedy decoding."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    top_k: int = 0

    @classmethod
    def from_config(cls, cfg: SFTConfig, **overrides) -> "GenerationSettings":
        values = {k: getattr(cfg, k) for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "top_k")}
        if cfg.do_sample is False:  # LLaMA-Factory's do_sample: false decodes greedily whatever temperature says
            values["temperature"] = 0.0
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def kwargs(self) -> dict:
        sample = self.temperature > 0
        out = dict(max_new_tokens=self.max_new_tokens, do_sample=sample, repetition_penalty=self.repetition_penalty)
        if sample:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # silence a model's generation_config sampling defaults under greedy decoding
            out.update(temperature=None, top_p=None, top_k=None)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def load_trained(trained: Trained, trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``load_for_inference`` on the GPU when one is visible, else on the CPU; says what it loads."""
    log.info("loading %s", trained.describe())
    return load_for_inference(trained, "cuda" if torch.cuda.is_available() else "cpu", trust_remote_code=trust_remote_code)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS and the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``): generation ends at either."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        ids.append(tokenizer.convert_tokens_to_ids(eot))
    return sorted(set(ids))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], **template_kwargs) -> list[int]:
    """The conversation so far, rendered with the generation prompt and tokenized as training tokenizes."""
    text = render(tokenizer, messages, add_generation_prompt=True, **template_kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
             settings: GenerationSettings, batch_size: int = 16, on_batch=None) -> list[str]:
    """One answer per prompt (token ids), in order. Prompts are batched by length (less padding), left-padded.
    Answers are decoded without special tokens and stripped. ``on_batch(n)`` reports progress."""
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        longest = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            ids[row, longest - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, longest - len(prompts[i]):] = 1
        device = _device(model)
        new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), eos_token_id=stops, pad_token_id=pad,
                             use_cache=True, **settings.kwargs())[:, longest:]
        for row, i in enumerate(chunk):
            out[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def stream(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int],
           settings: GenerationSettings) -> Iterator[str]:
    """The answer to one prompt, piece by piece as tokens are generated (generation runs in a thread)."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids = torch.tensor([prompt], device=_device(model))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=stop_token_ids(tokenizer),
                  pad_token_id=tokenizer.pad_token_id, use_cache=True, streamer=streamer, **settings.kwargs())
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
