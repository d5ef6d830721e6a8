"""``sftlab data …``: look at data as training will see it (preview, check, stats), and clean, split, convert or sample it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from sftlab.cli.common import DATA_DIR_HELP, byte_progress, resolve
from sftlab.errors import SftlabError
from sftlab.files import check_outputs


def data_preview(
    config: Path = typer.Argument(..., help="YAML config naming the model and dataset."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides"),
    n: int = typer.Option(3, "--n", help="How many samples."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per sample with exact input_ids and labels."),
) -> None:
    """Show samples exactly as training sees them, trained tokens marked."""
    from sftlab.config import load_config

    cfg = load_config(config, overrides or [])
    resolve(cfg.dataset, cfg.dataset_dir)  # a missing or unnamed data file is said before torch and the tokenizer load
    from rich.console import Console
    from rich.text import Text

    from sftlab.data.pipeline import preview_heading, preview_rows, preview_segments
    from sftlab.model.assets import resolve_model
    from sftlab.model.load import load_tokenizer

    tokenizer = load_tokenizer(cfg, resolve_model(cfg.model_name_or_path))
    warnings, rows = preview_rows(cfg, tokenizer, n)
    for warning in warnings:
        logging.getLogger("sftlab").warning(warning)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False))
        return
    console = Console()
    for row in rows:
        console.print(Text(f"── {preview_heading(row)}", style="bold"))
        for warning in row["warnings"]:
            console.print(Text(f"   ! {warning}", style="yellow"))
        segments = preview_segments(row, tokenizer)
        if console.is_terminal:
            console.print(Text.assemble(*((text, "black on green" if trained else "dim") for text, trained in segments)))
        else:  # no colour when piped: trained spans in [[ ]]
            typer.echo("".join(f"[[{text}]]" if trained else text for text, trained in segments))


def data_check(
    data: list[str] = typer.Argument(..., help="Dataset names (from dataset_info.json) or data files or folders."),
    dataset_dir: str = typer.Option("data", "--dataset-dir", help=DATA_DIR_HELP),
    max_errors: int = typer.Option(50, "--max-errors", min=0, help="List at most this many problems (all are counted)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per problem, then a summary object."),
    leakage: bool = typer.Option(False, "--leakage", help="Instead: report samples of the second DATA also found in the first."),
    threshold: float = typer.Option(0.8, "--threshold", min=0.0, max=1.0, help="With --leakage: similarity of a near-duplicate."),
) -> None:
    """Validate every sample against its format: each problem with file:line and a reason; exit code 1 if any."""
    if leakage:
        _data_leakage(data, dataset_dir, threshold, as_json)
        return
    from sftlab.data.check import check_sources

    sources = resolve(data, dataset_dir)
    with byte_progress(sources, "Checking") as on_bytes:
        result = check_sources(sources, max_errors=max_errors, on_bytes=on_bytes)
    if as_json:
        for ref, kind, message in result.problems:
            typer.echo(json.dumps({"ref": ref, "kind": kind, "message": message}, ensure_ascii=False))
        typer.echo(json.dumps({"summary": True, "rows": result.rows, "rows_with_problems": result.rows_with_problems,
                               "problems": result.total, "listed": len(result.problems), "counts": dict(result.counts)}))
    else:
        for ref, kind, message in result.problems:
            typer.echo(f"{ref}: {kind}: {message}")
        *summary, last = result.summary_lines()
        for line in summary:
            typer.echo(line)
        typer.secho(last, fg="red" if result.total else "green", bold=True)
    if result.total:
        raise typer.Exit(1)


def _data_leakage(data: list[str], dataset_dir: str, threshold: float, as_json: bool) -> None:
    """sftlab data check --leakage A B: samples of B that also occur (exactly or nearly) in A; exit code 1 if any."""
    if len(data) != 2:
        raise SftlabError(f"--leakage compares two datasets, got {len(data)}; run: sftlab data check --leakage TRAIN EVAL")
    from sftlab.data.split import leakage

    sources_a, sources_b = resolve(data[:1], dataset_dir), resolve(data[1:], dataset_dir)
    with byte_progress(sources_a + sources_b, "Comparing") as on_bytes:
        found = leakage(sources_a, sources_b, threshold=threshold, on_bytes=on_bytes)
    if as_json:
        for ref_a, ref_b, how, similarity in found.pairs:
            typer.echo(json.dumps({"ref_a": ref_a, "ref_b": ref_b, "match": how, "similarity": similarity}, ensure_ascii=False))
        typer.echo(json.dumps({"summary": True, "n_a": found.n_a, "n_b": found.n_b, "n_b_leaked": found.n_b_leaked}))
    else:
        for line in found.lines():
            typer.echo(line)
    if found.n_b_leaked:
        raise typer.Exit(1)


def data_stats(
    args: Optional[list[str]] = typer.Argument(None, metavar="[DATA]... | [KEY=VALUE]...",
                                               help="Dataset names or data files; with --config: key=value overrides of it."),
    model: Optional[str] = typer.Option(None, "--model", help="Model directory, .gguf or Hub id: its tokenizer and chat template render the samples."),
    config: Optional[Path] = typer.Option(None, "--config", help="A training config: model, template, dataset, dataset_dir and cutoff_len come from it."),
    template: Optional[str] = typer.Option(None, "--template", help="Chat template, as training's template key: a LLaMA-Factory name (the tokenizer's own, else a built-in equivalent) or builtin:NAME (replaces it)."),
    cutoff_len: Optional[int] = typer.Option(None, "--cutoff-len", min=8, help="Count the samples over this many tokens (default: 2048, or the config's)."),
    dataset_dir: Optional[str] = typer.Option(None, "--dataset-dir", help=DATA_DIR_HELP),
    output: Path = typer.Option(Path("data_stats"), "-o", "--output", help="Folder for stats.html, its plots (PNG) and stats.json."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Encoding processes (default: the config's preprocessing_num_workers, else 1)."),
    force: bool = typer.Option(False, "--force", help="Write into the output folder even if it is not empty (replacing a previous report)."),
) -> None:
    """Token lengths with the model's own template, the cutoff_len that covers them, turns, language mix, diversity; HTML report."""
    from sftlab.config import load_config

    given = {k: v for k, v in dict(model_name_or_path=model, template=template, cutoff_len=cutoff_len, dataset_dir=dataset_dir).items()
             if v is not None}
    if config is not None:
        if bad := [a for a in args or [] if "=" not in a]:
            raise SftlabError(f"with --config, arguments are key=value overrides, got '{bad[0]}'; to measure other data: dataset={bad[0]}")
        cfg = load_config(config, args or [], **given)
    elif args and model:
        cfg = load_config(None, [], dataset=args, **given)
    else:
        raise SftlabError("give the data and the model (sftlab data stats data.jsonl --model MODEL) or a training config "
                          "(sftlab data stats --config train.yaml)")
    from sftlab.data.sources import source_files

    sources = resolve(cfg.dataset, cfg.dataset_dir)
    inputs = source_files(sources)
    check_outputs([output / "stats.json"], inputs, force=True)  # the one name a data file could have
    check_outputs([output], inputs, force)  # before the tokenizer loads and the data is measured
    from sftlab.data.stats import stats_for_config
    from sftlab.model.assets import resolve_model
    from sftlab.model.load import load_tokenizer
    from sftlab.report.stats_report import write_stats_report

    tokenizer = load_tokenizer(cfg, resolve_model(cfg.model_name_or_path))
    with byte_progress(sources, "Measuring") as on_bytes:
        measured = stats_for_config(cfg, tokenizer, workers=workers or cfg.preprocessing_num_workers or 1, on_bytes=on_bytes)
    written = write_stats_report(measured, output)
    _print_stats(measured.to_dict())
    for path in written:
        if path.suffix != ".png":
            typer.echo(f"wrote {path}")


