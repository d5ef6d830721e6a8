"""The ``sftlab`` command: thin verbs over the workflow functions."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from sftlab.errors import SftlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Supervised fine-tuning of LLMs, correct by construction.")
data_app = typer.Typer(no_args_is_help=True, help="Look at data as training will see it.")
app.add_typer(data_app, name="data")

_debug = False


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    global _debug
    _debug = debug
    _setup_logging()


def _setup_logging() -> None:
    from rich.logging import RichHandler

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, markup=False, rich_tracebacks=False)], force=True)
    logging.getLogger("sftlab").setLevel(logging.INFO)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; sftlab logs what it loads
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not the user's to act on


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config (see examples/)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. learning_rate=1e-4"),
) -> None:
    """Fine-tune a model as the config says; writes checkpoints, metrics and the result to output_dir."""
    from sftlab.config import load_config
    from sftlab.train.run import run_training

    cfg = load_config(config, overrides or [])
    out = run_training(cfg)
    typer.echo(f"done: {out}")


@data_app.command("preview")
def data_preview(
    config: Path = typer.Argument(..., help="YAML config naming the model and dataset."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides"),
    n: int = typer.Option(3, "--n", help="How many samples."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per sample with exact input_ids and labels."),
) -> None:
    """Show samples exactly as training sees them, trained tokens marked."""
    from sftlab.config import load_config
    from sftlab.data.pipeline import preview_rows
    from sftlab.model.assets import resolve_model
    from sftlab.model.load import load_tokenizer

    cfg = load_config(config, overrides or [])
    tokenizer = load_tokenizer(cfg, resolve_model(cfg.model_name_or_path))
    warnings, rows = preview_rows(cfg, tokenizer, n)
    for warning in warnings:
        logging.getLogger("sftlab").warning(warning)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.text import Text

    console = Console()
    for row in rows:
        trained = sum(label != -100 for label in row["labels"])
        console.print(Text(f"── {row['ref']} · {row['status']} · {len(row['input_ids'])} tokens, {trained} trained", style="bold"))
        for warning in row["warnings"]:
            console.print(Text(f"   ! {warning}", style="yellow"))
        if console.is_terminal:
            text = Text()
            for tok, label in zip(row["input_ids"], row["labels"]):
                text.append(tokenizer.decode([tok]), style="black on green" if label != -100 else "dim")
            console.print(text)
        else:  # no colour when piped: trained spans in [[ ]]
            typer.echo(_bracketed(tokenizer, row))


def _bracketed(tokenizer, row: dict) -> str:
    out, inside = [], False
    for tok, label in zip(row["input_ids"], row["labels"]):
        if (label != -100) != inside:
            out.append("[[" if not inside else "]]")
            inside = not inside
        out.append(tokenizer.decode([tok]))
    return "".join(out) + ("]]" if inside else "")


def _sources(data: list[str], dataset_dir: str):
    """Dataset names (from dataset_info.json in ``dataset_dir``) or file/folder paths → sources, as training reads them."""
    from sftlab.data.sources import resolve_sources

    return resolve_sources(data, dataset_dir)


@contextmanager
def _byte_progress(sources, what: str):
    """A progress bar over the bytes of ``sources``; yields the ``on_bytes`` callback for iter_rows.

    Drawn on stderr, only on a terminal (piped output stays clean).
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from sftlab.data.rows import total_bytes

    console = Console(stderr=True)
    total = sum(total_bytes(s) for s in sources)
    with Progress(f"[bold]{what}", BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=console,
                  disable=not console.is_terminal, transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)

_DATA_DIR_HELP = "Folder with dataset_info.json, for dataset names (paths work without it)."


