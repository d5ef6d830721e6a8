"""Scores of generated answers against references, and the generation latency fit.

Every score is on 0–100, per sample and for the corpus alike (exact_match and task scorers too, so a
column never changes scale between the summary and the per-sample file):

* ``bleu-4``: sacrebleu BLEU (4-grams). Corpus: ``corpus_score`` over all samples; per sample:
  ``sentence_score`` (effective order, as ``sacrebleu.sentence_bleu``). Tokenizer ``zh`` when the
  references hold CJK characters (decided once for the corpus, per sample for sentence scores), else ``13a``;
  ``zh`` splits Chinese characters one by one and tokenizes the rest as ``13a`` does.
* ``chrf``: sacrebleu chrF (character n-grams, so it needs no word segmentation), corpus and sentence.
* ``rouge-1``/``rouge-2``/``rouge-l``: rouge-score F1 with :class:`RougeTokenizer` (jieba for Chinese);
  corpus = mean of the per-sample values.
* ``exact_match``: 100 when prediction and reference are equal after stripping surrounding whitespace.
* task scorers (see :func:`resolve_scorers`), named as given: a function's value in [0, 1] × 100; corpus = mean.

Values are rounded to 4 decimals (the corpus means are taken before rounding).
A sample whose prediction and reference are both empty scores 100 on the overlap metrics (they are
identical; the libraries return 0 because there is nothing to count).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import numbers
import re
import sys
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sftlab.errors import SftlabError

Scorer = Callable[[str, str], float]  # (prediction, reference) -> value in [0, 1]

METRICS = ("bleu-4", "chrf", "rouge-1", "rouge-2", "rouge-l", "exact_match")
_OVERLAP = METRICS[:5]

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_KANA = "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"
_HANGUL = "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"
_CJK = re.compile(f"[{_HAN}{_KANA}{_HANGUL}]")
# Han runs go to jieba; kana one character at a time (Japanese has no spaces and no segmenter here);
# everything else is words of letters and digits (Hangul included: Korean separates words with spaces).
_TOKEN = re.compile(f"([{_HAN}]+)|([{_KANA}])|([^\\W_{_HAN}{_KANA}]+)")


def has_cjk(text: str) -> bool:
    """Whether ``text`` holds a Chinese, Japanese or Korean character."""
    return _CJK.search(text) is not None


class RougeTokenizer:
    """rouge-score tokenizer for any language: NFKC, lowercase, jieba words for Chinese, words elsewhere.

    rouge-score's own tokenizer keeps only ``[a-z0-9]``, so every Chinese answer would score 0.
    """

    def __init__(self) -> None:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # it prints "Building prefix dict..." to stderr on first use
        self._cut = jieba.lcut

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        for han, kana, word in _TOKEN.findall(unicodedata.normalize("NFKC", text).lower()):
            if han:
                tokens.extend(self._cut(han))
            else:
                tokens.append(kana or word)
        return tokens


# ---------------------------------------------------------------- task scorers


_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n(.*?)```", re.S | re.I)


def parse_json(text: str) -> Any:
    """The JSON value in ``text``: the whole text, else the first fenced (```json) block in it; ValueError if neither parses."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    fenced = _FENCE.search(text)
    if fenced is None:
        raise ValueError("not JSON")
    return json.loads(fenced.group(1))


def json_valid(prediction: str, reference: str) -> float:
    """1 when the prediction is JSON (or holds a ```json fenced block that is)."""
    try:
        parse_json(prediction)
    except ValueError:
        return 0.0
    return 1.0


def json_fields(prediction: str, reference: str) -> float:
    """Share of the reference object's top-level fields that the prediction's object has, with equal values.

    0 when the prediction is not a JSON object; 1 for an empty reference object. Raises SftlabError when
    the reference is not a JSON object (the scorer cannot apply to that dataset).
    """
    try:
        expected = parse_json(reference)
    except ValueError:
        expected = None
    if not isinstance(expected, dict):
        raise SftlabError("json_fields needs references that are JSON objects, this one is not; "
                          "use json_valid or a custom scorer for this data")
    try:
        got = parse_json(prediction)
    except ValueError:
        return 0.0
    if not isinstance(got, dict):
        return 0.0
    if not expected:
        return 1.0
    return sum(key in got and _same(got[key], value) for key, value in expected.items()) / len(expected)


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true != 1 (Python's == says True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


BUILTIN_SCORERS: dict[str, Scorer] = {"json_valid": json_valid, "json_fields": json_fields}
_FORMS = "json_valid, json_fields, regex:PATTERN, module:function or path/to/file.py:function"


def resolve_scorers(names: Sequence[str]) -> dict[str, Scorer]:
    """Name → function for each scorer name, in order; SftlabError for an unknown or unloadable one.

    Names: a built-in (``json_valid``, ``json_fields``), ``regex:PATTERN`` (1 when ``re.search`` finds
    PATTERN in the prediction), or a user function ``module:function`` / ``path/to/file.py:function``
    taking (prediction, reference) and returning a number in [0, 1].
    """
    resolved: dict[str, Scorer] = {}
    for name in names:
        if name in resolved:
            raise SftlabError(f"scorer {name!r} is listed twice; list each scorer once")
        resolved[name] = _resolve(name)
    return resolved


def _resolve(name: str) -> Scorer:
    if name in BUILTIN_SCORERS:
        return BUILTIN_SCORERS[name]
    if name.startswith("regex:"):
        try:
            pattern = re.compile(name[len("regex:"):])
        except re.error as e:
            raise SftlabError(f"scorer {name!r}: bad regular expression ({e}); fix the pattern after 'regex:'") from None
        return lambda prediction, reference: float(pattern.search(prediction) is not None)
    where, sep, attr = name.rpartition(":")
    if not sep or not where or not attr:
        raise SftlabError(f"unknown scorer {name!r}; use one of: {_FORMS}")
    module = _load_file(name, Path(where)) if where.endswith(".py") else _import(name, where)
    fn = getattr(module, attr, None)
    if fn is None:
        raise SftlabError(f"scorer {name!r}: {where} has no {attr!r}; check the function name")
    if not callable(fn):
        raise SftlabError(f"scorer {name!r}: {where}.{attr} is a {type(fn).__name__}, not a function")
    return fn


def _import(name: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as e:  # the user's module may fail in any way while it runs
        raise SftlabError(f"scorer {name!r}: cannot import module {module!r} ({type(e).__name__}: {e})") from e


def _load_file(name: str, path: Path) -> Any:
    if not path.is_file():
        raise SftlabError(f"scorer {name!r}: no file {path}; give an existing .py file")
    module_name = f"sftlab_scorer_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling in the file look themselves up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise SftlabError(f"scorer {name!r}: cannot load {path} ({type(e).__name__}: {e})") from e
    return module


# ---------------------------------------------------------------- scoring


@dataclass
class Scores:
    """Scores on 0–100. ``corpus``: metric → value; ``per_sample``: one dict per sample with the same keys."""

    corpus: dict[str, float]
    per_sample: list[dict[str, float]]


def score(predictions: Sequence[str], references: Sequence[str], scorers: Sequence[str] = (),
          names: Sequence[str] | None = None) -> Scores:
    """Score ``predictions`` against ``references`` (same length, at least one) on METRICS and ``scorers``.

    ``names`` label the samples in errors (e.g. their file:line; default "sample <index>"). Raises
    SftlabError for a bad scorer name, a scorer that fails, or one that returns a value outside [0, 1].
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise SftlabError("nothing to score: the evaluation set is empty")
    task = resolve_scorers(scorers)
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import BLEU, CHRF

    bleu = {tok: BLEU(tokenize=tok, effective_order=True) for tok in ("13a", "zh")}
    chrf = CHRF()
    rouge = RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=RougeTokenizer())
    per_sample = []
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        if not prediction.strip() and not reference.strip():
            sample = dict.fromkeys(_OVERLAP, 100.0)
        else:
            r = rouge.score(reference, prediction)
            sample = {
                "bleu-4": bleu["zh" if has_cjk(reference) else "13a"].sentence_score(prediction, [reference]).score,
                "chrf": chrf.sentence_score(prediction, [reference]).score,
                "rouge-1": 100 * r["rouge1"].fmeasure,
                "rouge-2": 100 * r["rouge2"].fmeasure,
                "rouge-l": 100 * r["rougeL"].fmeasure,
            }
        sample["exact_match"] = 100.0 if prediction.strip() == reference.strip() else 0.0
        for name, fn in task.items():
            sample[name] = 100 * _run(name, fn, prediction, reference, names[i] if names else f"sample {i}")
        per_sample.append({key: _round(value) for key, value in sample.items()})
    refs = [list(references)]
    corpus = {
        "bleu-4": BLEU(tokenize="zh" if any(map(has_cjk, references)) else "13a").corpus_score(predictions, refs).score,
        "chrf": CHRF().corpus_score(predictions, refs).score,
    }
    for key in per_sample[0]:
        corpus.setdefault(key, float(np.mean([s[key] for s in per_sample])))
    return Scores({key: _round(corpus[key]) for key in per_sample[0]}, per_sample)


