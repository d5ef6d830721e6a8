"""One decode loop over the model, shared by every request (continuous batching).

A background thread holds the running batch: left-padded rows with one KV cache. Between two decode steps it
admits waiting rows (their prompts prefilled together, their cache padded on the left to the batch's length and
joined to it) and drops finished ones, so a request never waits for another to end. Each row has its own sampling
(temperature, top_p, seed), stop strings, token limit and stop tokens; a greedy row gives the text batched
``infer.generate.generate`` gives for the same prompt.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from sftlab.errors import SftlabError

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More rows are waiting than ``max_queue`` allows."""


@dataclass(frozen=True)
class Sampling:
    """How one row is decoded; ``temperature`` 0 is greedy. ``top_k`` 0 and ``repetition_penalty`` 1 are off."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What a row reports: new text (``delta``), and at its end why it ended and how many tokens it generated."""

    delta: str = ""
    finish_reason: str | None = None  # "stop", "length"; "error" with the message in ``delta``
    completion_tokens: int = 0


@dataclass(eq=False)
class Row:
    """One answer being generated. ``strip``: the answer is reported stripped (chat answers, as ``generate`` gives
    them); whitespace at either end is held back until it is known not to be the end. ``emit`` is called from the
    engine's thread."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    strip: bool = True
    limit: int = 0  # most tokens it may generate (its max_tokens, less when the context is shorter); set by submit
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finished: bool = False
    cancelled: bool = False
    generator: torch.Generator | None = None


class Engine:
    """Continuous batching over one model. ``submit`` rows from any thread; their events come back through each
    row's ``emit``. At most ``max_batch`` rows decode together; ``submit`` raises QueueFull when admitting would
    leave more than ``max_queue`` rows waiting."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int], context_length: int,
                 max_batch: int = 16, max_queue: int = 64):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, set(stop_ids)
        self.context_length, self.max_batch, self.max_queue = context_length, max_batch, max_queue
        layers = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
        if layers - {"DynamicLayer"}:
            raise SftlabError(f"{type(model).__name__} has sliding-window attention layers, whose cache sftlab serve cannot batch yet; "
                              "serve it with sftlab chat, or a model with full attention in every layer")
        self.device = next(model.parameters()).device
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a LoRA adapter's PeftModel
        self.cache_key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"  # transformers < 5.2x
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.waiting: list[Row] = []
        self.wake = threading.Condition()
        self.stopped = False
        self.stats = {"steps": 0, "rows": 0, "peak_batch": 0}
        self._clear()
        self.thread = threading.Thread(target=self._run, name="sftlab-serve-engine", daemon=True)

    def _clear(self) -> None:
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # each row's next position

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=10)

    def submit(self, rows: list[Row]) -> None:
        """Queue rows (all or none); each row's ``limit`` is its max_tokens, cut to what the context leaves."""
        for row in rows:
            row.limit = min(row.sampling.max_tokens, self.context_length - len(row.prompt))
            if row.sampling.temperature > 0:
                row.generator = torch.Generator(device=self.device)
                row.generator.manual_seed(row.sampling.seed if row.sampling.seed is not None else random.getrandbits(63))
        with self.wake:
            if len(self.waiting) + len(rows) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} answers are waiting for a place in the batch (--max-queue {self.max_queue})")
            self.waiting.extend(rows)
            self.wake.notify()

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopped and not self.waiting and not self.rows:
                    self.wake.wait()
                if self.stopped:
                    return
                room = self.max_batch - len(self.rows)
                new, self.waiting = self.waiting[:room], self.waiting[room:]
            try:
                with torch.no_grad():
                    if new := [r for r in new if not r.cancelled]:
                        self._admit(new)
                    if self.rows:
                        self._step()
            except Exception as e:  # the batch fails, the server goes on: each of its rows reports the error
                log.exception("generation failed")
                for row in [*self.rows, *new]:
                    if not row.finished:
                        row.finished = True
                        row.emit(Event(f"generation failed: {e}", "error", len(row.generated)))
                self._clear()

    def _admit(self, new: list[Row]) -> None:
        """Prefill the new rows together and join them to the running batch."""
        longest = max(len(r.prompt) for r in new)
        ids = torch.full((len(new), longest), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(new):
            ids[i, longest - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, longest - len(r.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{self.cache_key: cache},
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            self._join(cache, mask)
        self.positions = torch.cat([self.positions, mask.sum(-1)])
        self.rows += new
        self.stats["rows"] += len(new)
        self._accept(self._sample(logits, new), len(self.rows) - len(new))

    def _join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append ``cache``'s rows to the batch's, the shorter of the two left-padded (masked) to the other's length."""
        grow = mask.shape[1] - self.mask.shape[1]
        for old, add in zip(self.cache.layers, cache.layers):
            for name in ("keys", "values"):
                a, b = getattr(old, name), getattr(add, name)
                if grow > 0:
                    a = torch.nn.functional.pad(a, (0, 0, grow, 0))
                elif grow < 0:
                    b = torch.nn.functional.pad(b, (0, 0, -grow, 0))
                setattr(old, name, torch.cat([a, b]))
        pad = torch.nn.functional.pad
        self.mask = torch.cat([pad(self.mask, (max(grow, 0), 0)), pad(mask, (max(-grow, 0), 0))])

    def _step(self) -> None:
        """One token for every running row."""
        last = torch.tensor([r.generated[-1] for r in self.rows], device=self.device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = self.model(input_ids=last, attention_mask=self.mask, position_ids=self.positions[:, None],
                            **{self.cache_key: self.cache}, use_cache=True).logits[:, -1]
        self.positions = self.positions + 1
        self.stats["steps"] += 1
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self.rows))
        self._accept(self._sample(logits, self.rows), 0)

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        """The next token of each row: argmax, or a draw from its own generator after penalty, temperature, top-k, top-p."""
        logits = logits.float()
        argmax = logits.argmax(-1).tolist()
        out = []
        for i, r in enumerate(rows):
            s, scores = r.sampling, logits[i]
            if s.temperature <= 0 and s.repetition_penalty == 1.0:
                out.append(argmax[i])
                continue
            if s.repetition_penalty != 1.0:
                seen = torch.tensor(r.prompt + r.generated, device=scores.device)
                picked = scores[seen]
                scores = scores.scatter(0, seen, torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty))
            if s.temperature <= 0:
                out.append(int(scores.argmax()))
                continue
            scores = scores / s.temperature
            if s.top_k > 0:
                kth = torch.topk(scores, min(s.top_k, scores.numel())).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if s.top_p < 1.0:
                ordered, index = torch.sort(scores, descending=True)
                cumulative = ordered.softmax(-1).cumsum(-1)
                drop = cumulative - ordered.softmax(-1) > s.top_p  # keep the smallest set reaching top_p (at least one)
                scores = scores.scatter(0, index, ordered.masked_fill(drop, float("-inf")))
            out.append(int(torch.multinomial(scores.softmax(-1), 1, generator=r.generator)))
        return out

    def _accept(self, tokens: list[int], first: int) -> None:
        """Give ``tokens`` to the rows from index ``first`` on, report their new text, drop the rows that ended."""
        for r, token in zip(self.rows[first:], tokens):
            r.generated.append(token)
            reason = None
            if token in self.stop_ids:
                reason = "stop"
            else:
                r.text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
                hits = [i for i in (r.text.find(s) for s in r.sampling.stop) if i >= 0]
                if hits:
                    r.text, reason = r.text[:min(hits)], "stop"
            if reason is None and (len(r.generated) >= r.limit):
                reason = "length"
            self._report(r, reason)
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            if not keep:
                self._clear()
                return
            index = torch.tensor(keep, device=self.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions = self.mask[index], self.positions[index]
            self._trim()

    def _trim(self) -> None:
        """Drop the left columns that are padding in every row (left by rows that ended)."""
        real = self.mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else 0
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def _report(self, r: Row, reason: str | None) -> None:
        if r.cancelled:
            r.finished = True
            return
        text = r.text
        if r.strip:
            text = text.lstrip() if reason is None else text.strip()
        if reason is None:
            text = _held_back(text.rstrip() if r.strip else text, r.sampling.stop)
        delta = text[r.sent:]
        r.sent = max(r.sent, len(text))
        if reason is not None:
            r.finished = True
            r.emit(Event(delta, reason, len(r.generated)))
        elif delta:
            r.emit(Event(delta))


def _held_back(text: str, stops: tuple[str, ...]) -> str:
    """``text`` less what may still change: an incomplete character, an end that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    cut = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), cut, -1):
            if text.endswith(s[:k]):
                cut = k
                break
    return text[:len(text) - cut] if cut else text
