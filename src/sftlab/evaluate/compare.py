"""``sftlab compare``: two evaluation runs of the same data side by side, metric by metric and sample by sample.

The samples are ranked by one per-sample score (the "key", see :func:`main_score`): the first task
scorer both runs have (the user chose it to say what a right answer is), else ``rouge-l`` (continuous,
and works for Chinese through jieba; exact_match is 0 for nearly every free-form answer, and
sentence BLEU is noisy on short ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from sftlab.errors import SftlabError
from sftlab.evaluate.metrics import METRICS
from sftlab.evaluate.results import EvalResults, Prediction

LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity"})  # every other metric: higher is better
_ORDER = ("eval_loss", "perplexity", *METRICS)
TEXT_LIMIT = 1500  # characters of a prompt or answer shown per sample


@dataclass(frozen=True)
class MetricChange:
    """One metric in both runs; ``before``/``after`` is None where a run lacks it (or it was not finite)."""

    name: str
    before: float | None
    after: float | None

    @property
    def lower_is_better(self) -> bool:
        return self.name in LOWER_IS_BETTER

    @property
    def delta(self) -> float | None:
        """after − before, None when either is missing."""
        return None if self.before is None or self.after is None else self.after - self.before

    @property
    def verdict(self) -> str:
        """'better', 'worse', 'same', or '' when it cannot be compared."""
        if self.delta is None:
            return ""
        if self.delta == 0:
            return "same"
        return "better" if (self.delta < 0) == self.lower_is_better else "worse"


@dataclass(frozen=True)
class SampleChange:
    """A sample's answers from both runs and its key score in each (0–100)."""

    index: int
    ref: str
    prompt: str
    reference: str
    before: str
    after: str
    score_before: float
    score_after: float

    @property
    def delta(self) -> float:
        return self.score_after - self.score_before


@dataclass
class Comparison:
    """The result of :func:`compare`. ``deltas``: the key score's change per sample (tuned − base), by index;
    ``improved``/``regressed``: the samples that changed most each way, largest change first;
    ``note``: why there are no samples, when there are none."""

    base: EvalResults
    tuned: EvalResults
    metrics: list[MetricChange]
    key: str | None = None
    deltas: list[float] | None = None
    improved: list[SampleChange] | None = None
    regressed: list[SampleChange] | None = None
    note: str = ""

    @property
    def counts(self) -> tuple[int, int, int]:
        """Samples improved, regressed and unchanged on the key score."""
        d = self.deltas or []
        return sum(x > 0 for x in d), sum(x < 0 for x in d), sum(x == 0 for x in d)

    def markdown(self) -> str:
        """GitHub-flavoured Markdown: the runs, a metric table, then the samples that changed most."""
        lines = [f"# sftlab compare: {_md_code(self.base.label)} → {_md_code(self.tuned.label)}", "",
                 f"- base: {_run_line(self.base)}", f"- tuned: {_run_line(self.tuned)}", "",
                 "| metric | better when | base | tuned | change | result |",
                 "|---|---|---:|---:|---:|---|"]
        for m in self.metrics:
            before, after, delta = format_change(m)
            lines.append(f"| {_md_cell(m.name)} | {'lower' if m.lower_is_better else 'higher'} | {before} | {after} | {delta} | {m.verdict} |")
        lines.append("")
        if self.key is None:
            lines += [f"_{self.note}_", ""]
            return "\n".join(lines)
        up, down, same = self.counts
        lines += [f"## Samples by {self.key}", "",
                  f"Per-sample {self.key} (0–100), tuned − base: {up} improved, {down} regressed, {same} unchanged.", ""]
        for title, changes in (("Improved most", self.improved), ("Regressed most", self.regressed)):
            lines += [f"### {title}", ""]
            if not changes:
                lines += ["None.", ""]
            for c in changes or []:
                lines += [f"#### Sample {c.index} ({_md_code(c.ref)}): {self.key} {c.score_before:.2f} → {c.score_after:.2f} "
                          f"({c.delta:+.2f})", ""]
                for label, text in (("Prompt", c.prompt), ("Reference", c.reference), ("Base", c.before), ("Tuned", c.after)):
                    lines += [f"{label}:", "", _md_block(clip(text)), ""]
        return "\n".join(lines)


