"""What a dataset looks like to training: token lengths with the model's own template, the cutoff_len
that covers it, turns, language mix, diversity and repeated openings (``sftlab data stats``).

Samples are encoded by training's own ``encode_row`` with no length limit, so prompt (untrained) and
answer (trained) tokens are exactly training's labels. Rows stream in batches; per sample only a few
numbers are kept (numpy arrays), n-gram sets switch to HyperLogLog and the opening counters are pruned
when they grow, so memory stays bounded on any size of data.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from sftlab.config import SFTConfig
from sftlab.data.formats import FormatSpec, Message, RowError, to_messages
from sftlab.data.pipeline import EncodeOptions, encode_options, encode_rows, no_tokenizer_threads_in_forks
from sftlab.data.render import IGNORE_INDEX, KEPT, VIEW, split_reasoning
from sftlab.data.rows import first_value, iter_rows, row_spec
from sftlab.data.sources import Source, resolve_sources
from sftlab.errors import SftlabError

UNREADABLE = "unreadable row"
MALFORMED = "malformed row"
TEMPLATE_ERROR = "template error"
COVERAGE = (90, 95, 99, 100)  # percent of samples a recommended cutoff_len keeps whole
PERCENTILES = (50, 90, 95, 99)
TABLE_COLUMNS = ("min", "p50", "p90", "p95", "p99", "max", "mean")  # of each row of to_dict()["tokens"], as the front ends show them
OVER_ADVICE = 0.05  # a common rule: more than 5% over cutoff_len → raise it or drop them
LANGUAGES = ("cjk", "latin", "other", "mixed")  # per sample: >= 80% of letters in one script, else mixed
NGRAMS = (1, 2, 3)
OPENING_WORDS = 4
OPENING_CHARS = 8  # CJK text has no spaces: its opening is the first characters
TOP_OPENINGS = 10
SCATTER_POINTS = 5000

_NAMED = 3  # examples named per skipped kind
_BATCH = 256
_EXACT_LIMIT = 1 << 21  # distinct n-grams kept exactly (8 bytes each) before switching to HyperLogLog
_HLL_P = 14  # 16384 registers: ~0.8% standard error
_OPENINGS_LIMIT = 200_000  # distinct openings kept before pruning to the most common
_NO_LIMIT = 1 << 62
_MOSTLY = 0.8


@dataclass
class Stats:
    """Numbers for one set of sources. Per-sample arrays (``prompt``, ``answer``, ``turns``, ``language``,
    aligned) hold measured samples only; ``to_dict()`` gives the JSON-serialisable summary.

    A sample's length is prompt + answer tokens: the rendered sample up to and including its last
    trained token, which is what must fit in ``cutoff_len`` for training to keep it whole.
    """

    sources: list[str]
    cutoff_len: int
    rows: int = 0  # rows read, measured or skipped
    views: int = 0  # extra training samples: answers the template rewrites in history (e.g. Qwen3 <think>)
    skipped: Counter = field(default_factory=Counter)  # kind → rows not measured
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    prompt: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # untrained tokens per sample
    answer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # trained tokens per sample
    turns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # assistant turns per sample
    language: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))  # index into LANGUAGES
    cjk_chars: int = 0
    letters: int = 0
    ngrams: dict[int, int] = field(default_factory=dict)  # n → n-grams of answer tokens
    distinct_ngrams: dict[int, int] = field(default_factory=dict)  # n → distinct ones (estimated if not distinct_exact)
    distinct_exact: bool = True
    answer_openings: list[tuple[str, int]] = field(default_factory=list)  # most common first
    prompt_openings: list[tuple[str, int]] = field(default_factory=list)
    answers: int = 0  # assistant turns with text (the openings' denominator)
    prompts: int = 0  # user turns with text
    openings_exact: bool = True  # false: the counters were pruned, counts are lower bounds
    seconds: float = 0.0

    @property
    def samples(self) -> int:
        return len(self.prompt)

    @property
    def length(self) -> np.ndarray:
        return self.prompt.astype(np.int64) + self.answer

    def cutoff_for(self, percent: int) -> int | None:
        """The smallest cutoff_len that keeps at least ``percent`` % of the samples whole."""
        if not self.samples:
            return None
        k = -(-percent * self.samples // 100)  # ceil, in integers
        return int(np.partition(self.length, k - 1)[k - 1])

    def over(self, cutoff_len: int | None = None) -> int:
        """How many samples training would change (later turns dropped, or the sample dropped) at ``cutoff_len``."""
        return int(np.count_nonzero(self.length > (cutoff_len or self.cutoff_len)))

    def advice(self) -> str:
        """The recommended cutoff_len, with a common rule: more than 5% over → raise cutoff_len or drop them."""
        if not self.samples:
            return "no sample was measured"
        over = self.over()
        share = over / self.samples
        if share > OVER_ADVICE:
            return (f"recommended cutoff_len: {self.cutoff_for(99)} (keeps 99% of samples whole); at {self.cutoff_len}, {share:.1%} "
                    f"are over, more than {OVER_ADVICE:.0%}: raise cutoff_len or drop them (an over-long multi-turn sample loses "
                    "its later turns, a single-turn one is dropped)")
        if over:
            return (f"recommended cutoff_len: {self.cutoff_len} as set: {share:.1%} are over, within the {OVER_ADVICE:.0%} commonly "
                    f"accepted ({self.cutoff_for(99)} keeps 99%, {self.cutoff_for(100)} all)")
        return f"recommended cutoff_len: {self.cutoff_len} as set: every sample fits (the longest has {self.cutoff_for(100)} tokens)"

    def scatter(self, points: int = SCATTER_POINTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(prompt, answer) tokens of a seeded subsample of at most ``points`` samples."""
        if self.samples <= points:
            return self.prompt, self.answer
        pick = np.sort(np.random.default_rng(seed).choice(self.samples, points, replace=False))
        return self.prompt[pick], self.answer[pick]

    def to_dict(self) -> dict[str, Any]:
        n = self.samples
        length = self.length
        over = self.over()
        multi_over = int(np.count_nonzero((length > self.cutoff_len) & (self.turns > 1)))
        turns = np.bincount(self.turns) if n else np.zeros(0, np.int64)
        languages = np.bincount(self.language, minlength=len(LANGUAGES)) if n else np.zeros(len(LANGUAGES), np.int64)
        prompt_x, answer_y = self.scatter()
        return {
            "sources": self.sources,
            "rows": self.rows,
            "samples": n,
            "views": self.views,
            "skipped": dict(self.skipped),
            "skipped_examples": self.skipped_examples,
            "tokens": {"prompt": _summary(self.prompt), "answer": _summary(self.answer), "length": _summary(length)},
            "cutoff_len": self.cutoff_len,
            "over_cutoff": {"count": over, "share": over / n if n else 0.0, "multi_turn": multi_over, "advice": self.advice()},
            "cutoff_for": {str(p): self.cutoff_for(p) for p in COVERAGE},
            # length at each percent of samples, 0..100: enough to redraw the CDF
            "cdf": [int(v) for v in np.percentile(length, np.arange(101), method="inverted_cdf")] if n else [],
            "turns": {str(t): int(c) for t, c in enumerate(turns) if c},
            "language": {
                "cjk_char_share": self.cjk_chars / self.letters if self.letters else 0.0,
                "samples": {name: int(c) for name, c in zip(LANGUAGES, languages)},
                "sample_shares": {name: c / n if n else 0.0 for name, c in zip(LANGUAGES, languages.tolist())},
            },
            "diversity": {
                "distinct": {str(k): self.distinct_ngrams[k] / self.ngrams[k] if self.ngrams.get(k) else None for k in NGRAMS},
                "ngrams": {str(k): self.ngrams.get(k, 0) for k in NGRAMS},
                "distinct_ngrams": {str(k): self.distinct_ngrams.get(k, 0) for k in NGRAMS},
                "method": "exact" if self.distinct_exact else f"HyperLogLog++ (p={_HLL_P}, ~0.8% error)",
            },
            "openings": {
                "answers": [{"opening": o, "count": c, "share": c / self.answers} for o, c in self.answer_openings],
                "prompts": [{"opening": o, "count": c, "share": c / self.prompts} for o, c in self.prompt_openings],
                "exact": self.openings_exact,
            },
            "answer_vs_prompt": {
                "pearson": _pearson(self.prompt, self.answer),
                "spearman": _pearson(_ranks(self.prompt), _ranks(self.answer)) if n else None,
                "scatter": [[int(x), int(y)] for x, y in zip(prompt_x, answer_y)],
            },
            "seconds": round(self.seconds, 2),
        }


