"""Build the tokenized train / validation datasets for a config: load → rows to messages → encode → mix → split.

Every step after loading is a ``datasets.map`` over Arrow data; per-sample outcomes (kept, turns
dropped, too long, not prefix-stable, nothing to train) are counted and the first few named. Each source is
encoded (and cached) on its own; several are then concatenated or interleaved (``mix_strategy``). With
``tokenized_path`` the encoded sets are saved once and later runs load them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
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
from sftlab.data.sources import (
    STOPPING, TOKENIZED_MANIFEST, Source, dataset_names, format_of, interleave_probs, load_source, resolve_sources, saved_tokenized,
)
from sftlab.errors import SftlabError
from sftlab.files import fsync_tree, replace_dir

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
    train: datasets.Dataset | None  # columns: input_ids, labels; None when only eval_dataset was named (nothing to train)
    eval: datasets.Dataset | None  # the eval_dataset, else the val_size split; None when neither
    report: DataReport
    eval_refs: list[str] = field(default_factory=list)  # the validation samples' rows ("<dataset> sample <i>"), for generation
    pad_id: int = 0  # the token padded batches are padded with (the tokenizer's pad token)
    eval_names: list[str] = field(default_factory=list)  # the datasets eval_refs are rows of (eval_dataset, else dataset)


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
    rendered = iter(tokenize_rendered(tokenizer, [p[2] for p in prepared if not isinstance(p, Exception)], options.cutoff_len))
    return [p if isinstance(p, Exception) else
            encode_sample(tokenizer, p[0], eot=options.eot, cutoff_len=options.cutoff_len, masking=options.masking,
                          mask_thinking=options.thinking == "mask", template_kwargs=p[1], rendered=next(rendered))
            for p in prepared]


def _encode_batch(
    batch: dict[str, list], indices: list[int], *, spec: FormatSpec, name: str, tokenizer: PreTrainedTokenizerBase,
    options: EncodeOptions,
) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": [], "detail": [], "ref": [], "row": [], "problems": []}
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
            out["row"].append(index)  # the source row: interleaving draws whole rows (a sample and its views)
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

    The validation set is ``eval_dataset`` when set, else a ``val_size`` split of ``dataset``; ``dataset`` may be
    empty when ``eval_dataset`` is set (train is then None). A ``tokenized_path`` that holds saved sets is loaded
    instead (refused when it was encoded otherwise); an empty or new one gets this run's sets.
    Raises SftlabError for any malformed row (naming the first), bad mixing keys, or when nothing is left to train.
    """
    options = encode_options(cfg, tokenizer)
    if cfg.stage == "sft":
        for warning in template_warnings(tokenizer, options.eot):
            log.warning(warning)
    saved = saved_tokenized(cfg.tokenized_path)
    if saved is not None:
        return load_tokenized(saved, cfg, tokenizer, options)
    eval_names = dataset_names(cfg.eval_dataset)
    if eval_names and cfg.val_size > 0:
        raise SftlabError("eval_dataset and val_size are both set: eval_dataset is the evaluation set; remove val_size "
                          "(or eval_dataset to split dataset instead), as LLaMA-Factory requires")
    report = DataReport()
    train = _encoded_set(cfg, tokenizer, cfg.dataset, "dataset", options, report) if cfg.dataset or not eval_names else None
    val = _encoded_set(cfg, tokenizer, eval_names, "eval_dataset", options, report) if eval_names else None
    if train is not None and not len(train):
        raise SftlabError("no sample is left to train on: " + " ".join(report.lines()[1:]).strip())
    if val is not None and not len(val):
        raise SftlabError("no sample of eval_dataset is left to evaluate on: " + " ".join(report.lines()[1:]).strip())
    for part in (train, val):
        if part is not None:
            _count_tokens(part, report)
    if val is None:
        train, val = _split(train, cfg.val_size, cfg.seed)
    eval_refs = [] if val is None else list(dict.fromkeys(r for r, s in zip(val["ref"], val["status"]) if s != VIEW))
    train, val = (None if d is None else d.select_columns(["input_ids", "labels"]) for d in (train, val))
    report.cutoff_len, report.n_train = cfg.cutoff_len, len(train) if train is not None else 0
    report.n_eval = len(val) if val is not None else 0
    data = Data(train, val, report, eval_refs, tokenizer.pad_token_id, eval_names or list(cfg.dataset))
    if cfg.tokenized_path is not None:
        save_tokenized(Path(cfg.tokenized_path).expanduser(), data, cfg, tokenizer, options)
    return data