def compare(base: EvalResults, tuned: EvalResults, base_preds: Sequence[Prediction] | None = None,
            tuned_preds: Sequence[Prediction] | None = None, top: int = 5, key: str | None = None) -> Comparison:
    """Compare two runs: every metric either has, and (when both have predictions) the ``top`` samples whose
    ``key`` score (default :func:`main_score`) rose most and fell most.

    Predictions are joined by index; SftlabError when the two sets are not of the same samples (indices,
    prompts or references differ), or when ``key`` is not a score both have.
    """
    metrics = [MetricChange(name, base.metrics.get(name), tuned.metrics.get(name)) for name in _metric_names(base, tuned)]
    if base_preds is None or tuned_preds is None:
        missing = " and ".join(w for w, p in (("base", base_preds), ("tuned", tuned_preds)) if p is None)
        return Comparison(base, tuned, metrics, note=f"No per-sample comparison: the {missing} run has no generated predictions.")
    joined = _join(base_preds, tuned_preds)
    common = _common_scores(joined)
    if key is None:
        key = main_score(common)
        if key is None:
            return Comparison(base, tuned, metrics, note="No per-sample comparison: the two runs share no per-sample score.")
    elif key not in common:
        raise SftlabError(f"per-sample score {key!r} is not in both runs; choose one of: {', '.join(common) or 'none'}")
    changes = [SampleChange(b.index, b.ref, b.prompt, b.reference, b.prediction, t.prediction, b.scores[key], t.scores[key])
               for b, t in joined]
    ranked = sorted(changes, key=lambda c: (-c.delta, c.index))
    improved = [c for c in ranked if c.delta > 0][:top]
    regressed = sorted((c for c in changes if c.delta < 0), key=lambda c: (c.delta, c.index))[:top]
    return Comparison(base, tuned, metrics, key, [c.delta for c in changes], improved, regressed)


def main_score(names: Sequence[str]) -> str | None:
    """The per-sample score to rank by among ``names``: the first task scorer, else rouge-l, else the first metric."""
    task = [n for n in names if n not in METRICS]
    if task:
        return task[0]
    if "rouge-l" in names:
        return "rouge-l"
    return next((m for m in METRICS if m in names), None)


def _metric_names(base: EvalResults, tuned: EvalResults) -> list[str]:
    seen = dict.fromkeys([*base.metrics, *tuned.metrics])
    return [n for n in _ORDER if n in seen] + [n for n in seen if n not in _ORDER]


def _join(base: Sequence[Prediction], tuned: Sequence[Prediction]) -> list[tuple[Prediction, Prediction]]:
    by_index = []
    for which, preds in (("base", base), ("tuned", tuned)):
        indexed = {p.index: p for p in preds}
        if len(indexed) != len(preds):
            raise SftlabError(f"the {which} predictions list a sample index twice; re-run sftlab eval for that run")
        by_index.append(indexed)
    b, t = by_index
    if b.keys() != t.keys():
        only = sorted(b.keys() - t.keys()) or sorted(t.keys() - b.keys())
        raise SftlabError(f"the two runs are of different datasets ({len(b)} and {len(t)} samples; sample {only[0]} is in only one); "
                          f"evaluate both on the same data with the same max_samples")
    for i in sorted(b):
        for what in ("prompt", "reference"):
            if getattr(b[i], what) != getattr(t[i], what):
                raise SftlabError(f"the two runs are of different datasets: sample {i} ({b[i].ref}) has a different {what}; "
                                  f"evaluate both on the same data")
    return [(b[i], t[i]) for i in sorted(b)]


def _common_scores(joined: list[tuple[Prediction, Prediction]]) -> list[str]:
    """Score names every prediction of both runs has, in the order of the first tuned prediction."""
    if not joined:
        return []
    names = list(joined[0][1].scores)
    return [n for n in names if all(n in b.scores and n in t.scores for b, t in joined)]


def format_change(m: MetricChange) -> tuple[str, str, str]:
    """``before``, ``after`` and the signed change as text; 4 decimals below 10 (losses), else 2 (scores on 0–100)."""
    values = [v for v in (m.before, m.after) if v is not None]
    places = 4 if values and max(abs(v) for v in values) < 10 else 2

    def fmt(v: float | None, sign: str = "") -> str:
        return "–" if v is None else f"{v:{sign},.{places}f}"

    return fmt(m.before), fmt(m.after), fmt(m.delta, "+")


def clip(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def _run_line(r: EvalResults) -> str:
    model = _md_code(r.model) + (f" + adapter {_md_code(r.adapter)}" if r.adapter else "")
    return f"{model} on {', '.join(map(_md_code, r.dataset)) or '?'}, {r.n_samples:,} samples"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_code(text: str) -> str:
    # a code span fenced by more backticks than the text's longest run keeps the text literal
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _md_block(text: str) -> str:
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence}text\n{text}\n{fence}"