def compute_stats(
    sources: list[Source], tokenizer: PreTrainedTokenizerBase, *, cutoff_len: int, options: EncodeOptions,
    max_samples: int | None = None, workers: int = 1, on_bytes: Callable[[int], None] | None = None,
) -> Stats:
    """Measure every row of ``sources`` as training encodes it.

    ``options``: what ``pipeline.encode_options`` returns for the run (its own cutoff_len is ignored:
    samples are measured whole); ``cutoff_len`` is the one the over-length share is counted against.
    ``max_samples`` (and a source's num_samples) limit the rows read per source, as in training.
    ``workers`` > 1 encodes in that many forked processes. Rows that cannot be read or encoded are
    counted in ``skipped`` (the first few named), not raised. Raises SftlabError for a source that
    cannot be read at all, or for ``stage: pt`` (plain text has no prompt/answer split to measure).
    """
    if options.stage != "sft":
        raise SftlabError("data stats measures chat samples (stage: sft); with stage: pt the text is cut into cutoff_len blocks")
    started = time.perf_counter()
    stats = Stats([s.name for s in sources], cutoff_len)
    acc = _Accumulator(stats)
    specs = {id(s): row_spec(s, first_value(s)) for s in sources}
    special = np.array(sorted(set(tokenizer.all_special_ids)), np.int64)
    context = dict(tokenizer=tokenizer, options=replace(options, cutoff_len=_NO_LIMIT), special=special)
    batches = _batches(sources, specs, max_samples, on_bytes)
    if workers > 1:
        no_tokenizer_threads_in_forks()
        with multiprocessing.get_context("fork").Pool(workers, _init_worker, (context,)) as pool:
            pending: deque = deque()  # in order; bounded, so reading never runs far ahead of the workers (Pool.imap would)
            for batch in batches:
                pending.append(pool.apply_async(_measure_in_worker, (batch,)))
                if len(pending) >= 2 * workers:
                    acc.add(pending.popleft().get())
            while pending:
                acc.add(pending.popleft().get())
    else:
        for batch in batches:
            acc.add(_measure(batch, **context))
    acc.finish()
    stats.seconds = time.perf_counter() - started
    return stats