def _round(value: float) -> float:
    # 4 decimals of a 0-100 score is far below any real difference, and keeps float noise
    # (sacrebleu's 100.00000000000004) out of the files
    return round(float(value), 4)


def _run(name: str, fn: Scorer, prediction: str, reference: str, where: str) -> float:
    try:
        value = fn(prediction, reference)
    except SftlabError as e:
        raise SftlabError(f"{where}: scorer {name!r}: {e}") from e
    except Exception as e:  # a user's scorer: say which sample broke it
        raise SftlabError(f"{where}: scorer {name!r} raised {type(e).__name__}: {e}") from e
    if not isinstance(value, numbers.Real) or not 0 <= value <= 1:  # NaN fails the range test too
        raise SftlabError(f"{where}: scorer {name!r} returned {value!r}; a scorer must return a number in [0, 1]")
    return float(value)


# ---------------------------------------------------------------- latency


@dataclass(frozen=True)
class Latency:
    """Generation time fitted as ``seconds = per_token_s · tokens + first_token_s`` (k·x + b).

    ``tokens_per_s`` is 1/k, or None when k is not positive (timings that do not grow with length); ``r2`` is
    the fit's coefficient of determination.
    """

    first_token_s: float
    per_token_s: float
    tokens_per_s: float | None
    r2: float
    n_points: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_latency(points: Sequence[tuple[int, float]]) -> Latency:
    """Least-squares fit of (generated tokens, seconds) points; SftlabError with fewer than 2 distinct lengths."""
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    if len(np.unique(x)) < 2:
        raise SftlabError(f"latency fit needs answers of at least 2 different lengths, got {len(points)} timing(s) "
                          f"of {len(np.unique(x))} length(s); time more samples or allow longer answers")
    if not (np.isfinite(y).all() and np.isfinite(x).all()):
        raise ValueError("latency points must be finite")
    (k, b), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], axis=1), y, rcond=None)
    residual = float(np.sum((y - (k * x + b)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    # constant times fitted by k = 0 are explained perfectly; rounding leaves a residual of ~1e-30
    r2 = 1.0 - residual / total if total > 0 else 1.0
    # below a picosecond per token the slope is rounding error on flat timings, not a speed
    return Latency(float(b), float(k), 1.0 / float(k) if k > 1e-12 else None, r2, len(points))

