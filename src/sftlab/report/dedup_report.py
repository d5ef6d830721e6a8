"""The HTML report of ``sftlab data dedup``: counts, cluster sizes, the largest clusters, conflicting answers."""

from __future__ import annotations

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
        page.text(f"The same prompt with answers that are not duplicates of each other; they were kept. "
                  f"All {result.n_conflicts:,} are in {result.conflicts_path.name}; the first {len(result.conflicts)} follow.", "warn")
        for c in result.conflicts:
            page.pre(c.prompt)
            page.table(["sample", "answer"], [[ref, answer] for ref, answer in c.samples]
                       + ([[f"... {c.n_samples - len(c.samples)} more", ""]] if c.n_samples > len(c.samples) else []))
    else:
        page.text("No prompt has two different answers.")
    return page.write(path)