def stats_for_config(cfg: SFTConfig, tokenizer: PreTrainedTokenizerBase, *, workers: int = 1,
                     on_bytes: Callable[[int], None] | None = None) -> Stats:
    """``compute_stats`` of ``cfg``'s datasets as its training would encode them (template, cutoff_len, max_samples)."""
    return compute_stats(resolve_sources(cfg.dataset, cfg.dataset_dir), tokenizer, cutoff_len=cfg.cutoff_len,
                         options=encode_options(cfg, tokenizer), max_samples=cfg.max_samples, workers=workers, on_bytes=on_bytes)


def summary_lines(s: dict[str, Any], see: str | None = None) -> list[str]:
    """The summary of ``Stats.to_dict()`` ``s`` as plain lines, for a front end to show beside its table of
    ``s["tokens"]`` and the advice: samples, the smallest cutoff_len for 90/95/99/100 %, the share over cutoff_len,
    turns, language mix, diversity, the most repeated opening, answer vs prompt length. ``see``: where the skipped
    rows are named (e.g. "the report"), said after their counts."""
    skipped = ", ".join(f"{k}: {n}" for k, n in s["skipped"].items())
    note = f"; see {see}" if see else ""
    lines = [f"{s['samples']:,} samples of {s['rows']:,} rows" + (f" (skipped {skipped}{note})" if skipped else "")]
    cut, over = s["cutoff_for"], s["over_cutoff"]
    lines.append(f"smallest cutoff_len keeping 90/95/99/100 % whole: {cut['90']} / {cut['95']} / {cut['99']} / {cut['100']}")
    lines.append(f"over cutoff_len {s['cutoff_len']}: {over['count']:,} ({over['share']:.2%})")
    if not s["samples"]:
        return lines
    lines.append("assistant turns: " + ", ".join(f"{t}: {c / s['samples']:.1%}" for t, c in s["turns"].items()))
    lang = s["language"]
    lines.append(f"language: {lang['cjk_char_share']:.1%} of letters CJK; samples " +
                 ", ".join(f"{k} {v:.1%}" for k, v in lang["sample_shares"].items() if v))
    div = s["diversity"]
    lines.append("distinct-1/2/3 of answers: " + " / ".join("n/a" if v is None else f"{v:.4f}" for v in div["distinct"].values())
                 + f" ({div['method']})")
    if top := s["openings"]["answers"][:1]:
        lines.append(f"most repeated answer opening: {top[0]['opening']!r} ({top[0]['share']:.1%})")
    corr = s["answer_vs_prompt"]
    lines.append(f"answer vs prompt length: Pearson {corr['pearson']}, Spearman {corr['spearman']}")
    return lines