def _encoded_set(cfg: SFTConfig, tokenizer: PreTrainedTokenizerBase, names: list[str], key: str, options: EncodeOptions,
                 report: DataReport) -> datasets.Dataset:
    """The datasets ``names`` (the config's ``key``) encoded source by source, mixed by mix_strategy and counted into
    ``report``: the rows training trains, with columns input_ids, labels, ref, status."""
    sources = resolve_sources(names, cfg.dataset_dir)
    # LLaMA-Factory checks the probabilities against both lists; one evaluation dataset has nothing to mix
    probs = interleave_probs(cfg, len(sources), key) if key == "dataset" or len(sources) > 1 else None
    parts = [encode_source(cfg, tokenizer, s, options) for s in sources]
    _raise_errors(parts)
    encoded = _mix(parts, cfg, probs)
    # Statuses are counted in Arrow; only the few named problem rows are read into Python.
    status = encoded.data.column("status")
    counts = Counter({c["values"].as_py(): c["counts"].as_py() for c in pc.value_counts(status)})
    report.counts.update(counts)
    for name in counts:
        if name not in (KEPT, VIEW):
            for i in pc.indices_nonzero(pc.equal(status, name))[:_NAMED].to_pylist():
                report.name(name, encoded[i]["ref"], encoded[i]["detail"])
    _count_problems(encoded, report)
    return encoded.filter(lambda s: s in TRAINED_STATUSES, input_columns="status").select_columns(["input_ids", "labels", "ref", "status"])


def _raise_errors(parts: list[datasets.Dataset]) -> None:
    """SftlabError naming the first malformed row of any source (mixing may leave it out; it is still a data error)."""
    counts = [pc.sum(pc.equal(p.data.column("status"), ERROR)).as_py() or 0 for p in parts]
    if not sum(counts):
        return
    part = next(p for p, n in zip(parts, counts) if n)
    first = part[pc.index(part.data.column("status"), ERROR).as_py()]
    more = f" (and {sum(counts) - 1} more)" if sum(counts) > 1 else ""
    raise SftlabError(f"{first['ref']}: {first['detail']}{more}; fix or remove the sample")


def _mix(parts: list[datasets.Dataset], cfg: SFTConfig, probs: list[float] | None) -> datasets.Dataset:
    """Several encoded sources as one: concatenated, or interleaved as ``datasets.interleave_datasets`` interleaves
    their rows (LLaMA-Factory's merge_dataset), seeded by ``seed``."""
    if len(parts) == 1:
        return parts[0]
    if cfg.mix_strategy == "concat":
        return datasets.concatenate_datasets(parts)
    order = interleaved_rows(parts, probs, cfg.seed, STOPPING[cfg.mix_strategy])
    # flattened, so that the Arrow-level counting below sees the mix (a select only adds an indices mapping)
    return datasets.concatenate_datasets(parts).select(order).flatten_indices()


def interleaved_rows(parts: list[datasets.Dataset], probs: list[float] | None, seed: int, stopping: str) -> list[int]:
    """The rows of the concatenated encoded ``parts`` in the order ``datasets.interleave_datasets(probabilities=probs,
    seed=seed, stopping_strategy=stopping)`` draws their source rows: the order, and the lengths, LLaMA-Factory gets by
    interleaving the raw rows before encoding. Each drawn row brings all its encoded rows (a sample and its views)."""
    starts, ends, counts, offset = [], [], [], 0
    for part in parts:
        rows = np.asarray(part.with_format("numpy")["row"], dtype=np.int64)
        n = int(rows.max()) + 1 if len(rows) else 0
        starts.append(offset + np.searchsorted(rows, np.arange(n), "left"))
        ends.append(offset + np.searchsorted(rows, np.arange(n), "right"))
        counts.append(n)
        offset += len(part)
    index = [datasets.Dataset.from_dict({"source": [k] * n, "row": list(range(n))}) for k, n in enumerate(counts)]
    drawn = datasets.interleave_datasets(index, probabilities=probs, seed=seed, stopping_strategy=stopping)
    flat = np.cumsum([0, *counts[:-1]])[np.asarray(drawn["source"], dtype=np.int64)] + np.asarray(drawn["row"], dtype=np.int64)
    first, last = np.concatenate(starts)[flat], np.concatenate(ends)[flat]
    lengths = last - first
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    return (np.repeat(first - before, lengths) + np.arange(int(lengths.sum()))).tolist()


# ---------------------------------------------------------------- tokenized_path

