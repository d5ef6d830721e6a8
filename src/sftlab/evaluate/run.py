"""``sftlab eval``: loss and perplexity on answer tokens (as trained), and with generation, scored answers.

The evaluation set is a list of ``Sample`` rows, read from datasets (``samples_from_datasets``) or picked
by their training refs (``samples_from_refs``: the validation split of a run). Loss uses training's own
encoding (labels on the answers and end-of-turn tokens, cutoff_len applied); generation answers the last
assistant turn of each conversation given everything before it, rendered with the template the model was
trained with.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftlab.config import SFTConfig
from sftlab.data.batching import collate
from sftlab.data.formats import FormatSpec, Message, RowError, to_messages
from sftlab.data.pipeline import encode_options, encode_rows
from sftlab.data.render import TRAINED_STATUSES, split_reasoning, with_default_system
from sftlab.data.rows import prompt_and_answer
from sftlab.data.sources import format_of, load_source, resolve_sources
from sftlab.errors import SftlabError
from sftlab.evaluate.metrics import Scores, fit_latency, score
from sftlab.evaluate.results import EvalResults, Prediction
from sftlab.infer.generate import GenerationSettings, generate, prompt_ids
from sftlab.model.loss import TokenLoss

log = logging.getLogger(__name__)

_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.S)


@dataclass
class Sample:
    ref: str  # "<dataset> sample <index>", as training names samples
    row: dict
    spec: FormatSpec


def samples_from_datasets(names: Sequence[str], dataset_dir: str, max_samples: int | None = None) -> list[Sample]:
    """The first ``max_samples`` rows of each dataset (names from dataset_info.json, or files)."""
    out = []
    for source in resolve_sources(list(names), dataset_dir):
        ds = load_source(source)
        spec = format_of(source, ds)
        n = min(x for x in (max_samples, source.num_samples, len(ds)) if x is not None)
        out += [Sample(f"{source.name} sample {i}", row, spec) for i, row in enumerate(ds.select(range(n)))]
    return out


def samples_from_refs(names: Sequence[str], dataset_dir: str, refs: Sequence[str]) -> list[Sample]:
    """The rows training named ``refs`` ("<dataset> sample <index>"), in that order."""
    wanted: dict[str, list[int]] = {}
    for ref in refs:
        name, _, index = ref.rpartition(" sample ")
        wanted.setdefault(name, []).append(int(index))
    found: dict[str, Sample] = {}
    for source in resolve_sources(list(names), dataset_dir):
        if source.name in wanted:
            ds = load_source(source)
            spec = format_of(source, ds)
            for i in wanted[source.name]:
                found[f"{source.name} sample {i}"] = Sample(f"{source.name} sample {i}", ds[i], spec)
    return [found[r] for r in refs]


# ---------------------------------------------------------------- loss


@torch.no_grad()
def answer_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, samples: Sequence[Sample], cfg: SFTConfig,
                batch_size: int = 8) -> tuple[float, int]:
    """(mean loss per trained token, trained tokens) over ``samples`` encoded as training encodes them (views
    included, cutoff_len applied). Samples training would not train are left out, as training leaves them out."""
    options = encode_options(cfg, tokenizer)
    encoded = []
    for spec in {id(s.spec): s.spec for s in samples}.values():
        rows = [s.row for s in samples if s.spec is spec]
        for result in encode_rows(rows, spec, tokenizer, options):
            if not isinstance(result, Exception):
                encoded += [e for e in result if e.status in TRAINED_STATUSES]
    if not encoded:
        raise SftlabError("no evaluation sample can be scored for loss (each is malformed, too long or has nothing to train)")
    encoded.sort(key=lambda e: len(e.input_ids))
    module = TokenLoss(model).eval()
    if hasattr(module.head_weight(), "ds_id"):  # DeepSpeed ZeRO-3 gathers a weight only in its module's forward: run the head whole
        module.selective = False
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        batch = collate({"input_ids": [e.input_ids for e in chunk], "labels": [e.labels for e in chunk]}, tokenizer.pad_token_id)
        loss_sum, n, _ = module(**{k: v.to(device) for k, v in batch.items()})
        total, tokens = total + float(loss_sum), tokens + int(n)
    return total / max(tokens, 1), tokens


# ---------------------------------------------------------------- generation


@dataclass
class Question:
    """What generation is asked for one sample: the conversation before its last answer, and that answer."""

    sample: Sample
    messages: list[Message]  # ends before the last assistant turn
    prompt_text: str
    reference: str


def questions(samples: Sequence[Sample], default_system: str | None) -> tuple[list[Question], list[tuple[str, str]]]:
    """Each sample as a question; samples that cannot be read are returned as (ref, reason) and left out."""
    out, skipped = [], []
    for s in samples:
        try:
            messages = with_default_system(to_messages(s.row, s.spec), default_system)
        except RowError as e:
            skipped.append((s.ref, str(e)))
            continue
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append(Question(s, messages[:last], prompt_and_answer(messages)[0], split_reasoning(messages[last])[1]))
    return out, skipped


def answer_part(prediction: str) -> str:
    """A prediction without a leading <think> block: the answer that is scored."""
    return _THINK.sub("", prediction, count=1)


def predict(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, asked: Sequence[Question], settings: GenerationSettings,
            batch_size: int = 16, template_kwargs: dict | None = None, on_batch: Callable[[int], None] | None = None) -> list[str]:
    prompts = [prompt_ids(tokenizer, q.messages, **(template_kwargs or {})) for q in asked]
    return generate(model, tokenizer, prompts, settings, batch_size, on_batch)


def answer_and_score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, samples: Sequence[Sample], cfg: SFTConfig,
                     settings: GenerationSettings, scorers: Sequence[str] = (), batch_size: int = 16,
                     on_batch: Callable[[int], None] | None = None) -> tuple[list[Question], list[str], Scores]:
    """The last answer of each sample generated and scored against its reference: (the questions asked, the answers,
    their scores). Samples that cannot be read are left out (the first three named in the log)."""
    asked, skipped = questions(samples, cfg.default_system)
    for ref, reason in skipped[:3]:
        log.warning("%s: left out of generation (%s)", ref, reason)
    answers = predict(model, tokenizer, asked, settings, batch_size, template_kwargs(cfg), on_batch)
    scored = score([answer_part(a) for a in answers], [q.reference for q in asked], scorers, [q.sample.ref for q in asked])
    return asked, answers, scored


def template_kwargs(cfg: SFTConfig) -> dict:
    """Variables the chat template gets at generation, as at training (enable_thinking)."""
    return {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}


# ---------------------------------------------------------------- the whole evaluation


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, samples: Sequence[Sample], cfg: SFTConfig, *,
             model_name: str, adapter: str | None, datasets: Sequence[str], with_generation: bool, scorers: Sequence[str] = (),
             settings: GenerationSettings | None = None, batch_size: int = 16,
             on_batch: Callable[[int], None] | None = None) -> tuple[EvalResults, list[Prediction]]:
    """Loss and perplexity; with generation, the scores of the answers and one Prediction per sample."""
    if not samples:
        raise SftlabError("the evaluation set is empty: give a dataset with --dataset (or val_size in the config)")
    was_training = model.training
    model.eval()
    try:
        loss, _ = answer_loss(model, tokenizer, samples, cfg, batch_size=max(1, batch_size // 2))
        metrics: dict[str, float | None] = {"eval_loss": round(loss, 6), "perplexity": round(math.exp(loss), 4) if loss < 700 else None}
        predictions: list[Prediction] = []
        settings = settings or GenerationSettings.from_config(cfg)
        if with_generation:
            asked, answers, scored = answer_and_score(model, tokenizer, samples, cfg, settings, scorers, batch_size, on_batch)
            metrics.update(scored.corpus)
            predictions = [Prediction(i, q.sample.ref, q.prompt_text, q.reference, a, s)
                           for i, (q, a, s) in enumerate(zip(asked, answers, scored.per_sample))]
    finally:
        model.train(was_training)
    results = EvalResults(model_name, adapter, list(datasets), len(samples), metrics,
                          settings.to_dict() if with_generation else None)
    return results, predictions


# ---------------------------------------------------------------- latency


@torch.no_grad()
def measure_latency(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int],
                    lengths: Sequence[int] = (1, 8, 32, 64), repeats: int = 3) -> dict:
    """Time to generate exactly x tokens for each x in ``lengths`` (greedy, batch 1, best of ``repeats``), and the
    fit time = k·x + b: b is the first-token time (prompt processing), k the time per further token."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    points = []
    def run(x: int) -> None:  # exactly x new tokens: no stop token ends it early
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), min_new_tokens=x, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=None, use_cache=True, **GenerationSettings(max_new_tokens=x).kwargs())

    run(2)  # warm-up
    for x in lengths:
        best = math.inf
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        points.append((x, best))
    fit = fit_latency(points)
    return {**fit.to_dict(), "prompt_tokens": len(prompt), "points": [{"new_tokens": x, "seconds": round(t, 5)} for x, t in points]}
