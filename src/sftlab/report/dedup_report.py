"""The HTML report of ``sftlab data dedup``: counts, cluster sizes, the largest clusters, conflicting answers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from sftlab.data.dedup import DedupResult, sidecar
from sftlab.report.page import Page, new_figure


def report_path(out: Path) -> Path:
    return sidecar(out, ".report.html")


def write_dedup_report(result: DedupResult, path: Path | None = None) -> list[Path]:
    """Write the page (default ``<OUT stem>.report.html``) and its PNGs; returns the files written."""
    path = path or report_path(result.out)
    page = Page(f"sftlab data dedup: {result.out.name}")
    n = max(1, result.n_rows)
    removed = result.n_exact + result.n_near
    page.heading("Counts")
    page.table(["", "samples", "share"], [
        ["rows read", result.n_rows, "100%"],
        ["exact duplicates removed", result.n_exact, f"{result.n_exact / n:.1%}"],
        ["near duplicates removed", result.n_near, f"{result.n_near / n:.1%}"] if result.near
        else ["near duplicates", "not looked for", ""],
        ["kept", result.n_kept, f"{result.n_kept / n:.1%}"],
    ])
    page.table(["", "count"], [["clusters of two or more samples", result.n_clusters],
                               ["prompts with conflicting answers (kept)", result.n_conflicts]])
    near = (f"Near duplicates: the same system prompt, and both the prompt and the answer have an estimated Jaccard similarity "
            f">= {result.threshold:g} over character 5-grams. " if result.near else "Near duplicates were not looked for. ")
    page.text(f"Texts are compared normalised (NFKC, case-folded, whitespace collapsed). {near}The first sample of each cluster "
              f"(input order) is kept. Removed: {removed:,}, listed in {result.removed_path.name}.", "note")

    page.heading("Cluster sizes")
    if len(result.cluster_sizes):
        fig, ax = new_figure()
        sizes = result.cluster_sizes
        top = int(sizes.max())
        bins = np.arange(2, top + 2) - 0.5 if top <= 40 else np.geomspace(2, top + 1, 40)
        ax.hist(sizes, bins=bins, color="#4c72b0", log=True)
        if top > 40:
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("samples per cluster")
        ax.set_ylabel("clusters")
        ax.set_title(f"{len(sizes):,} clusters of duplicates")
        page.figure(fig, f"{result.out.stem}.cluster_sizes", "histogram of duplicate cluster sizes")
    else:
        page.text("No duplicates found.")

    if result.largest:
        page.heading("Largest clusters")
        for size, members in result.largest:
            shown = f" (the first {len(members)} shown)" if size > len(members) else ""
            page.text(f"{size:,} samples, kept: {members[0].ref}{shown}", "note")
            page.table(["sample", "kind", "similarity", "text"], [[m.ref, m.kind, m.similarity, m.text] for m in members])

    page.heading("Conflicting answers")
    if result.conflicts:
        near = (f" Near-same prompts (the same system prompt, prompt similarity >= {result.conflict_threshold:g}) are grouped around "
                f"the first sample, never chained; each prompt is shown with what it shares with the first one elided."
                if result.near and result.conflict_threshold < 1 else "")
        page.text(f"Answers that are not duplicates of each other to the same prompt ({result.n_conflicts:,} prompts) or to near-same "
                  f"prompts ({result.n_near_conflicts:,} groups); they were kept.{near} All are in {result.conflicts_path.name}; "
                  f"the first {len(result.conflicts)} groups follow.", "warn")
        for c in result.conflicts:
            page.pre(c.prompt)
            more = [[f"... {c.n_samples - len(c.samples)} more", "", "", ""][:4 if c.near else 2]] if c.n_samples > len(c.samples) else []
            if c.near:
                page.table(["sample", "prompt (differences)", "similarity", "answer"],
                           [[s.ref, difference(c.samples[0].prompt, s.prompt) if k else "(the prompt above)", s.similarity, s.answer]
                            for k, s in enumerate(c.samples)] + more)
            else:
                page.table(["sample", "answer"], [[s.ref, s.answer] for s in c.samples] + more)
    else:
        page.text("No prompt has two different answers.")
    return page.write(path)


def difference(first: str, other: str, context: int = 30) -> str:
    """``other`` with the prefix and suffix it shares with ``first`` elided, keeping ``context`` characters of each."""
    start = len(os.path.commonprefix([first, other]))
    end = len(os.path.commonprefix([first[start:][::-1], other[start:][::-1]]))
    head = "…" + other[start - context:start] if start > context else other[:start]
    tail = other[len(other) - end:len(other) - end + context] + "…" if end > context else other[len(other) - end:]
    return head + other[start:len(other) - end] + tail