# --- reading ----------------------------------------------------------------------------------------------------------

# A row as sent to a worker: (ref, value or None, why it could not be read).
_Row = tuple[str, "dict[str, Any] | None", str]


def _batches(sources: list[Source], specs: dict[int, FormatSpec], max_samples: int | None,
             on_bytes: Callable[[int], None] | None) -> Iterator[tuple[FormatSpec, list[_Row]]]:
    for source in sources:
        limit = min(n for n in (max_samples, source.num_samples, _NO_LIMIT) if n is not None)
        batch: list[_Row] = []
        for i, row in enumerate(iter_rows(source, on_bytes)):
            if i >= limit:
                break
            batch.append((row.ref, row.value, f"{row.problem}: {row.detail}" if row.value is None else ""))
            if len(batch) == _BATCH:
                yield specs[id(source)], batch
                batch = []
        if batch:
            yield specs[id(source)], batch


# --- measuring one batch (in a worker process when workers > 1) --------------------------------------------------------

@dataclass
class _Part:
    """One batch's numbers, merged into Stats by _Accumulator."""

    rows: int
    views: int
    skipped: list[tuple[str, str, str]]  # (kind, ref, detail)
    prompt: np.ndarray
    answer: np.ndarray
    turns: np.ndarray
    language: np.ndarray
    cjk_chars: int
    letters: int
    ngrams: dict[int, int]
    ngram_keys: dict[int, np.ndarray]  # n → unique 64-bit hashes of this batch's n-grams
    answer_openings: Counter
    prompt_openings: Counter


_worker: dict[str, Any] = {}


def _init_worker(context: dict[str, Any]) -> None:
    _worker.update(context)


def _measure_in_worker(batch: tuple[FormatSpec, list[_Row]]) -> _Part:
    return _measure(batch, **_worker)


