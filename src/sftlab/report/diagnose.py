"""Reading training curves for the user: rules over metrics.jsonl that name what they see.

SFT practice reads loss curves by eye: a healthy train loss falls sharply, flattens, then
converges, and eval loss tracks it. Each rule below looks for one departure from that picture and
returns a :class:`Finding` with the evidence (steps and values) and advice, or nothing.
Rules compare medians of several logs (never single points) so that noise does not fire them, and
stay quiet when a run has too few logs to tell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}

# Shared
NOISE_Z = 4.0  # a change between two medians must exceed 4 standard errors: noisy logs (logging_steps 1) do not fire rules
TAIL_SHARE = 0.25  # "the end of the run": its last quarter of steps
TAIL_MIN = 2  # ... but never fewer logs than this, so one lucky batch does not decide
START_SHARE = 0.10  # "the start": the first tenth of the logs (at least START_MIN)
START_MIN = 3
# non_finite: any NaN/inf is an error; no threshold.
# overfitting
EVAL_MIN_POINTS = 3  # a minimum needs a before and an after
EVAL_RISE = 0.10  # eval_loss this far above its minimum is a clear rise, not eval noise
EVAL_RISE_ABS = 0.01  # nats/token; below this a rise means nothing (0.010 -> 0.012 is +20%)
EVAL_RISE_COUNT = 2  # the last evals that must all be above the minimum: a trend, not one bad eval
TRAIN_FALL = 0.10  # train loss must still fall this much (relative) in the second half ...
EVAL_SLOW = 1 / 3  # ... while eval loss falls less than this share of it ("much slower": the usual sign of overfitting)
GAP_GROWTH = 0.10  # eval - train must grow by this share of eval_loss ...
GAP_GROWTH_ABS = 0.02  # ... and by this many nats/token
TRAIN_AT_EVAL = 3  # train loss "at" an eval step: median of the logs since the previous eval, at least 3
# plateau
PLATEAU_MIN_RECORDS = 8  # fewer logs after warmup cannot show a trend
PLATEAU_FALL = 0.05  # train loss changed less than 5% start to end: it did not learn (noise is ~1-3%)
PLATEAU_KNOWN = 0.1  # nats/token; a flat loss this low means the model already knew the answers (info)
# divergence
DIVERGE_CHUNK = 3  # the curve is read as medians of consecutive chunks of at least 3 logs ...
DIVERGE_MIN_RECORDS = 3 * DIVERGE_CHUNK  # the lowest chunk and two after it
DIVERGE_CHUNKS = 20  # ... and at most 20 chunks (long runs: wider chunks, steadier medians)
DIVERGE_RISE = 0.30  # the last two chunks 30% above the lowest: far beyond noise, the run is going the wrong way
DIVERGE_ABS = 0.05  # nats/token; smaller rises at a tiny loss are batch-to-batch noise
# spikes
SPIKE_MIN_RECORDS = 8
SPIKE_WINDOW = 9  # local median over 9 logs: robust to up to 4 high ones in a row
SPIKE_REL = 0.25  # a spike is at least 25% above its local median ...
SPIKE_Z = 6.0  # ... and 6 times the logs' own noise above it, for noisy (logging_steps 1) runs
SPIKE_NOISE_FLOOR = 0.0075  # relative; keeps z finite on noiseless curves
SPIKE_WARN_COUNT = 3  # one or two spikes the loss recovers from: info; repeated ones: warning
# epoch_drop
EPOCH_MIN_RECORDS = 4  # logs inside epoch k needed to know its trend
EPOCH_WINDOW = 3  # logs compared on each side of the boundary: at least 3, or a quarter of epoch k's logs
EPOCH_DROP = 0.15  # the loss falls 15% across the boundary ...
EPOCH_DROP_ABS = 0.02  # ... and 0.02 nats/token ...
EPOCH_TREND_FACTOR = 3.0  # ... and 3x what the trend inside epoch k predicts: a step, not a slope
EPOCH_EPS = 1e-3  # epochs are logged rounded to 4 decimals
# too_low
TOO_LOW = 0.01  # nats/token (perplexity 1.01): the model reproduces the training answers nearly exactly
TOO_LOW_MIN_RECORDS = 4
TOO_LOW_EVAL_RATIO = 3.0  # eval_loss this many times the train loss ...
TOO_LOW_EVAL_ABS = 0.05  # ... and this much above it is "much higher": memorised, not learned
# grad_explosion
GRAD_FACTOR = 10.0  # grad_norm 10x its running median: an outlier batch, not the usual drift
GRAD_WINDOW = 20  # running median over the previous 20 logs
GRAD_HISTORY = 5  # the first logs have no stable median (gradients are large early on)
# schedule
FULL_LR_MAX = 1e-4  # full tuning above this overwrites what the model knew (full tuning commonly uses 1e-5)
FULL_LR_COMMON = 1e-5
WARMUP_SHARE = 0.5  # warmup over half the run: most steps train below learning_rate (info)
SHOWN = 5  # steps listed in an evidence string; the rest are counted


@dataclass(frozen=True)
class RunInfo:
    """What the rules may know about the run besides its curves; None where unknown (rules needing it skip)."""

    finetuning_type: str | None = None  # lora | full | freeze
    learning_rate: float | None = None  # peak
    warmup_steps: int | None = None  # resolved (warmup_ratio already applied)
    total_steps: int | None = None
    steps_per_epoch: int | None = None
    num_train_epochs: float | None = None


@dataclass(frozen=True)
class Finding:
    """One thing a rule saw: ``evidence`` gives steps and values, ``steps`` are the ones to mark on a plot."""

    rule: str
    severity: Severity
    title: str
    evidence: str
    advice: str
    steps: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.severity}: {self.title}\n  {self.evidence}\n  advice: {self.advice}"


def display_weight(n: int) -> float:
    """The smoothing weight the report and the live view show ``n`` logs with: TensorBoard's 0.6 on long
    runs, less on short ones, where a moving average mostly lags."""
    return 0.6 * min(1.0, n / 50)


def smooth(values, weight: float = 0.6) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the start is not pulled to 0.

    ``weight`` in [0, 1): 0 is no smoothing. NaN/inf values are passed through and do not enter the average.
    """
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight {weight}: use a value in [0, 1)")
    out, last, count = [], 0.0, 0
    for v in values:
        v = float(v)
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        count += 1
        out.append(last / (1 - weight**count))
    return out