@data_app.command("check")
def data_check(
    data: list[str] = typer.Argument(..., help="Dataset names (from dataset_info.json) or data files or folders."),
    dataset_dir: str = typer.Option("data", "--dataset-dir", help=_DATA_DIR_HELP),
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

    sources = _sources(data, dataset_dir)
    with _byte_progress(sources, "Checking") as on_bytes:
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
    from sftlab.data.dedup import leakage

    sources_a, sources_b = _sources(data[:1], dataset_dir), _sources(data[1:], dataset_dir)
    with _byte_progress(sources_a + sources_b, "Comparing") as on_bytes:
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


@data_app.command("stats")
def data_stats(
    args: Optional[list[str]] = typer.Argument(None, metavar="[DATA]... | [KEY=VALUE]...",
                                               help="Dataset names or data files; with --config: key=value overrides of it."),
    model: Optional[str] = typer.Option(None, "--model", help="Model directory, .gguf or Hub id: its tokenizer and chat template render the samples."),
    config: Optional[Path] = typer.Option(None, "--config", help="A training config: model, template, dataset, dataset_dir and cutoff_len come from it."),
    template: Optional[str] = typer.Option(None, "--template", help="Built-in chat template replacing the tokenizer's own (training's template key)."),
    cutoff_len: Optional[int] = typer.Option(None, "--cutoff-len", min=8, help="Count the samples over this many tokens (default: 2048, or the config's)."),
    dataset_dir: Optional[str] = typer.Option(None, "--dataset-dir", help=_DATA_DIR_HELP),
    output: Path = typer.Option(Path("data_stats"), "-o", "--output", help="Folder for stats.html, its plots (PNG) and stats.json."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Encoding processes (default: the config's preprocessing_num_workers, else 1)."),
) -> None:
    """Token lengths with the model's own template, the cutoff_len that covers them, turns, language mix, diversity; HTML report."""
    from sftlab.config import load_config
    from sftlab.data.pipeline import encode_options
    from sftlab.data.stats import compute_stats
    from sftlab.model.assets import resolve_model
    from sftlab.model.load import load_tokenizer
    from sftlab.report.stats_report import write_stats_report

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
    sources = _sources(cfg.dataset, cfg.dataset_dir)
    tokenizer = load_tokenizer(cfg, resolve_model(cfg.model_name_or_path))
    with _byte_progress(sources, "Measuring") as on_bytes:
        stats = compute_stats(sources, tokenizer, cutoff_len=cfg.cutoff_len, options=encode_options(cfg, tokenizer),
                              max_samples=cfg.max_samples, on_bytes=on_bytes,
                              workers=workers or cfg.preprocessing_num_workers or 1)
    written = write_stats_report(stats, output)
    _print_stats(stats.to_dict())
    for path in written:
        if path.suffix != ".png":
            typer.echo(f"wrote {path}")


def _print_stats(s: dict) -> None:
    """The summary of data stats: a table on a terminal, plain lines when piped."""
    from rich.console import Console
    from rich.table import Table

    keys = ("min", "p50", "p90", "p95", "p99", "max", "mean")
    skipped = ", ".join(f"{k}: {n}" for k, n in s["skipped"].items())
    lines = [f"{s['samples']:,} samples of {s['rows']:,} rows" + (f" (skipped {skipped}; see the report)" if skipped else "")]
    cut = s["cutoff_for"]
    over = s["over_cutoff"]
    lines.append(f"smallest cutoff_len keeping 90/95/99/100 % whole: {cut['90']} / {cut['95']} / {cut['99']} / {cut['100']}")
    lines.append(f"over cutoff_len {s['cutoff_len']}: {over['count']:,} ({over['share']:.2%})")
    if s["samples"]:
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
    console = Console()
    if console.is_terminal:
        table = Table("tokens", *keys)
        for name, row in s["tokens"].items():
            table.add_row(name, *(str(row[k]) for k in keys))
        console.print(table)
    else:
        for name, row in s["tokens"].items():
            typer.echo(f"{name} tokens: " + ", ".join(f"{k} {row[k]}" for k in keys))
    for line in lines:
        typer.echo(line)
    typer.secho(s["over_cutoff"]["advice"], bold=True, fg="yellow" if s["over_cutoff"]["share"] > 0.05 else None)


@data_app.command("dedup")
def data_dedup(
    data: list[str] = typer.Argument(..., help="Dataset names or data files."),
    out: Path = typer.Option(..., "-o", "--output", help="The cleaned JSONL; <stem>.removed.jsonl, .conflicts.jsonl and .report.html go beside it."),
    threshold: float = typer.Option(0.8, "--threshold", help="Near duplicates: prompt and answer similarity (Jaccard) at least this."),
    exact_only: bool = typer.Option(False, "--exact-only", help="Remove exact duplicates (after normalising) only."),
    conflict_threshold: float = typer.Option(0.9, "--conflict-threshold", help="Conflicting answers: also list prompts this similar (1: identical prompts only)."),
    dataset_dir: str = typer.Option("data", "--dataset-dir", help=_DATA_DIR_HELP),
) -> None:
    """Remove exact and near duplicates (keeping the first); list same or near-same prompts with conflicting answers; HTML report."""
    from sftlab.data.dedup import dedup
    from sftlab.report.dedup_report import write_dedup_report

    sources = _sources(data, dataset_dir)
    with _byte_progress(sources, "Deduplicating") as on_bytes:
        result = dedup(sources, out, threshold=threshold, near=not exact_only, on_bytes=on_bytes, conflict_threshold=conflict_threshold)
    report = write_dedup_report(result)[-1]
    for line in result.lines():
        typer.echo(line)
    typer.echo(f"report: {report}")


@data_app.command("split")
def data_split(
    data: list[str] = typer.Argument(..., help="Dataset names or data files."),
    out_dir: Path = typer.Option(..., "-o", "--output", help="Folder for train.jsonl, val.jsonl, test.jsonl and dataset_info.json."),
    val: float = typer.Option(0.1, "--val", help="Share of samples for validation (0: none)."),
    test: float = typer.Option(0.1, "--test", help="Share of samples for test (0: none)."),
    seed: int = typer.Option(42, "--seed", help="The same seed and data give the same split."),
    threshold: float = typer.Option(0.8, "--threshold", help="Near duplicates (kept in one split): similarity at least this."),
    dataset_dir: str = typer.Option("data", "--dataset-dir", help=_DATA_DIR_HELP),
) -> None:
    """Seeded train/val/test split that keeps near duplicates and same-prompt samples in one split (no leakage)."""
    from sftlab.data.dedup import split

    sources = _sources(data, dataset_dir)
    with _byte_progress(sources, "Splitting") as on_bytes:
        result = split(sources, out_dir, val=val, test=test, seed=seed, threshold=threshold, on_bytes=on_bytes)
    for line in result.lines():
        typer.echo(line)


@data_app.command("convert")
def data_convert(
    data: str = typer.Argument(..., help="Dataset name (dataset_info.json) or file to convert."),
    out: Path = typer.Argument(..., help="Output .jsonl (or .json for one JSON array)."),
    to: str = typer.Option(..., "--to", help="Target format: messages (OpenAI), sharegpt or alpaca."),
    dataset_dir: str = typer.Option("data", "--dataset-dir", help=_DATA_DIR_HELP),
) -> None:
    """Rewrite a dataset in another format; says what the target format could not hold."""
    from sftlab.data.convert import convert

    sources = _sources([data], dataset_dir)
    with _byte_progress(sources, "Converting") as on_bytes:
        result = convert(sources, out, to, on_bytes)
    for line in result.lines():
        typer.echo(line)
    typer.echo(f"wrote {out}")


@data_app.command("sample")
def data_sample(
    data: list[str] = typer.Argument(..., help="Dataset names (dataset_info.json) or files."),
    n: int = typer.Option(50, "--n", help="How many samples (the seeds: review 50–100 of every 1000)."),
    seed: int = typer.Option(42, "--seed", help="The same seed gives the same sample."),
    out: Optional[Path] = typer.Option(None, "-o", "--output", help="Also write the sampled rows, unchanged, to this .jsonl."),
    dataset_dir: str = typer.Option("data", "--dataset-dir", help=_DATA_DIR_HELP),
) -> None:
    """A seeded random sample for human review, each sample shown turn by turn with where it came from."""
    from sftlab.data.convert import sample_rows
    from sftlab.data.formats import RowError
    from sftlab.data.rows import conversation, first_value, row_spec, write_jsonl

    sources = _sources(data, dataset_dir)
    with _byte_progress(sources, "Sampling") as on_bytes:
        rows = sample_rows(sources, n, seed, on_bytes)
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
    if out is not None:
        readable = [row.value for _, row in rows if row.value is not None]
        write_jsonl(out, readable)
        typer.echo(f"wrote {len(readable)} rows to {out}" + (f" ({len(rows) - len(readable)} unreadable left out)" if len(readable) < len(rows) else ""))
    typer.echo(f"{len(rows)} samples (seed {seed})", err=True)


@app.command("config-docs")
def config_docs(output: Path = typer.Option(Path("docs/config.md"), help="Where to write the reference.")) -> None:
    """Regenerate the config reference from the config declaration."""
    from sftlab.config import config_reference

    output.write_text(config_reference(), encoding="utf-8")
    typer.echo(f"wrote {output}")

def main() -> None:
    import click

    try:
        code = app(standalone_mode=False)
    except SftlabError as e:
        if _debug:
            raise
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):  # a second Ctrl-C while a checkpoint was pending
        typer.secho("error: interrupted", fg="red", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