def _measure(batch: tuple[FormatSpec, list[_Row]], *, tokenizer: PreTrainedTokenizerBase, options: EncodeOptions,
             special: np.ndarray) -> _Part:
    spec, rows = batch
    skipped, prompt, answer, turns, texts, trained = [], [], [], [], [], []
    answer_openings, prompt_openings = Counter(), Counter()
    views = 0
    readable = [value for _, value, _ in rows if value is not None]
    results = iter(encode_rows(readable, spec, tokenizer, options))
    for ref, value, problem in rows:
        if value is None:
            skipped.append((UNREADABLE, ref, problem))
            continue
        encoded = next(results)
        if isinstance(encoded, RowError):
            skipped.append((MALFORMED, ref, str(encoded)))
            continue
        if isinstance(encoded, TemplateError):  # the template itself refuses the conversation (e.g. roles that do not alternate)
            skipped.append((TEMPLATE_ERROR, ref, str(encoded)))
            continue
        messages = to_messages(value, spec)
        main = encoded[0]
        if main.status != KEPT:  # with no length limit: not prefix-stable, or nothing to train
            skipped.append((main.status, ref, main.detail))
            continue
        views += sum(e.status == VIEW for e in encoded[1:])
        labels = np.asarray(main.labels, np.int64)
        is_trained = labels != IGNORE_INDEX
        n_trained = int(is_trained.sum())
        length = int(np.flatnonzero(is_trained)[-1]) + 1  # KEPT: at least one token is trained
        prompt.append(length - n_trained)
        answer.append(n_trained)
        turns.append(sum(m["role"] == "assistant" for m in messages))
        texts.append(_text(messages))
        trained.append(np.asarray(main.input_ids, np.int64)[is_trained])
        for m in messages:
            if m["role"] == "assistant" and (opening := _opening(split_reasoning(m)[1])):
                answer_openings[opening] += 1
            elif m["role"] == "user" and (opening := _opening(m["content"] or "")):
                prompt_openings[opening] += 1
    language, cjk, letters = _languages(texts)
    ngrams, keys = _ngram_keys(trained, special)
    return _Part(len(rows), views, skipped, np.array(prompt, np.int32), np.array(answer, np.int32), np.array(turns, np.int32),
                 language, cjk, letters, ngrams, keys, answer_openings, prompt_openings)


def _text(messages: list[Message]) -> str:
    return "\n".join(f"{m.get('reasoning_content') or ''}{m.get('content') or ''}" for m in messages)


_WORDS = re.compile(r"\S+")


def _opening(text: str) -> str:
    """The first OPENING_WORDS words, lowercased; for CJK text the first OPENING_CHARS non-space characters."""
    head = "".join(text.split())[:OPENING_CHARS]
    if not head:
        return ""
    if any(_is_cjk(ord(c)) for c in head):
        return head
    return " ".join(m.group() for _, m in zip(range(OPENING_WORDS), _WORDS.finditer(text))).lower()


# Han (incl. extensions and compatibility), kana, Hangul syllables and jamo.
_CJK_RANGES = ((0x1100, 0x11FF), (0x3040, 0x30FF), (0x3130, 0x318F), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
               (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0x20000, 0x323AF))
# Latin letters: ASCII, Latin-1 and Latin Extended A/B, Latin Extended Additional (Vietnamese).
_LATIN_RANGES = ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x24F), (0x1E00, 0x1EFF))
# Letters of other alphabets: Greek to Ethiopic, Cherokee to Mongolian etc. (approximate: some marks count too).
_OTHER_RANGES = ((0x370, 0x10FF), (0x1200, 0x1DFF))


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _in(cps: np.ndarray, ranges: tuple[tuple[int, int], ...]) -> np.ndarray:
    mask = np.zeros(len(cps), bool)
    for lo, hi in ranges:
        mask |= (cps >= lo) & (cps <= hi)
    return mask


