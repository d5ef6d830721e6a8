"""Build the tokenized train / validation datasets for a config: load → rows to messages → encode → split.

Every step after loading is a ``datasets.map`` over Arrow data; per-sample outcomes (kept, turns
dropped, too long, not prefix-stable, nothing to train) are counted and the first few named.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import pyarrow.compute as pc
import xxhash
from datasets.fingerprint import Hasher
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from sftlab.config import Masking, SFTConfig
from sftlab.data.check import row_problems
from sftlab.data.formats import FormatSpec, RowError, to_messages, to_text, to_tools
from sftlab.data.render import (
    IGNORE_INDEX, KEPT, TOO_LONG, TRAINED_STATUSES, TURNS_DROPPED, VIEW, Encoded, apply_thinking, encode_sample, encode_text, end_of_turn_token,
    render, renders_reasoning_content, tokenize_rendered, renders_tools, template_warnings, with_default_system,
)
from sftlab.data.sources import Source, format_of, load_source, resolve_sources
from sftlab.errors import SftlabError

log = logging.getLogger(__name__)

ERROR = "error"
_NAMED = 3  # how many problem samples a report names


@dataclass
class DataReport:
    """What happened to every sample: counts per status and the first few samples of each problem."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    cutoff_len: int = 0
    n_train: int = 0
    n_eval: int = 0
    tokens: int = 0  # of the trained samples, train and validation
    trained_tokens: int = 0
    longest: int = 0
    problems: Counter = field(default_factory=Counter)  # check's problem kind → rows (that are still trained)
    problem_refs: dict[str, list[str]] = field(default_factory=dict)

    def name(self, status: str, ref: str, detail: str) -> None:
        """Remember ``ref`` as an example of ``status``."""
        self.examples.setdefault(status, []).append(f"{ref} ({detail})" if detail else ref)

    def summary(self) -> str:
        """One paragraph: samples read, trained, dropped, over cutoff_len, tokens (with the common 5 % advice)."""
        views = self.counts[VIEW]
        total = sum(self.counts.values()) - views
        trained = sum(self.counts[s] for s in TRAINED_STATUSES) - views
        cut, dropped_long = self.counts[TURNS_DROPPED], self.counts[TOO_LONG]
        over = cut + dropped_long
        text = (f"Data: {total:,} samples read, {trained:,} trained ({self.n_train:,} train, {self.n_eval:,} validation"
                + (f", incl. {views:,} extra views" if views else "") + f"), {total - trained:,} left out. "
                f"{over:,} ({over / max(total, 1):.1%}) are over cutoff_len {self.cutoff_len}: {cut:,} lost later turns, "
                f"{dropped_long:,} dropped. {self.tokens:,} tokens, {self.trained_tokens:,} trained "
                f"({self.trained_tokens / max(self.tokens, 1):.0%}); the longest sample has {self.longest:,}.")
        if over > 0.05 * total:
            text += (" More than 5 % are over cutoff_len: raise it (sftlab data stats shows the length that covers"
                     " 95/99 % of samples) or remove the long samples.")
        return text

    def lines(self) -> list[str]:
        views = self.counts[VIEW]
        total = sum(self.counts.values()) - views
        trained = sum(self.counts[s] for s in TRAINED_STATUSES) - views
        out = [f"{trained} of {total} samples will be trained"]
        if views:
            out.append(f"  +{views} views: answers the template rewrites once later turns follow (e.g. drops <think>), "
                       "each trained as the model generates it")
        for status, n in sorted(self.counts.items()):
            if status not in (KEPT, VIEW):
                out.append(f"  {status}: {n} — e.g. " + "; ".join(self.examples.get(status, [])))
        for kind, n in self.problems.most_common():
            out.append(f"  check: {kind}: {n} — e.g. " + "; ".join(self.problem_refs.get(kind, []))
                       + " (sftlab data check lists why)")
        return out


@dataclass
class Data:
    train: datasets.Dataset  # columns: input_ids, labels
    eval: datasets.Dataset | None
    report: DataReport
    eval_refs: list[str] = field(default_factory=list)  # the validation samples' rows ("<dataset> sample <i>"), for generation
    pad_id: int = 0  # the token padded batches are padded with (the tokenizer's pad token)