_DATA_KEYS = ("dataset", "eval_dataset", "dataset_dir", "max_samples", "val_size", "mix_strategy", "interleave_probs")
_FORMAT = 1


def encoded_with(tokenizer: PreTrainedTokenizerBase, options: EncodeOptions) -> dict[str, Any]:
    """What the saved sets of a tokenized_path depend on: the tokenizer (its vocabulary and special tokens), the chat
    template and every encoding option. A run loads them only when all of these are its own."""
    vocab = json.dumps([sorted(tokenizer.get_vocab().items()), sorted(map(str, tokenizer.all_special_tokens))], ensure_ascii=False)
    return {"tokenizer": xxhash.xxh3_64_hexdigest(vocab.encode("utf-8")),
            "chat_template": xxhash.xxh3_64_hexdigest(str(tokenizer.chat_template or "").encode("utf-8")),
            **dataclasses.asdict(options)}


def save_tokenized(path: Path, data: Data, cfg: SFTConfig, tokenizer: PreTrainedTokenizerBase, options: EncodeOptions) -> None:
    """Save ``data`` into ``path`` (a DatasetDict of train and validation, and TOKENIZED_MANIFEST): written into a
    directory beside it and renamed into place, so ``path`` is never half-written. Another process that saved first wins."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    splits = {name: ds for name, ds in (("train", data.train), ("validation", data.eval)) if ds is not None}
    datasets.DatasetDict(splits).save_to_disk(str(tmp))
    manifest = {"format": _FORMAT, "encoded_with": encoded_with(tokenizer, options), "code": encoding_code_version(),
                "data": {key: getattr(cfg, key) for key in _DATA_KEYS}, "report": {f.name: getattr(data.report, f.name) for f in dataclasses.fields(DataReport)},
                "eval_refs": data.eval_refs, "eval_names": data.eval_names}
    (tmp / TOKENIZED_MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    fsync_tree(tmp)
    if saved_tokenized(str(path)) is not None:  # another process of the run saved the same sets meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        return
    replace_dir(tmp, path)  # an empty directory there is moved aside
    log.info("saved the encoded sets to tokenized_path %s: runs with it load them instead of reading the data", path)


def load_tokenized(path: Path, cfg: SFTConfig, tokenizer: PreTrainedTokenizerBase, options: EncodeOptions) -> Data:
    """The sets ``save_tokenized`` saved in ``path``. Raises SftlabError naming what differs when they were encoded
    with another tokenizer, chat template or encoding option (cutoff_len, masking, …): training on them would
    silently train other tokens. Data keys that differ (dataset, val_size, …) are named in a warning: they have no
    effect, as in LLaMA-Factory."""
    try:
        manifest = json.loads((path / TOKENIZED_MANIFEST).read_text(encoding="utf-8"))
        saved = manifest["encoded_with"]
    except (ValueError, KeyError, TypeError):
        raise SftlabError(f"tokenized_path {path}: {TOKENIZED_MANIFEST} is not what sftlab writes; delete the directory "
                          "to encode the data again") from None
    for key, value in encoded_with(tokenizer, options).items():
        if saved.get(key) != value:
            what = {"tokenizer": "another tokenizer (vocabulary or special tokens)",
                    "chat_template": "another chat template (template, or the tokenizer's own)"}
            differs = what.get(key) or f"{key} {saved.get(key)!r} (this run: {value!r})"
            raise SftlabError(f"tokenized_path {path} was encoded with {differs}; its samples are not what this run would "
                              "train: delete it or set tokenized_path to a new directory to encode again")
    if manifest.get("code") != encoding_code_version():
        log.warning("tokenized_path %s was encoded by another version of sftlab's encoding code; delete it to encode "
                    "the data as this version does", path)
    ignored = [key for key in _DATA_KEYS if manifest.get("data", {}).get(key) != json.loads(json.dumps(getattr(cfg, key)))]
    if ignored:
        log.warning("tokenized_path %s holds sets saved with other %s; those keys have no effect while it is loaded "
                    "(set tokenized_path to a new directory to encode them)", path, ", ".join(ignored))
    loaded = datasets.load_from_disk(str(path))
    report = manifest["report"]
    report = DataReport(**{**report, "counts": Counter(report["counts"]), "problems": Counter(report["problems"])})
    log.info("loaded the encoded sets from tokenized_path %s (the data files are not read)", path)
    return Data(loaded["train"] if "train" in loaded else None, loaded["validation"] if "validation" in loaded else None,
                report, manifest["eval_refs"], tokenizer.pad_token_id, manifest["eval_names"])


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
