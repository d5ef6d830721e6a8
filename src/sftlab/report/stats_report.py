"""The ``sftlab data stats`` report: stats.html with its plots embedded, the plots as PNGs, and stats.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sftlab.data.stats import COVERAGE, LANGUAGES, OVER_ADVICE, Stats
from sftlab.files import atomic_write
from sftlab.report.page import Page, new_figure

_LANGUAGE_NAMES = {"cjk": "mostly CJK", "latin": "mostly Latin", "other": "mostly another script (or no letters)", "mixed": "mixed"}


def write_stats_report(stats: Stats, out_dir: Path) -> list[Path]:
    """Write ``out_dir``/stats.html, its PNGs and stats.json (each atomically); returns the files written."""
    summary = stats.to_dict()
    page = Page(f"Data stats: {', '.join(stats.sources)}")
    skipped = sum(stats.skipped.values())
    page.text(f"{stats.rows:,} rows read, {stats.samples:,} samples measured with the model's chat template"
              + (f", {skipped:,} skipped (see below)" if skipped else "")
              + (f"; training adds {stats.views:,} views (answers the template rewrites in history)" if stats.views else "")
              + f". Length = prompt (untrained) + answer (trained) tokens, up to the last trained token. {stats.seconds:.1f} s.")
    if stats.samples:
        over = summary["over_cutoff"]
        page.text(over["advice"], "warn" if over["share"] > OVER_ADVICE else "note")
        _lengths(page, stats, summary)
        _turns(page, stats, summary)
        _answer_vs_prompt(page, stats, summary)
        _language(page, summary)
        _diversity(page, summary)
    if skipped:
        page.heading("Skipped rows")
        page.table(["kind", "rows", "first ones"], [[k, n, "; ".join(stats.skipped_examples.get(k, []))]
                                                    for k, n in stats.skipped.most_common()])
    out_dir = Path(out_dir)
    written = page.write(out_dir / "stats.html")
    written.append(atomic_write(out_dir / "stats.json", json.dumps(summary, ensure_ascii=False, indent=1).encode("utf-8")))
    return written


def _lengths(page: Page, stats: Stats, summary: dict) -> None:
    page.heading("Token lengths")
    keys = ["min", "p50", "p90", "p95", "p99", "max", "mean"]
    page.table(["tokens", *keys], [[name, *(summary["tokens"][name][k] for k in keys)] for name in ("prompt", "answer", "length")])
    n = stats.samples
    rows = [[f"{p}%", summary["cutoff_for"][str(p)]] for p in COVERAGE]
    over = stats.over()
    page.table(["samples kept whole", "smallest cutoff_len"], rows)
    page.text(f"Over cutoff_len {stats.cutoff_len}: {over:,} samples ({over / n:.2%}), "
              f"{summary['over_cutoff']['multi_turn']:,} of them multi-turn (those lose later turns; "
              "a sample whose first answer does not fit is dropped).")

    length = stats.length
    cut95, cut99 = stats.cutoff_for(95), stats.cutoff_for(99)
    # The tail is clipped into the last bin so the bulk stays readable.
    top = min(int(length.max()), int(max(cut99, stats.cutoff_len) * 1.15))
    fig, ax = new_figure()
    ax.hist(np.minimum(length, top), bins=min(80, max(10, top - int(length.min()) + 1)), color="#4c72b0")
    _marks(ax, stats.cutoff_len, cut95, cut99, top)
    beyond = int(np.count_nonzero(length > top))
    ax.set_xlabel("tokens per sample" + (f" ({beyond:,} longer ones in the last bin)" if beyond else ""))
    ax.set_ylabel("samples")
    ax.legend(loc="upper right", fontsize=8)
    page.figure(fig, "length_histogram", "histogram of sample lengths in tokens")

    fig, ax = new_figure()
    xs = np.sort(length)
    ys = np.arange(1, n + 1) / n
    if n > 4000:  # a step plot of every sample is heavy; the percentile grid draws the same curve
        grid = np.linspace(0, 1, 2001)[1:]
        xs, ys = np.percentile(length, grid * 100, method="inverted_cdf"), grid
    ax.step(xs, ys, where="post", color="#4c72b0")
    ax.axvline(stats.cutoff_len, color="#c44e52", lw=1.5, label=f"cutoff_len {stats.cutoff_len} ({1 - over / n:.1%} fit)")
    for share, x in ((0.95, cut95), (0.99, cut99)):
        ax.plot([x], [share], "o", color="#55a868")
        ax.annotate(f"{share:.0%}: {x}", (x, share), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel("cutoff_len (tokens)" + (f"; the longest sample has {int(length.max()):,}" if beyond else ""))
    ax.set_ylabel("share of samples kept whole")
    ax.set_xlim(0, top * 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    page.figure(fig, "length_cdf", "cumulative share of samples by length, cutoff_len marked")


def _marks(ax, cutoff_len: int, cut95: int, cut99: int, top: int) -> None:
    if cutoff_len <= top:
        ax.axvline(cutoff_len, color="#c44e52", lw=1.5, label=f"cutoff_len {cutoff_len}")
    ax.axvline(cut95, color="#55a868", lw=1, ls="--", label=f"95% fit: {cut95}")
    ax.axvline(cut99, color="#8172b2", lw=1, ls="--", label=f"99% fit: {cut99}")


def _turns(page: Page, stats: Stats, summary: dict) -> None:
    page.heading("Assistant turns per conversation")
    turns = summary["turns"]
    page.table(["turns", "samples", "share"], [[int(t), c, f"{c / stats.samples:.1%}"] for t, c in turns.items()])
    if len(turns) > 1:
        fig, ax = new_figure(6, 3)
        ax.bar([int(t) for t in turns], list(turns.values()), color="#4c72b0")
        ax.set_xlabel("assistant turns")
        ax.set_ylabel("samples")
        page.figure(fig, "turns", "bar chart of assistant turns per conversation")


def _answer_vs_prompt(page: Page, stats: Stats, summary: dict) -> None:
    page.heading("Answer length vs prompt length")
    corr = summary["answer_vs_prompt"]
    page.text(f"Pearson r = {_num(corr['pearson'])}, Spearman ρ = {_num(corr['spearman'])} over {stats.samples:,} samples"
              " (near 0: answer length does not follow prompt length).")
    points = np.array(corr["scatter"]).reshape(-1, 2)
    fig, ax = new_figure(6, 4)
    ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.35, color="#4c72b0", linewidths=0)
    ax.set_xlabel("prompt tokens (untrained)")
    ax.set_ylabel("answer tokens (trained)")
    if len(points) < stats.samples:
        ax.set_title(f"{len(points):,} of {stats.samples:,} samples (seeded)", fontsize=9)
    page.figure(fig, "answer_vs_prompt", "scatter of answer tokens against prompt tokens")


def _language(page: Page, summary: dict) -> None:
    page.heading("Language mix")
    lang = summary["language"]
    page.text(f"CJK characters: {lang['cjk_char_share']:.1%} of all letters. A sample is 'mostly' one script when at least "
              "80% of its letters are.")
    page.table(["samples", "count", "share"], [[_LANGUAGE_NAMES[k], lang["samples"][k], f"{lang['sample_shares'][k]:.1%}"]
                                               for k in LANGUAGES])


def _diversity(page: Page, summary: dict) -> None:
    page.heading("Diversity")
    div = summary["diversity"]
    page.text(f"Distinct n-grams of the answers' trained tokens (special tokens left out) over all n-grams; {div['method']}. "
              "Low values mean repetitive answers.")
    page.table(["n", "n-grams", "distinct", "distinct-n"], [[int(k), div["ngrams"][k], div["distinct_ngrams"][k], v]
                                                            for k, v in div["distinct"].items()])
    openings = summary["openings"]
    note = "" if openings["exact"] else " (counts are lower bounds: there were too many distinct openings to keep all)"
    for who in ("answers", "prompts"):
        page.text(f"Most repeated openings of {who} (first 4 words lowercased, or first 8 characters of CJK text){note}:")
        page.table(["opening", "count", "share"], [[o["opening"], o["count"], f"{o['share']:.2%}"] for o in openings[who]])


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