@dataclass(frozen=True)
class EncodeOptions:
    """Everything encoding needs besides the rows: the config's encoding keys and what probing the template found.

    Made by ``encode_options``; ``dataclasses.replace`` changes one. Plain values only, so that ``datasets``
    fingerprints it the same in every process (the map cache key).
    """

    stage: Literal["sft", "pt"]  # sft: chat samples; pt: plain text in cutoff_len blocks
    eot: str | None  # the template's end-of-turn token, trained after each answer (None: it writes none; pt: unused)
    cutoff_len: int  # longest sample in tokens
    masking: Masking  # which tokens are trained: every assistant turn, the last one, or all
    default_system: str | None  # system prompt for samples that have none
    thinking: Literal["train", "mask", "drop"]  # reasoning in answers: trained, shown untrained, or dropped
    native_reasoning: bool  # the template renders reasoning_content itself (else it goes into the content)
    native_tools: bool  # the template renders tools and tool_calls (else a row with them is refused)
    enable_thinking: bool | None  # passed to templates with a thinking switch (None: not passed)

    @property
    def template_kwargs(self) -> dict[str, Any]:
        """Variables every render passes to the chat template."""
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}


def encode_row(row: dict[str, Any], spec: FormatSpec, tokenizer: PreTrainedTokenizerBase, options: EncodeOptions) -> list[Encoded]:
    """One dataset row as training encodes it: the sample, then one VIEW per answer the template rewrites
    (``stage: pt``: one block per ``cutoff_len`` tokens). Raises RowError for a row that cannot become a
    sample, TemplateError when the template refuses it."""
    encoded = encode_rows([row], spec, tokenizer, options)[0]
    if isinstance(encoded, Exception):
        raise encoded
    return encoded


def encode_rows(
    rows: list[dict[str, Any]], spec: FormatSpec, tokenizer: PreTrainedTokenizerBase, options: EncodeOptions,
) -> list[list[Encoded] | RowError | TemplateError]:
    """``encode_row`` for each row, with the whole batch tokenized in one call; a row that cannot be encoded gets
    its RowError or TemplateError in its place."""
    if options.stage == "pt":
        out: list[list[Encoded] | RowError | TemplateError] = []
        for row in rows:
            try:
                blocks = encode_text(tokenizer, to_text(row, spec), options.cutoff_len)
                out.append([Encoded(ids, list(ids), KEPT) for ids in blocks])
            except RowError as e:
                out.append(e)
        return out
    prepared: list[tuple[list, dict, str] | RowError | TemplateError] = []
    for row in rows:
        try:
            messages = apply_thinking(with_default_system(to_messages(row, spec), options.default_system), options.thinking,
                                      options.native_reasoning)
            tools = to_tools(row, spec)
            if (tools or any("tool_calls" in m for m in messages)) and not options.native_tools:
                raise RowError("the chat template cannot render tools or tool calls, so they would be lost; "
                               "use the model's own template if it has tool support, or a model that has one")
            kwargs = {**options.template_kwargs, "tools": tools} if tools else options.template_kwargs
            prepared.append((messages, kwargs, render(tokenizer, messages, **kwargs)))
        except (RowError, TemplateError) as e:  # a template that refuses the conversation fails this row alone
            prepared.append(e)
    rendered = iter(tokenize_rendered(tokenizer, [p[2] for p in prepared if not isinstance(p, Exception)]))
    return [p if isinstance(p, Exception) else
            encode_sample(tokenizer, p[0], eot=options.eot, cutoff_len=options.cutoff_len, masking=options.masking,
                          mask_thinking=options.thinking == "mask", template_kwargs=p[1], rendered=next(rendered))
            for p in prepared]


def _encode_batch(
    batch: dict[str, list], indices: list[int], *, spec: FormatSpec, name: str, tokenizer: PreTrainedTokenizerBase,
    options: EncodeOptions,
) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": [], "detail": [], "ref": [], "problems": []}
    keys = list(batch)
    rows = [{k: batch[k][j] for k in keys} for j in range(len(indices))]
    for row, index, result in zip(rows, indices, encode_rows(rows, spec, tokenizer, options)):
        ref = f"{name} sample {index}"
        if isinstance(result, Exception):
            encoded = [([], [], ERROR, str(result) if isinstance(result, RowError) else f"the chat template refuses it: {result}")]
        else:
            encoded = [(e.input_ids, e.labels, e.status, e.detail) for e in result]
        # check's cheap per-row rules (no tokenizer): what training accepts but would learn wrong, e.g. empty answers
        # one string column ("" = none): a list column would be list<null> in shards without problems
        problems = "\n".join(kind for kind, _ in row_problems(row, spec)) if encoded[0][2] != ERROR else ""
        for k, (ids, labels, status, detail) in enumerate(encoded):
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["status"].append(status)
            out["detail"].append(detail)
            out["ref"].append(ref)
            out["problems"].append(problems if k == 0 else "")  # once per row, not per view
    return out