def _print_stats(s: dict) -> None:
    """The summary of data stats: the token table (a rich table on a terminal, plain lines when piped), then the rest."""
    from rich.console import Console
    from rich.table import Table

    from sftlab.data.stats import OVER_ADVICE, TABLE_COLUMNS, summary_lines

    console = Console()
    if console.is_terminal:
        table = Table("tokens", *TABLE_COLUMNS)
        for name, row in s["tokens"].items():
            table.add_row(name, *(str(row[k]) for k in TABLE_COLUMNS))
        console.print(table)
    else:
        for name, row in s["tokens"].items():
            typer.echo(f"{name} tokens: " + ", ".join(f"{k} {row[k]}" for k in TABLE_COLUMNS))
    for line in summary_lines(s, see="the report"):
        typer.echo(line)
    typer.secho(s["over_cutoff"]["advice"], bold=True, fg="yellow" if s["over_cutoff"]["share"] > OVER_ADVICE else None)


def data_dedup(
    data: list[str] = typer.Argument(..., help="Dataset names or data files."),
    out: Path = typer.Option(..., "-o", "--output", help="The cleaned JSONL; <stem>.removed.jsonl, .conflicts.jsonl and .report.html go beside it."),
    threshold: float = typer.Option(0.8, "--threshold", help="Near duplicates: prompt and answer similarity (Jaccard) at least this."),
    exact_only: bool = typer.Option(False, "--exact-only", help="Remove exact duplicates (after normalising) only."),
    conflict_threshold: float = typer.Option(0.9, "--conflict-threshold", help="Conflicting answers: also list prompts this similar (1: identical prompts only)."),
    dataset_dir: str = typer.Option("data", "--dataset-dir", help=DATA_DIR_HELP),
    force: bool = typer.Option(False, "--force", help="Replace the output files (and the report) if they exist."),
) -> None:
    """Remove exact and near duplicates (keeping the first); list same or near-same prompts with conflicting answers; HTML report."""
    from sftlab.data.dedup import dedup
    from sftlab.report.dedup_report import write_dedup_report

    sources = resolve(data, dataset_dir)
    with byte_progress(sources, "Deduplicating") as on_bytes:
        result = dedup(sources, out, threshold=threshold, near=not exact_only, on_bytes=on_bytes, conflict_threshold=conflict_threshold,
                       force=force)
    report = write_dedup_report(result)[-1]
    for line in result.lines():
        typer.echo(line)
    typer.echo(f"report: {report}")