def diagnose(records: list[dict], info: RunInfo | None = None) -> list[Finding]:
    """Run every rule over the metrics records; findings ordered error, warning, info (then by first step).

    Records without an integer step are ignored; any other key may be missing from any record.
    """
    records = sorted((r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)), key=lambda r: r["step"])
    info = info or RunInfo()
    findings = [f for rule in RULES for f in rule(records, info)]
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.steps[0] if f.steps else -1))


# -- helpers ------------------------------------------------------------------------------------------


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and finite values of ``key`` over the records that have it."""
    pairs = [(r["step"], float(r[key])) for r in records if _number(r.get(key)) and math.isfinite(r[key])]
    return np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.float64)


def _rolling_median(x: np.ndarray, window: int) -> np.ndarray:
    """Centered median over ``window`` points, narrowed symmetrically at the ends (a falling start is not biased low)."""
    n, h = len(x), window // 2
    out = np.empty(n)
    if n > 2 * h:  # the full windows, vectorised
        out[h: n - h] = np.median(np.lib.stride_tricks.sliding_window_view(x, 2 * h + 1), axis=1)
    for i in range(n):
        m = min(h, i, n - 1 - i)
        if m < h:
            out[i] = np.median(x[i - m: i + m + 1])
    return out


def _noise(values: np.ndarray) -> float:
    """Relative noise of one log (a standard deviation, 0.05 = 5%), robust to the trend and to spikes.

    Each log is compared with the mean of its two neighbours (exact on a straight trend); for
    independent noise that difference has 1.5x the variance of one log.
    """
    if len(values) < 3:
        return 0.0
    neighbours = (values[:-2] + values[2:]) / 2
    rel = np.where(neighbours > 0, values[1:-1] / np.where(neighbours > 0, neighbours, 1) - 1, 0.0)
    return 1.4826 * float(np.median(np.abs(rel - np.median(rel)))) / math.sqrt(1.5)


def _change_noise(sigma: float, n: int) -> float:
    """Relative size a difference of two medians of ``n`` logs each must have to be real, not noise."""
    return NOISE_Z * math.sqrt(2) * 1.2533 * sigma / math.sqrt(max(n, 1))  # 1.2533 sigma/sqrt(n): std error of a median


def _tail(steps: np.ndarray) -> np.ndarray:
    """Indices of the last TAIL_SHARE of the steps (at least TAIL_MIN logs)."""
    idx = np.nonzero(steps >= steps[-1] - TAIL_SHARE * (steps[-1] - steps[0]))[0]
    return idx if len(idx) >= TAIL_MIN else np.arange(max(0, len(steps) - TAIL_MIN), len(steps))


def _start(values: np.ndarray) -> float:
    """Where the curve starts: the median of the first logs, or the first log when it is clearly (beyond noise) above them."""
    head = float(np.median(values[: max(START_MIN, int(len(values) * START_SHARE))]))
    return float(values[0]) if values[0] > head * (1 + NOISE_Z * _noise(values)) else head


def _g(x: float) -> str:
    return f"{x:.3g}"


def _lr(x: float) -> str:
    return f"{x:.1e}".replace(".0e", "e")


def _pct(before: float, after: float) -> str:
    return f"{(after - before) / before * 100:+.0f}%" if before else "n/a"


def _span(steps: np.ndarray) -> str:
    return f"step {steps[0]}" if steps[0] == steps[-1] else f"steps {steps[0]}-{steps[-1]}"


def _listed(items: list[str]) -> str:
    more = len(items) - SHOWN
    return "; ".join(items[:SHOWN]) + (f"; and {more} more" if more > 0 else "")


def _train_at(ts: np.ndarray, tv: np.ndarray, step: int, since: int = -1) -> tuple[float, int] | None:
    """Train loss at ``step``: median of the logs in (since, step], at least the last TRAIN_AT_EVAL; and how many."""
    idx = np.nonzero(ts <= step)[0]
    if not len(idx):
        return None
    idx = idx[-max(TRAIN_AT_EVAL, int(np.sum(ts[idx] > since))):]
    return float(np.median(tv[idx])), len(idx)


def _epoch_at(records: list[dict], step: int) -> float | None:
    return next((r["epoch"] for r in records if r["step"] == step and _number(r.get("epoch"))), None)


# -- rules: each takes (records sorted by step, RunInfo) and returns its findings ----------------------


def _non_finite(records: list[dict], info: RunInfo) -> list[Finding]:
    parts, firsts = [], []
    for key in ("loss", "eval_loss", "grad_norm"):
        bad = [r for r in records if _number(r.get(key)) and not math.isfinite(r[key])]
        if bad:
            firsts.append(bad[0]["step"])
            parts.append(f"{key} = {bad[0][key]} at step {bad[0]['step']}" + (f" ({len(bad)} logs in all)" if len(bad) > 1 else ""))
    if not parts:
        return []
    first = min(firsts)
    skipped = sum(r.get("skipped_steps", 0) for r in records)
    losses = [r["loss"] for r in records if _number(r.get("loss"))]
    if skipped and losses and math.isfinite(losses[-1]):  # nan_policy skip_step dropped them, and training went on
        return [Finding("non_finite", "warning", f"{skipped} step(s) had a NaN/inf loss or gradient and were skipped", "; ".join(parts),
                        "nan_policy: skip_step dropped those updates and training went on; a rare skip is harmless, repeated ones "
                        "mean learning_rate is too high, fp16 overflows (use bf16) or a batch is broken (sftlab data check)",
                        sorted(set(firsts)))]
    return [Finding("non_finite", "error", f"Loss or gradients became NaN/inf at step {first}", "; ".join(parts),
                    f"training is broken from step {first} on: lower learning_rate, keep max_grad_norm at 1.0, use bf16 "
                    f"rather than fp16 (it overflows), check the data (sftlab data check); restart from a checkpoint before step {first}",
                    sorted(set(firsts)))]


def _overfitting(records: list[dict], info: RunInfo) -> list[Finding]:
    es, ev = _series(records, "eval_loss")
    if len(ev) < EVAL_MIN_POINTS:
        return []
    ts, tv = _series(records, "loss")
    parts, marks, title, best_step = [], [], "", None

    # (a) eval_loss has a minimum and has stayed clearly above it since
    i = int(np.argmin(ev))
    threshold = max(ev[i] * (1 + EVAL_RISE), ev[i] + EVAL_RISE_ABS)
    later = ev[i + 1:]
    if len(later) >= EVAL_RISE_COUNT and np.all(later[-EVAL_RISE_COUNT:] > threshold):
        best_step = int(es[i])
        title = f"Overfitting: eval_loss rose {_pct(ev[i], ev[-1])[1:]} since its minimum at step {best_step}"
        parts.append(f"eval_loss lowest {_g(ev[i])} at step {best_step}, {_g(ev[-1])} at step {es[-1]} ({_pct(ev[i], ev[-1])})")
        a, b = _train_at(ts, tv, es[i]), _train_at(ts, tv, es[-1])
        if a is not None and b is not None:
            parts.append(f"train loss {_g(a[0])} -> {_g(b[0])} over the same steps")
        marks += [best_step, int(es[-1])]

    # (b) second half of the run: train loss still falls, eval_loss much slower, the gap grows
    mid = (records[0]["step"] + records[-1]["step"]) / 2
    half = np.nonzero(es >= mid)[0]
    train = [_train_at(ts, tv, s, es[j - 1] if j else -1) for j, s in zip(half, es[half])]
    if len(half) >= EVAL_MIN_POINTS and None not in train:
        t, e = np.array([m for m, _ in train]), ev[half]
        noise = _change_noise(_noise(tv), min(n for _, n in train)) * t[0]  # train medians differ this much by chance
        gap = e - t
        t_fall, e_fall = t[0] - t[-1], e[0] - e[-1]
        if (t_fall >= max(TRAIN_FALL * t[0], noise) and e_fall < EVAL_SLOW * t_fall
                and gap[-1] - gap[0] >= max(GAP_GROWTH * e[-1], GAP_GROWTH_ABS, noise) and gap[-1] > gap[-3]):  # still growing
            title = title or "Overfitting: train loss keeps falling while eval_loss does not (the gap grows)"
            s0, s1 = int(es[half[0]]), int(es[-1])
            parts.append(f"from step {s0} to {s1} train loss {_g(t[0])} -> {_g(t[-1])} ({_pct(t[0], t[-1])}), "
                         f"eval_loss {_g(e[0])} -> {_g(e[-1])} ({_pct(e[0], e[-1])}); gap {_g(gap[0])} -> {_g(gap[-1])}")
            marks += [s0, s1]
    if not parts:
        return []
    if best_step is not None:
        epoch = _epoch_at(records, best_step)
        where = f"the best model was at step {best_step}" + (f" (epoch {epoch:.2g})" if epoch is not None else "") + ": "
    else:
        where = ""
    return [Finding("overfitting", "warning", title, "; ".join(parts),
                    where + "train fewer epochs (num_train_epochs) or lower learning_rate; add more varied data; "
                    "use the checkpoint-N saved nearest that step (save_steps = eval_steps keeps one there), or let sftlab "
                    "do it: early_stopping_patience: 3 stops the run, load_best_model_at_end: true keeps the best model",
                    sorted(set(marks)))]


def _plateau(records: list[dict], info: RunInfo) -> list[Finding]:
    ts, tv = _series(records, "loss")
    if info.warmup_steps:
        keep = ts > info.warmup_steps
        ts, tv = ts[keep], tv[keep]
    if len(tv) < PLATEAU_MIN_RECORDS:
        return []
    start, tail = _start(tv), _tail(ts)
    end = float(np.median(tv[tail]))
    if start <= 0 or abs(start - end) >= PLATEAU_FALL * start:  # it fell (or rose: divergence's business)
        return []
    k = max(START_MIN, int(len(tv) * START_SHARE))
    evidence = (f"train loss {_g(start)} at the start ({_span(ts[:k])}), {_g(end)} at the end ({_span(ts[tail])}): "
                f"{_pct(start, end)} over {len(tv)} logs" + (" after warmup" if info.warmup_steps else "")
                + (f"; learning_rate {_lr(info.learning_rate)}" if info.learning_rate else ""))
    if end < PLATEAU_KNOWN:
        return [Finding("plateau", "info", f"Flat train loss at a low value ({_g(end)}): the model already knew these answers",
                        evidence, "training changes little here; compare with the base model (sftlab compare) to see "
                        "whether fine-tuning is needed", [int(ts[0]), int(ts[-1])])]
    return [Finding("plateau", "warning", f"Plateau: train loss barely moved ({_pct(start, end)})", evidence,
                    "raise learning_rate (common values: 5e-5 for LoRA, 1e-5 for full tuning); check that the answers are "
                    "trained and labelled right (sftlab data preview); if it still does not learn, raise lora_rank or use a bigger model",
                    [int(ts[0]), int(ts[-1])])]


def _divergence(records: list[dict], info: RunInfo) -> list[Finding]:
    ts, tv = _series(records, "loss")
    if len(tv) < DIVERGE_MIN_RECORDS:
        return []
    chunks = np.array_split(np.arange(len(tv)), min(DIVERGE_CHUNKS, len(tv) // DIVERGE_CHUNK))
    med = np.array([np.median(tv[c]) for c in chunks])
    i = int(np.argmin(med))
    low, end = float(med[i]), float(med[-1])
    rise = max(DIVERGE_RISE, _change_noise(_noise(tv), min(len(c) for c in chunks)))
    threshold = max(low * (1 + rise), low + DIVERGE_ABS)
    if min(med[-2:]) <= threshold:  # the last two chunks both: a rising trend, not one unlucky chunk
        return []
    onset = int(ts[chunks[i + int(np.argmax(med[i:] > threshold))][0]])
    start = _start(tv)
    worse = end >= start
    evidence = (f"train loss median lowest {_g(low)} over {_span(ts[chunks[i]])}, {_g(end)} over {_span(ts[chunks[-1]])} "
                f"({_pct(low, end)})" + (f", above where it started ({_g(start)})" if worse else ""))
    lowest = int(ts[chunks[i]][len(chunks[i]) // 2])
    return [Finding("divergence", "error" if worse else "warning", f"Divergence: train loss rising since step {lowest} ({_pct(low, end)})",
                    evidence, "lower learning_rate (halve it), keep max_grad_norm at 1.0, warm up (warmup_ratio 0.1); "
                    f"resume from a checkpoint saved before step {onset}", [lowest, onset])]


def _spikes(records: list[dict], info: RunInfo) -> list[Finding]:
    ts, tv = _series(records, "loss")
    if len(tv) < SPIKE_MIN_RECORDS:
        return []
    med = _rolling_median(tv, SPIKE_WINDOW)
    rel = np.where(med > 0, tv / np.where(med > 0, med, 1) - 1, 0.0)
    z = rel / max(_noise(tv), SPIKE_NOISE_FLOOR)
    # tv[j] > tv[j - 1]: the loss jumped up here, it is not the top of the initial fall
    hits = [j for j in range(1, len(tv)) if rel[j] > SPIKE_REL and z[j] > SPIKE_Z and tv[j] > tv[j - 1]]
    if not hits:
        return []
    many = len(hits) >= SPIKE_WARN_COUNT
    return [Finding("spikes", "warning" if many else "info", f"Loss spikes at {len(hits)} step{'s' if len(hits) > 1 else ''}",
                    _listed([f"loss {_g(tv[j])} at step {ts[j]} (local median {_g(med[j])}, x{tv[j] / med[j]:.1f})" for j in hits]),
                    "a spike the loss recovers from is usually one odd batch: check the data for broken or very long samples "
                    "(sftlab data check); if spikes repeat, lower learning_rate and keep max_grad_norm at 1.0",
                    [int(ts[j]) for j in hits])]


def _epoch_drop(records: list[dict], info: RunInfo) -> list[Finding]:
    rows = []
    for r in records:
        if not (_number(r.get("loss")) and math.isfinite(r["loss"])):
            continue
        epoch = r.get("epoch") if _number(r.get("epoch")) else (r["step"] / info.steps_per_epoch if info.steps_per_epoch else None)
        if epoch is None:
            return []
        rows.append((r["step"], float(r["loss"]), float(epoch)))
    if not rows:
        return []
    ts, tv, te = (np.array(c) for c in zip(*rows))
    k_of = np.ceil(te - EPOCH_EPS).astype(int)  # 1-based epoch a log ends in; epoch 1.0 is the end of epoch 1
    prev = np.concatenate([[0.0], te[:-1]])
    whole = prev >= k_of - 1 - EPOCH_EPS  # the log's interval lies inside one epoch (the first log after a resume may not)
    parts, marks, drops = [], [], []
    sigma = _noise(tv)
    for k in range(1, int(k_of.max())):
        inside, after = np.nonzero((k_of == k) & whole)[0], np.nonzero((k_of == k + 1) & whole)[0]
        if len(inside) < EPOCH_MIN_RECORDS or len(after) < 2:
            continue
        w = min(max(EPOCH_WINDOW, len(inside) // 4), len(inside) // 2, len(after))
        before_v, after_v = float(np.median(tv[inside[-w:]])), float(np.median(tv[after[:w]]))
        drop = (before_v - after_v) / before_v if before_v > 0 else 0.0
        # the trend inside epoch k (second half, a line through its rolling median) carried across the boundary
        late = inside[len(inside) // 2:]
        slope = np.polyfit(ts[late], _rolling_median(tv[late], EPOCH_WINDOW), 1)[0] if len(late) >= 2 else 0.0
        expected = max(0.0, -slope) * (np.median(ts[after[:w]]) - np.median(ts[inside[-w:]])) / before_v if before_v > 0 else 0.0
        if (drop >= max(EPOCH_DROP, _change_noise(sigma, w)) and before_v - after_v >= EPOCH_DROP_ABS
                and drop >= EPOCH_TREND_FACTOR * expected):
            boundary = k * info.steps_per_epoch if info.steps_per_epoch else int(ts[inside[-1]])
            drops.append(k)
            marks.append(int(boundary))
            parts.append(f"epoch {k} -> {k + 1} at step {boundary}: train loss {_g(before_v)} over the last {w} logs of epoch {k}, "
                         f"{_g(after_v)} over the first {w} of epoch {k + 1} ({_pct(before_v, after_v)}; "
                         f"the trend inside epoch {k} predicts {-expected * 100:+.0f}%)")
    if not parts:
        return []
    starts = ", ".join(str(k + 1) for k in drops)
    return [Finding("epoch_drop", "warning", f"Train loss drops at the start of epoch{'s' if len(drops) > 1 else ''} {starts}: "
                    "the model memorised the samples it saw", "; ".join(parts),
                    "seeing the same samples again lowers the loss at once (a sign of memorisation): train fewer "
                    f"epochs (num_train_epochs {drops[0]}: the first drop follows it) or add data, and watch eval_loss "
                    "(val_size, eval_steps) to stop at its minimum", marks)]


def _too_low(records: list[dict], info: RunInfo) -> list[Finding]:
    ts, tv = _series(records, "loss")
    if len(tv) < TOO_LOW_MIN_RECORDS:
        return []
    tail = _tail(ts)
    end = float(np.median(tv[tail]))
    if end >= TOO_LOW:
        return []
    evidence = f"train loss median {_g(end)} over {_span(ts[tail])} (nats per token; perplexity {math.exp(end):.3f})"
    marks = [int(ts[tail[0]]), int(ts[-1])]
    es, ev = _series(records, "eval_loss")
    if not len(ev):
        return [Finding("too_low", "warning", f"Train loss very low ({_g(end)}) and no eval_loss to check it against", evidence,
                        "an extremely low loss can mean memorisation: set val_size (0.1-0.2 for small data) to watch eval_loss, "
                        "and check answers to new prompts (sftlab predict)", marks)]
    e = float(ev[-1])  # the model at the end (eval runs on a fixed set: no batch noise)
    evidence += f"; eval_loss {_g(e)} at step {es[-1]}"
    if e >= TOO_LOW_EVAL_RATIO * end and e - end >= TOO_LOW_EVAL_ABS:
        return [Finding("too_low", "warning", f"Memorisation: train loss {_g(end)}, eval_loss {_g(e)} (x{e / end:.0f})", evidence,
                        "the model reproduces its training answers but does not generalise: train fewer epochs or lower "
                        "learning_rate, add more varied data; use the checkpoint saved before eval_loss rose", marks)]
    return [Finding("too_low", "info", f"Very low loss ({_g(end)}), eval_loss as low: an easy task for this model", evidence,
                    "check that answers to new prompts are varied, not copies of training answers (sftlab predict)", marks)]


def _grad_explosion(records: list[dict], info: RunInfo) -> list[Finding]:
    gs, gv = _series(records, "grad_norm")
    hits = []  # (index, running median)
    for j in range(GRAD_HISTORY, len(gv)):
        ref = float(np.median(gv[max(0, j - GRAD_WINDOW): j]))
        if ref > 0 and gv[j] > GRAD_FACTOR * ref:
            hits.append((j, ref))
    if not hits:
        return []
    return [Finding("grad_explosion", "warning", f"Gradient norm explosions at {len(hits)} step{'s' if len(hits) > 1 else ''}",
                    _listed([f"grad_norm {_g(gv[j])} at step {gs[j]} (running median {_g(ref)}, x{gv[j] / ref:.0f})" for j, ref in hits]),
                    "keep max_grad_norm at 1.0 (it clips these; grad_norm is logged before clipping), lower learning_rate, "
                    "check the data for very long or broken samples (sftlab data check)", [int(gs[j]) for j, _ in hits])]


def _schedule(records: list[dict], info: RunInfo) -> list[Finding]:
    found = []
    if info.warmup_steps and info.total_steps:
        if info.warmup_steps >= info.total_steps:
            found.append(Finding("schedule", "warning", "Warmup is as long as training: learning_rate is never reached",
                                 f"warmup_steps {info.warmup_steps} >= total steps {info.total_steps}",
                                 "use warmup_ratio 0.03-0.1 (a common choice is 0.1) or fewer warmup_steps"))
        elif info.warmup_steps > WARMUP_SHARE * info.total_steps:
            found.append(Finding("schedule", "info", "Warmup takes most of the run",
                                 f"warmup_steps {info.warmup_steps} of {info.total_steps} steps "
                                 f"({info.warmup_steps / info.total_steps:.0%})",
                                 "use warmup_ratio 0.03-0.1 (a common choice is 0.1)"))
    lr = info.learning_rate
    if lr is None:  # the peak of the logged schedule is learning_rate
        _, lrs = _series(records, "lr")
        lr = float(lrs.max()) if len(lrs) else None
    if info.finetuning_type == "full" and lr is not None and lr > FULL_LR_MAX:
        found.append(Finding("schedule", "warning", f"learning_rate {_lr(lr)} is high for full fine-tuning",
                             f"finetuning_type full, learning_rate {_lr(lr)} (full tuning commonly uses {_lr(FULL_LR_COMMON)})",
                             f"use learning_rate about {_lr(FULL_LR_COMMON)}: larger steps overwrite what the model knew "
                             "(LoRA takes larger rates, about 5e-5 to 1e-4)"))
    return found


RULES = (_non_finite, _overfitting, _plateau, _divergence, _spikes, _epoch_drop, _too_low, _grad_explosion, _schedule)
