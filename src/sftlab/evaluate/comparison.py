"""Two evaluation folders compared, before → after, with the comparison written beside them (Markdown and HTML)."""

from __future__ import annotations

from pathlib import Path

from sftlab.evaluate.compare import Comparison, compare
from sftlab.evaluate.results import EvalResults, read_predictions
from sftlab.report.compare_report import write_comparison


def compare_dirs(base: Path, tuned: Path, stem: Path) -> tuple[Comparison, list[Path]]:
    """Compare the evaluation in ``base`` with the one in ``tuned`` (folders or their eval_results.json; the samples
    too where both saved predictions) and write ``stem``.md and ``stem``.html; returns the comparison and the files
    written. Raises SftlabError for a results file that is missing or malformed."""
    comparison = compare(EvalResults.read(base), EvalResults.read(tuned), read_predictions(base, missing_ok=True),
                         read_predictions(tuned, missing_ok=True))
    return comparison, write_comparison(comparison, stem)