def data_split(
    data: list[str] = typer.Argument(..., help="Dataset names or data files."),
    out_dir: Path = typer.Option(..., "-o", "--output", help="Folder for train.jsonl, val.jsonl, test.jsonl and dataset_info.json."),
    val: float = typer.Option(0.1, "--val", help="Share of samples for validation (0: none)."),
    test: float = typer.Option(0.1, "--test", help="Share of samples for test (0: none)."),
    seed: int = typer.Option(42, "--seed", help="The same seed and data give the same split."),
    threshold: float = typer.Option(0.8, "--threshold", help="Near duplicates (kept in one split): similarity at least this."),
    dataset_dir: str = typer.Option("data", "--dataset-dir", help=DATA_DIR_HELP),
    force: bool = typer.Option(False, "--force", help="Replace train/val/test.jsonl and their dataset_info.json entries if they exist (other entries are kept)."),
) -> None:
    """Seeded train/val/test split that keeps near duplicates and same-prompt samples in one split (no leakage)."""
    from sftlab.data.split import split

    sources = resolve(data, dataset_dir)
    with byte_progress(sources, "Splitting") as on_bytes:
        result = split(sources, out_dir, val=val, test=test, seed=seed, threshold=threshold, on_bytes=on_bytes, force=force)
    for line in result.lines():
        typer.echo(line)


def data_convert(
    data: str = typer.Argument(..., help="Dataset name (dataset_info.json) or file to convert."),
    out: Path = typer.Argument(..., help="Output .jsonl (or .json for one JSON array)."),
    to: str = typer.Option(..., "--to", help="Target format: messages (OpenAI), sharegpt or alpaca."),
    dataset_dir: str = typer.Option("data", "--dataset-dir", help=DATA_DIR_HELP),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Rewrite a dataset in another format; says what the target format could not hold."""
    from sftlab.data.convert import convert

    sources = resolve([data], dataset_dir)
    with byte_progress(sources, "Converting") as on_bytes:
        result = convert(sources, out, to, on_bytes, force)
    for line in result.lines():
        typer.echo(line)
    typer.echo(f"wrote {out}")


def data_sample(
    data: list[str] = typer.Argument(..., help="Dataset names (dataset_info.json) or files."),
    n: int = typer.Option(50, "--n", help="How many samples (a common practice: review 50–100 of every 1000)."),
    seed: int = typer.Option(42, "--seed", help="The same seed gives the same sample."),
    out: Optional[Path] = typer.Option(None, "-o", "--output", help="Also write the sampled rows, unchanged, to this .jsonl."),
    dataset_dir: str = typer.Option("data", "--dataset-dir", help=DATA_DIR_HELP),
    force: bool = typer.Option(False, "--force", help="Replace the -o file if it exists."),
) -> None:
    """A seeded random sample for human review, each sample shown turn by turn with where it came from."""
    from sftlab.data.convert import sample_rows
    from sftlab.data.rows import write_jsonl
    from sftlab.data.sources import source_files

    sources = resolve(data, dataset_dir)
    if out is not None:
        check_outputs([out], source_files(sources), force)
    with byte_progress(sources, "Sampling") as on_bytes:
        rows = sample_rows(sources, n, seed, on_bytes)
    _print_samples(rows)
    if out is not None:
        readable = [row.value for _, row in rows if row.value is not None]
        write_jsonl(out, readable)
        typer.echo(f"wrote {len(readable)} rows to {out}" + (f" ({len(rows) - len(readable)} unreadable left out)" if len(readable) < len(rows) else ""))
    typer.echo(f"{len(rows)} samples (seed {seed})", err=True)


def _print_samples(rows) -> None:
    """Each sampled (source, row) turn by turn, under its ref; a row that is not a valid sample says why."""
    from sftlab.data.formats import RowError
    from sftlab.data.rows import conversation, first_value, row_spec

    specs = {id(s): row_spec(s, first_value(s)) for s in {id(s): s for s, _ in rows}.values()}
    for source, row in rows:
        typer.echo(f"── {row.ref}")
        try:
            messages = conversation(row, specs[id(source)])
        except RowError as e:
            typer.echo(f"   ! not a valid sample: {e}")
            continue
        for m in messages:
            if m.get("reasoning_content"):
                typer.echo(f"{m['role']} (reasoning): {m['reasoning_content']}")
            calls = f" {json.dumps(m['tool_calls'], ensure_ascii=False)}" if m.get("tool_calls") else ""
            typer.echo(f"{m['role']}: {m['content']}{calls}")