def _languages(texts: list[str]) -> tuple[np.ndarray, int, int]:
    """Per text its LANGUAGES index; and CJK characters and letters over all texts."""
    if not texts:
        return np.zeros(0, np.int8), 0, 0
    cps = np.frombuffer("".join(texts).encode("utf-32-le"), np.uint32)
    ends = np.cumsum([len(t) for t in texts])
    starts = ends - [len(t) for t in texts]

    def per_text(mask: np.ndarray) -> np.ndarray:
        cs = np.concatenate([[0], np.cumsum(mask)])
        return cs[ends] - cs[starts]

    cjk, latin, other = per_text(_in(cps, _CJK_RANGES)), per_text(_in(cps, _LATIN_RANGES)), per_text(_in(cps, _OTHER_RANGES))
    letters = cjk + latin + other
    floor = _MOSTLY * np.maximum(letters, 1)
    language = np.full(len(texts), LANGUAGES.index("mixed"), np.int8)
    language[other >= floor] = LANGUAGES.index("other")
    language[letters == 0] = LANGUAGES.index("other")
    language[latin >= floor] = LANGUAGES.index("latin")
    language[(cjk >= floor) & (letters > 0)] = LANGUAGES.index("cjk")
    return language, int(cjk.sum()), int(letters.sum())