def encode_options(cfg: SFTConfig, tokenizer: PreTrainedTokenizerBase) -> EncodeOptions:
    """Everything encode_row needs besides the row; the template is probed here, once per run."""
    sft = cfg.stage == "sft"
    return EncodeOptions(stage=cfg.stage, eot=end_of_turn_token(tokenizer) if sft else None, cutoff_len=cfg.cutoff_len,
                         masking=cfg.masking, default_system=cfg.default_system, thinking=cfg.thinking,
                         native_reasoning=sft and renders_reasoning_content(tokenizer),
                         native_tools=sft and renders_tools(tokenizer), enable_thinking=cfg.enable_thinking)


def encode_source(cfg: SFTConfig, tokenizer: PreTrainedTokenizerBase, source: Source, options: EncodeOptions) -> datasets.Dataset:
    """One source → encoded rows with columns input_ids, labels, status, detail, ref."""
    ds = load_source(source)
    spec = format_of(source, ds)
    limit = min(n for n in (cfg.max_samples, source.num_samples, len(ds)) if n is not None)
    ds = ds.select(range(limit))
    workers = min(cfg.preprocessing_num_workers or 1, os.cpu_count() or 1)
    if workers > 1:
        no_tokenizer_threads_in_forks()
    kwargs = dict(spec=spec, name=source.name, tokenizer=tokenizer, options=options)
    return ds.map(
        _encode_batch,
        with_indices=True,
        batched=True,
        batch_size=256,
        remove_columns=ds.column_names,
        num_proc=workers if workers > 1 and len(ds) >= 256 * workers else None,
        fn_kwargs=kwargs,
        # datasets fingerprints a module-level function by its name, not its code: without the code's own hash an
        # upgraded sftlab would reuse encodings the previous version cached
        new_fingerprint=Hasher.hash([ds._fingerprint, kwargs, encoding_code_version()]),
        desc=f"Encoding {source.name}",
    )


@functools.cache
def encoding_code_version() -> str:
    """A hash of the source of every module that turns a row into input_ids and labels."""
    from sftlab.data import check, formats, render, templates

    modules = (sys.modules[__name__], check, formats, render, templates)
    return xxhash.xxh3_64_hexdigest("".join(inspect.getsource(m) for m in modules).encode("utf-8"))


