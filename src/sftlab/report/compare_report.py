"""The HTML report of ``sftlab compare``: the metric table, the spread of per-sample changes, the samples that moved most."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sftlab.evaluate.compare import Comparison, SampleChange, clip, format_change
from sftlab.report.page import Page, new_figure


def write_compare_report(comparison: Comparison, path: Path) -> list[Path]:
    """Write the page to ``path`` and its PNG beside it (atomically); returns the files written."""
    c = comparison
    page = Page(f"sftlab compare: {c.base.label} → {c.tuned.label}")
    for which, r in (("base", c.base), ("tuned", c.tuned)):
        adapter = f" + adapter {r.adapter}" if r.adapter else ""
        page.text(f"{which}: {r.model}{adapter} on {', '.join(r.dataset) or '?'}, {r.n_samples:,} samples ({r.created})", "note")

    page.heading("Metrics")
    rows = []
    for m in c.metrics:
        before, after, delta = format_change(m)
        rows.append([m.name, "lower" if m.lower_is_better else "higher", before, after, delta, m.verdict])
    page.table(["metric", "better when", "base", "tuned", "change", "result"], rows)
    page.text("Scores are on 0–100; eval_loss is the mean cross-entropy per answer token, perplexity its exponential. "
              "A metric one run lacks shows –.", "note")

    if c.key is None:
        page.text(c.note, "note")
        return page.write(path)
    up, down, same = c.counts
    page.heading(f"Samples by {c.key}")
    page.text(f"Per-sample {c.key} (0–100), tuned − base: {up:,} improved, {down:,} regressed, {same:,} unchanged.")
    if c.deltas:
        fig, ax = new_figure()
        ax.hist(np.asarray(c.deltas), bins=np.linspace(-100, 100, 41), color="#4c72b0")
        ax.axvline(0, color="#555", lw=0.8)
        ax.set_xlabel(f"{c.key}: tuned − base")
        ax.set_ylabel("samples")
        ax.set_title(f"Change of {c.key} per sample")
        page.figure(fig, f"{path.stem}.deltas", f"histogram of the per-sample change in {c.key}")
    for title, changes in (("Improved most", c.improved), ("Regressed most", c.regressed)):
        page.heading(title)
        if not changes:
            page.text("None.")
        for s in changes or []:
            _sample(page, s, c.key)
    return page.write(path)


def _sample(page: Page, s: SampleChange, key: str) -> None:
    page.text(f"Sample {s.index} ({s.ref}): {key} {s.score_before:.2f} → {s.score_after:.2f} ({s.delta:+.2f})")
    for label, text in (("prompt", s.prompt), ("reference", s.reference), ("base", s.before), ("tuned", s.after)):
        page.text(label, "note")
        page.pre(clip(text))


def write_comparison(comparison: Comparison, stem: Path) -> list[Path]:
    """``<stem>.md`` and ``<stem>.html`` (with its PNG) for a comparison; returns the files written."""
    from sftlab.files import atomic_write

    md = stem.with_suffix(".md")
    atomic_write(md, comparison.markdown().encode("utf-8"))
    return [md, *write_compare_report(comparison, stem.with_suffix(".html"))]