_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a uint64 → a well-spread uint64 (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _ngram_keys(trained: list[np.ndarray], special: np.ndarray) -> tuple[dict[int, int], dict[int, np.ndarray]]:
    """N-grams of each sample's trained tokens (special tokens left out; an n-gram never spans a gap in the
    answer, e.g. from one turn to the next, nor two samples): their count and unique 64-bit hashes, per n."""
    if not trained:
        return {n: 0 for n in NGRAMS}, {n: np.zeros(0, np.uint64) for n in NGRAMS}
    ids = np.concatenate(trained)
    sample = np.repeat(np.arange(len(trained)), [len(t) for t in trained])
    keep = ~np.isin(ids, special)
    # A token's position counts from the start of the batch, with one gap between samples: n-grams are runs
    # of n tokens whose positions are consecutive.
    pos = np.arange(len(ids)) + sample
    ids, pos = ids[keep].astype(np.uint64), pos[keep]
    counts, keys = {}, {}
    for n in NGRAMS:
        if len(ids) < n:
            counts[n], keys[n] = 0, np.zeros(0, np.uint64)
            continue
        m = len(ids) - n + 1
        whole = pos[n - 1:] - pos[:m] == n - 1
        h = _mix(ids[:m])
        for k in range(1, n):
            h = _mix(h ^ ids[k:k + m])
        counts[n], keys[n] = int(whole.sum()), np.unique(h[whole])
    return counts, keys


# --- merging batches ---------------------------------------------------------------------------------------------------

class _Distinct:
    """Distinct count of 64-bit hashes: exact (a sorted array) up to _EXACT_LIMIT, then HyperLogLog++ registers."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.uint64)
        self.pending: list[np.ndarray] = []
        self.pending_n = 0
        self.registers: np.ndarray | None = None

    def add(self, keys: np.ndarray) -> None:
        if self.registers is not None:
            self._registers_add(keys)
            return
        self.pending.append(keys)
        self.pending_n += len(keys)
        if self.pending_n > _EXACT_LIMIT // 4:
            self._merge()

    def _merge(self) -> None:
        self.keys = np.unique(np.concatenate([self.keys, *self.pending]))
        self.pending, self.pending_n = [], 0
        if len(self.keys) > _EXACT_LIMIT:
            self.registers = np.zeros(1 << _HLL_P, np.int8)
            self._registers_add(self.keys)
            self.keys = np.zeros(0, np.uint64)

    def _registers_add(self, keys: np.ndarray) -> None:
        # datasketch's HyperLogLogPlusPlus layout: register = low p bits, rank = leading zeros of the rest + 1
        index = (keys & np.uint64((1 << _HLL_P) - 1)).astype(np.intp)
        rest = keys >> np.uint64(_HLL_P)
        high, low = (rest >> np.uint64(32)).astype(np.float64), (rest & np.uint64(0xFFFFFFFF)).astype(np.float64)
        bit_length = np.where(high > 0, 32 + np.frexp(high)[1], np.frexp(low)[1])  # exact: halves are < 2**32
        np.maximum.at(self.registers, index, (64 - _HLL_P - bit_length + 1).astype(np.int8))

    def count(self) -> tuple[int, bool]:
        """(distinct count, exact?)."""
        if self.registers is None:
            self._merge()
        if self.registers is None:
            return len(self.keys), True
        from datasketch import HyperLogLogPlusPlus

        return int(round(HyperLogLogPlusPlus(p=_HLL_P, reg=self.registers).count())), False


class _Openings:
    """Counts of openings; pruned to the most common when it holds more than _OPENINGS_LIMIT (counts become lower bounds)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.pruned = False

    def add(self, counts: Counter) -> None:
        self.counts.update(counts)
        if len(self.counts) > _OPENINGS_LIMIT:
            self.counts = Counter(dict(self.counts.most_common(_OPENINGS_LIMIT // 10)))
            self.pruned = True


class _Accumulator:
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.arrays: dict[str, list[np.ndarray]] = {k: [] for k in ("prompt", "answer", "turns", "language")}
        self.distinct = {n: _Distinct() for n in NGRAMS}
        self.answer_openings, self.prompt_openings = _Openings(), _Openings()

    def add(self, part: _Part) -> None:
        s = self.stats
        s.rows += part.rows
        s.views += part.views
        for kind, ref, detail in part.skipped:
            s.skipped[kind] += 1
            if len(named := s.skipped_examples.setdefault(kind, [])) < _NAMED:
                named.append(f"{ref} ({detail})" if detail else ref)
        for key, values in self.arrays.items():
            values.append(getattr(part, key))
        s.cjk_chars += part.cjk_chars
        s.letters += part.letters
        for n in NGRAMS:
            s.ngrams[n] = s.ngrams.get(n, 0) + part.ngrams[n]
            self.distinct[n].add(part.ngram_keys[n])
        s.answers += part.answer_openings.total()
        s.prompts += part.prompt_openings.total()
        self.answer_openings.add(part.answer_openings)
        self.prompt_openings.add(part.prompt_openings)

    def finish(self) -> None:
        s = self.stats
        for key, values in self.arrays.items():
            if values:
                setattr(s, key, np.concatenate(values))
        for n in NGRAMS:
            s.distinct_ngrams[n], exact = self.distinct[n].count()
            s.distinct_exact = s.distinct_exact and exact
        s.answer_openings = self.answer_openings.counts.most_common(TOP_OPENINGS)
        s.prompt_openings = self.prompt_openings.counts.most_common(TOP_OPENINGS)
        s.openings_exact = not (self.answer_openings.pruned or self.prompt_openings.pruned)


# --- numbers -----------------------------------------------------------------------------------------------------------

def _summary(values: np.ndarray) -> dict[str, float | int | None]:
    if not len(values):
        return {k: None for k in ("min", *(f"p{p}" for p in PERCENTILES), "max", "mean", "sum")}
    points = np.percentile(values, PERCENTILES, method="inverted_cdf")
    return {"min": int(values.min()), **{f"p{p}": int(v) for p, v in zip(PERCENTILES, points)}, "max": int(values.max()),
            "mean": round(float(values.mean()), 2), "sum": int(values.sum(dtype=np.int64))}


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their average rank (as Spearman's correlation needs)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2)[inverse]


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r, or None when it is undefined (fewer than 2 samples, or one side constant)."""
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    r = float(np.corrcoef(np.asarray(x, np.float64), np.asarray(y, np.float64))[0, 1])
    return None if math.isnan(r) else round(r, 4)