def no_tokenizer_threads_in_forks() -> None:
    """Before forking encoding processes: the fast tokenizer's thread pool does not survive a fork (it warns and
    turns itself off in the child); each process then tokenizes on one thread. Unforked, a batch uses all cores."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def build_data(cfg: SFTConfig, tokenizer: PreTrainedTokenizerBase) -> Data:
    """Tokenized train and validation sets for ``cfg``, with a report of what was left out.

    Raises SftlabError for any malformed row (naming the first), or when nothing is left to train.
    """
    options = encode_options(cfg, tokenizer)
    if cfg.stage == "sft":
        for warning in template_warnings(tokenizer, options.eot):
            log.warning(warning)
    parts = [encode_source(cfg, tokenizer, s, options) for s in resolve_sources(cfg.dataset, cfg.dataset_dir)]
    encoded = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]

    # Statuses are counted in Arrow; only the few named problem rows are read into Python.
    status = encoded.data.column("status")
    report = DataReport(Counter({c["values"].as_py(): c["counts"].as_py() for c in pc.value_counts(status)}))
    if report.counts[ERROR]:
        first = encoded[pc.index(status, ERROR).as_py()]
        more = f" (and {report.counts[ERROR] - 1} more)" if report.counts[ERROR] > 1 else ""
        raise SftlabError(f"{first['ref']}: {first['detail']}{more}; fix or remove the sample")
    for name in report.counts:
        if name not in (KEPT, VIEW):
            for i in pc.indices_nonzero(pc.equal(status, name))[:_NAMED].to_pylist():
                report.name(name, encoded[i]["ref"], encoded[i]["detail"])
    _count_problems(encoded, report)

    if not any(report.counts[s] for s in TRAINED_STATUSES):
        raise SftlabError("no sample is left to train on: " + " ".join(report.lines()[1:]).strip())
    trained = encoded.filter(lambda s: s in TRAINED_STATUSES, input_columns="status").select_columns(["input_ids", "labels", "ref", "status"])
    _count_tokens(trained, report)
    train, val = _split(trained, cfg.val_size, cfg.seed)
    eval_refs = [] if val is None else list(dict.fromkeys(r for r, s in zip(val["ref"], val["status"]) if s != VIEW))
    train, val = (None if d is None else d.select_columns(["input_ids", "labels"]) for d in (train, val))
    report.cutoff_len, report.n_train, report.n_eval = cfg.cutoff_len, len(train), len(val) if val is not None else 0
    return Data(train, val, report, eval_refs, tokenizer.pad_token_id)


def _count_problems(encoded: datasets.Dataset, report: DataReport) -> None:
    """Count rows per check problem (rows training still trains) and name the first few of each."""
    problems = encoded.data.column("problems")
    for i in pc.indices_nonzero(pc.not_equal(problems, "")).to_pylist():
        for kind in problems[i].as_py().split("\n"):
            report.problems[kind] += 1
            if len(report.problem_refs.setdefault(kind, [])) < _NAMED:
                report.problem_refs[kind].append(encoded[i]["ref"])


def _count_tokens(ds: datasets.Dataset, report: DataReport) -> None:
    """All and trained tokens and the longest sample, chunk by chunk in Arrow (bounded memory)."""
    table = ds.with_format("arrow").data.table
    for ids, labels in zip(table.column("input_ids").chunks, table.column("labels").chunks):
        lengths = pc.list_value_length(ids)
        report.tokens += pc.sum(lengths).as_py() or 0
        report.longest = max(report.longest, pc.max(lengths).as_py() or 0)
        report.trained_tokens += pc.sum(pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX)).as_py() or 0


def validation_count(val_size: float, total: int) -> int:
    """Samples ``val_size`` holds out of ``total``: a fraction (< 1, at least one sample) or a number (>= 1)."""
    if val_size <= 0:
        return 0
    return int(val_size) if val_size >= 1 else max(1, round(val_size * total))


def _split(ds: datasets.Dataset, val_size: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if val_size <= 0:
        return ds, None
    n_val = validation_count(val_size, len(ds))
    if n_val >= len(ds):
        raise SftlabError(f"val_size {val_size}: leaves no training samples out of {len(ds)}; use a smaller value")
    parts = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def preview_rows(cfg: SFTConfig, tokenizer: PreTrainedTokenizerBase, n: int) -> tuple[list[str], list[dict[str, Any]]]:
    """The first ``n`` samples as training sees them, and the template's warnings.

    Each row: ref, status, detail, input_ids, labels, and warnings (e.g. an answer whose
    end-of-turn token is not trained).
    """
    options = encode_options(cfg, tokenizer)
    eot = options.eot
    eot_id = tokenizer.convert_tokens_to_ids(eot) if eot else None
    rows: list[dict[str, Any]] = []
    for source in resolve_sources(cfg.dataset, cfg.dataset_dir):
        raw = load_source(source)
        spec = format_of(source, raw)
        head = raw.select(range(min(n - len(rows), len(raw))))
        out = _encode_batch(head.to_dict(), list(range(len(head))), spec=spec, name=source.name, tokenizer=tokenizer,
                            options=options)
        for j, status in enumerate(out["status"]):
            if status == ERROR:
                raise SftlabError(f"{out['ref'][j]}: {out['detail'][j]}; fix or remove the sample")
            row = {k: out[k][j] for k in ("ref", "status", "detail", "input_ids", "labels")}
            row["warnings"] = _sample_warnings(row, eot_id) if cfg.stage == "sft" else []
            rows.append(row)
        if len(rows) >= n:
            break
    return (template_warnings(tokenizer, eot) if cfg.stage == "sft" else []), rows[:n]


def preview_heading(row: dict[str, Any]) -> str:
    """A preview row's one-line title: its ref, status, length and how many of its tokens are trained."""
    trained = sum(label != IGNORE_INDEX for label in row["labels"])
    return f"{row['ref']} · {row['status']} · {len(row['input_ids'])} tokens, {trained} trained"


def preview_segments(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """A preview row as (text, trained) runs covering every token in order; each run of tokens that are all trained, or
    all not, is decoded as one (a character split over several tokens stays whole)."""
    runs: list[tuple[bool, list[int]]] = []
    for tok, label in zip(row["input_ids"], row["labels"]):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tok)
        else:
            runs.append((trained, [tok]))
    return [(tokenizer.decode(ids), trained) for trained, ids in runs]


def _sample_warnings(row: dict[str, Any], eot_id: int | None) -> list[str]:
    if row["status"] not in TRAINED_STATUSES:
        return [f"not trained: {row['status']} ({row['detail']})"]
    labels = row["labels"]
    ends = [i for i in range(len(labels)) if labels[i] != IGNORE_INDEX and (i + 1 == len(labels) or labels[i + 1] == IGNORE_INDEX)]
    out = [row["detail"]] if row["detail"] else []
    if eot_id is not None and any(labels[i] != eot_id for i in ends):
        out.append("an answer's end-of-turn token is not trained")
    return out
