"""The ``sftlab`` command: thin verbs over the workflow functions."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import replace
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

    from rich.console import Console

    logging.basicConfig(level=logging.WARNING, format="%(message)s", datefmt="[%X]", force=True,  # stdout is for results
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, markup=False, rich_tracebacks=False)])
    logging.getLogger("sftlab").setLevel(logging.INFO)
    # The libraries read these when imported (here and in the ranks of a launch), so a command that fails on
    # its input does not wait seconds for torch/transformers to import first; a value the user set wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars; sftlab logs what it loads
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not the user's to act on


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config (see examples/)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. learning_rate=1e-4"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes on this machine (one per GPU): relaunches through torchrun (DDP)."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Machines taking part; run the same command on each, with its --node-rank."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This machine's index among --nnodes (0 is the main one)."),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="Address of node 0, reachable from every node."),
    master_port: int = typer.Option(29500, "--master-port", help="A free port on node 0."),
) -> None:
    """Fine-tune a model as the config says; writes checkpoints, metrics and the result to output_dir."""
    from sftlab.config import load_config

    cfg = load_config(config, overrides or [])  # checked once, before any process starts (and before torch is imported)
    _sources(cfg.dataset, cfg.dataset_dir)  # the data files exist, dataset_info.json names them: said before the slow imports
    from sftlab.train.checkpoint import find_checkpoint
    from sftlab.train.launch import launched, run_launcher, torchrun_command
    from sftlab.train.run import run_training
    from sftlab.train.zero import check_deepspeed

    check_deepspeed(cfg)
    # DeepSpeed and FSDP always run under a launcher (they need the process group, even for one process)
    if ((nproc > 1 or nnodes > 1) and not launched()) or ((cfg.deepspeed or cfg.fsdp) and "LOCAL_RANK" not in os.environ):
        find_checkpoint(cfg, nproc * nnodes)  # what every rank would refuse, said once, before any process starts
        command = torchrun_command(str(config), overrides or [], nproc, nnodes, node_rank, master_addr, master_port)
        logging.getLogger("sftlab").info("launching %d process(es) on this node: %s", nproc, " ".join(command[1:]))
        raise typer.Exit(run_launcher(command))
    out = run_training(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # once, not per rank
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

    cfg = load_config(config, overrides or [])
    _sources(cfg.dataset, cfg.dataset_dir)  # a missing or unnamed data file is said before torch and the tokenizer load
    from sftlab.data.pipeline import preview_rows
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
def _progress(total: int, what: str, counter):
    """A progress bar to ``total`` (``counter``: rich's column that shows the count); yields the callback that
    advances it. Drawn on stderr, only on a terminal and when there is something to count (piped output stays clean)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(f"[bold]{what}", BarColumn(), counter, TimeRemainingColumn(), console=console,
                  disable=not (console.is_terminal and total), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _byte_progress(sources, what: str):
    """A progress bar over the bytes of ``sources``; yields the ``on_bytes`` callback for iter_rows."""
    from rich.progress import DownloadColumn

    from sftlab.data.rows import total_bytes

    return _progress(sum(total_bytes(s) for s in sources), what, DownloadColumn())


def _count_progress(total: int, what: str):
    """A progress bar over ``total`` samples; yields the callback that counts finished ones."""
    from rich.progress import MofNCompleteColumn

    return _progress(total, what, MofNCompleteColumn())

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


# ---------------------------------------------------------------- after training: eval, compare, chat, predict, export

_MODEL_HELP = "Model directory, .gguf, Hub id, or a training output_dir (a LoRA output_dir brings its base model)."
_ADAPTER_HELP = "A LoRA adapter directory to load on top of the model (its saved chat template is used)."


def _inference_config(config: Optional[Path], args: Optional[list[str]], model: Optional[str], **values):
    """(config, Trained): from a training config (its trained result, or --model/--adapter instead) or from --model."""
    from sftlab.config import load_config
    from sftlab.model.load import locate_trained, trained_from_config

    overrides = list(args or [])
    if bad := [a for a in overrides if "=" not in a]:
        raise SftlabError(f"extra argument '{bad[0]}': arguments after the config are key=value overrides")
    adapter, template = values.pop("adapter", None), values.pop("template", None)
    given = {k: v for k, v in values.items() if v is not None}
    if config is None:
        if model is None:
            raise SftlabError("give a training config, or the model with --model (and --adapter)")
        cfg = load_config(None, overrides, model_name_or_path=model, dataset=given.pop("dataset", None) or ["-"], **given)
        return cfg, locate_trained(model, adapter, template)
    cfg = load_config(config, overrides, **given)
    if model is not None or adapter is not None:
        return cfg, locate_trained(model or cfg.model_name_or_path, adapter, template or cfg.template)
    return cfg, trained_from_config(cfg)


def _load(trained, cfg):
    import torch

    from sftlab.model.load import load_for_inference

    logging.getLogger("sftlab").info("loading %s", trained.describe())
    return load_for_inference(trained, "cuda" if torch.cuda.is_available() else "cpu", trust_remote_code=cfg.trust_remote_code)


@app.command("eval")
def eval_command(
    config: Optional[Path] = typer.Argument(None, help="A training config: its trained model, template and validation split."),
    args: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides of the config."),
    model: Optional[str] = typer.Option(None, "--model", help=_MODEL_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=_ADAPTER_HELP),
    template: Optional[str] = typer.Option(None, "--template", help="Built-in chat template replacing the tokenizer's own."),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="Dataset names or files (default: the config's validation split)."),
    dataset_dir: Optional[str] = typer.Option(None, "--dataset-dir", help=_DATA_DIR_HELP),
    generate_: Optional[bool] = typer.Option(None, "--generate/--no-generate", help="Generate answers and score them (default: the config's predict_with_generate)."),
    scorers: Optional[list[str]] = typer.Option(None, "--scorer", help="Extra task scorer: json_valid, json_fields, regex:PATTERN, module:function (repeatable)."),
    baseline: bool = typer.Option(False, "--baseline", help="Also evaluate the base model and compare before → after."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Evaluate at most this many samples of each dataset."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Samples per batch (default: per_device_eval_batch_size)."),
    latency: bool = typer.Option(False, "--latency", help="Also measure first-token time and per-token time (time = k·x + b)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder for eval_results.json and generated_predictions.jsonl (default: OUTPUT_DIR/eval, or eval_results)."),
) -> None:
    """Loss and perplexity on answer tokens; with --generate, BLEU-4, chrF, ROUGE, exact match and task scores."""
    from sftlab.evaluate.run import evaluate, measure_latency, samples_from_datasets, samples_from_refs
    from sftlab.infer.generate import prompt_ids
    from sftlab.model.load import trained_from_config

    values = dict(dataset=dataset, dataset_dir=dataset_dir, predict_with_generate=generate_, eval_scorers=scorers,
                  per_device_eval_batch_size=batch_size, adapter=adapter, template=template)
    cfg, trained = _inference_config(config, args, model, **values)
    out = output or (Path(cfg.output_dir) / "eval" if config else Path("eval_results"))
    if config is not None and not dataset:
        if cfg.val_size <= 0:
            raise SftlabError(f"{config}: no validation split (val_size: 0); give --dataset to evaluate on")
        from sftlab.data.pipeline import build_data

        from sftlab.model.load import inference_tokenizer

        refs = build_data(cfg, inference_tokenizer(trained, cfg.trust_remote_code)).eval_refs
        samples, names = samples_from_refs(cfg.dataset, cfg.dataset_dir, refs), [f"{', '.join(cfg.dataset)} (validation split)"]
    else:
        samples, names = samples_from_datasets(cfg.dataset, cfg.dataset_dir, max_samples), list(cfg.dataset)
    runs = [("tuned", trained, out)]
    if baseline:
        base = trained_from_config(cfg, tuned=False) if config else replace(trained, adapter_dir=None, tokenizer_dir=trained.model_dir)
        runs.insert(0, ("base", base, out.with_name(out.name + "_baseline")))
    for which, what, where in runs:
        model_obj, tokenizer = _load(what, cfg)
        with _count_progress(len(samples) if cfg.predict_with_generate else 0, f"Generating ({which})") as on_batch:
            results, predictions = evaluate(model_obj, tokenizer, samples, cfg, model_name=str(what.model_dir),
                                            adapter=str(what.adapter_dir) if what.adapter_dir else None, datasets=names,
                                            with_generation=cfg.predict_with_generate, scorers=cfg.eval_scorers,
                                            batch_size=cfg.per_device_eval_batch_size, on_batch=on_batch)
        if latency:
            from sftlab.evaluate.run import questions

            asked, _ = questions(samples[:1], cfg.default_system)
            results.latency = measure_latency(model_obj, tokenizer, prompt_ids(tokenizer, asked[0].messages))
        results.write(where, predictions or None)
        typer.echo(f"{which}: {what.describe()} → {where}")
        for name, value in results.metrics.items():
            typer.echo(f"  {name:12s} {value}")
        if results.latency:
            lat = results.latency
            typer.echo(f"  latency      first token {lat['first_token_s'] * 1000:.1f} ms, then {lat['per_token_s'] * 1000:.2f} ms/token "
                       f"({lat['tokens_per_s'] or 0:.1f} tokens/s), r² {lat['r2']:.3f}")
    if baseline:  # OUTPUT_DIR/eval → OUTPUT_DIR/compare, as training writes it; -o X → X_compare
        _compare(runs[0][2], runs[1][2], out.with_name("compare" if out.name == "eval" else f"{out.name}_compare"))


def _compare(base: Path, tuned: Path, stem: Path) -> None:
    from sftlab.evaluate.compare import compare
    from sftlab.evaluate.results import EvalResults, read_predictions
    from sftlab.report.compare_report import write_comparison

    comparison = compare(EvalResults.read(base), EvalResults.read(tuned), read_predictions(base, missing_ok=True),
                         read_predictions(tuned, missing_ok=True))
    files = write_comparison(comparison, stem)
    typer.echo(comparison.markdown().split("\n## ")[0].rstrip())
    typer.echo("\ncomparison: " + ", ".join(str(f) for f in files if f.suffix in (".md", ".html")))


@app.command("compare")
def compare_command(
    base: Path = typer.Argument(..., help="The base run: eval_results.json or its folder."),
    tuned: Path = typer.Argument(..., help="The tuned run: eval_results.json or its folder."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Stem of the .md and .html written (default: compare, beside TUNED)."),
) -> None:
    """Every metric before → after with its change, and the samples that changed most; Markdown and HTML."""
    tuned_dir = tuned if tuned.is_dir() else tuned.parent
    _compare(base, tuned, output or tuned_dir.parent / "compare")


@app.command("predict")
def predict_command(
    config: Optional[Path] = typer.Argument(None, help="A training config: its trained model and template."),
    args: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides of the config."),
    dataset: list[str] = typer.Option(..., "--dataset", help="Dataset names or files to answer."),
    output: Path = typer.Option(..., "-o", "--output", help="The JSONL written: ref, prompt, reference, prediction per sample."),
    model: Optional[str] = typer.Option(None, "--model", help=_MODEL_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=_ADAPTER_HELP),
    template: Optional[str] = typer.Option(None, "--template", help="Built-in chat template replacing the tokenizer's own."),
    dataset_dir: Optional[str] = typer.Option(None, "--dataset-dir", help=_DATA_DIR_HELP),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Answer at most this many samples of each dataset."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Samples per batch (default: per_device_eval_batch_size)."),
) -> None:
    """Generate an answer for every sample of a dataset (batched, with the trained template), into a JSONL file."""
    from sftlab.evaluate.results import Prediction, write_predictions
    from sftlab.evaluate.run import predict, questions, samples_from_datasets
    from sftlab.infer.generate import GenerationSettings

    cfg, trained = _inference_config(config, args, model, dataset=dataset, dataset_dir=dataset_dir,
                                     per_device_eval_batch_size=batch_size, adapter=adapter, template=template)
    asked, skipped = questions(samples_from_datasets(cfg.dataset, cfg.dataset_dir, max_samples), cfg.default_system)
    for ref, reason in skipped[:3]:
        typer.secho(f"{ref}: skipped ({reason})", fg="yellow", err=True)
    model_obj, tokenizer = _load(trained, cfg)
    kwargs = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
    with _count_progress(len(asked), "Generating") as on_batch:
        answers = predict(model_obj, tokenizer, asked, GenerationSettings.from_config(cfg), cfg.per_device_eval_batch_size, kwargs, on_batch)
    write_predictions(output, [Prediction(i, q.sample.ref, q.prompt_text, q.reference, a) for i, (q, a) in enumerate(zip(asked, answers))])
    typer.echo(f"{len(answers):,} predictions → {output}" + (f" ({len(skipped)} unreadable samples skipped)" if skipped else ""))


@app.command("chat")
def chat_command(
    config: Optional[Path] = typer.Argument(None, help="A training config: chat with its trained model and template."),
    args: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides of the config (e.g. temperature=0.7)."),
    model: Optional[str] = typer.Option(None, "--model", help=_MODEL_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=_ADAPTER_HELP),
    template: Optional[str] = typer.Option(None, "--template", help="Built-in chat template replacing the tokenizer's own."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (default: the config's default_system, else the template's)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="0 = greedy (default: the config's)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling with temperature > 0."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Longest answer in tokens."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="1.0 = off."),
) -> None:
    """Multi-turn chat in the terminal, streamed, with the template saved at training time. /clear, /system TEXT, /exit."""
    from sftlab.infer.chat import chat_loop
    from sftlab.infer.generate import GenerationSettings

    cfg, trained = _inference_config(config, args, model, adapter=adapter, template=template)
    settings = GenerationSettings.from_config(cfg, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                              repetition_penalty=repetition_penalty)
    model_obj, tokenizer = _load(trained, cfg)
    kwargs = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
    chat_loop(model_obj, tokenizer, settings, system if system is not None else cfg.default_system, sys.stdin, sys.stdout, kwargs)


@app.command("export")
def export_command(
    config: Optional[Path] = typer.Argument(None, help="A training config: merge its trained adapter (export_dir, export_size from it)."),
    args: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides of the config."),
    model: Optional[str] = typer.Option(None, "--model", help=_MODEL_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=_ADAPTER_HELP),
    export_dir: Optional[str] = typer.Option(None, "--export-dir", help="Where the merged model goes (default: the config's export_dir)."),
    export_size: Optional[float] = typer.Option(None, "--export-size", help="Largest safetensors shard in GB (default 5)."),
) -> None:
    """Merge LoRA into the base weights and save a plain Hugging Face model (safetensors, tokenizer, template, generation config)."""
    from sftlab.export.merge import export_model

    cfg, trained = _inference_config(config, args, model, adapter=adapter, export_dir=export_dir, export_size=export_size)
    if not cfg.export_dir:
        raise SftlabError("no export_dir: set it in the config or pass --export-dir")
    log = logging.getLogger("sftlab")
    result = export_model(trained, Path(cfg.export_dir), shard_gb=cfg.export_size, on_progress=log.info,
                          trust_remote_code=cfg.trust_remote_code)
    for line in result.lines():
        typer.echo(line)


@app.command("report")
def report_command(
    output_dir: Path = typer.Argument(..., help="A training run's output_dir (it holds metrics.jsonl)."),
    watch: bool = typer.Option(False, "--watch", help="Follow a running training: re-render the page (which then reloads itself) and a terminal view every --every seconds, until the run ends (or Ctrl-C)."),
    every: float = typer.Option(10.0, "--every", min=1.0, help="Seconds between renders with --watch."),
) -> None:
    """Loss curves (raw and smoothed, eval loss), token accuracy, lr, grad norm, speed, memory, diagnosis, before/after; HTML + PNGs."""
    import time

    from rich.console import Console
    from rich.live import Live

    from sftlab.report.diagnose import read_metrics
    from sftlab.report.live import status, status_view
    from sftlab.report.training_report import finished, write_training_report

    if not watch:
        files, findings = write_training_report(output_dir)
        typer.echo(f"report: {files[-1]}")
        for f in findings:
            typer.echo(f"{f.severity}: {f.title} — {f.evidence}. {f.advice}")
        return
    console = Console()
    metrics = output_dir / "metrics.jsonl"
    seen: object = ...  # nothing rendered yet
    with Live(console=console, auto_refresh=False, transient=False) if console.is_terminal else nullcontext() as live:
        while True:
            stamp = metrics.stat().st_mtime_ns if metrics.is_file() else None
            if stamp is None and seen is ...:
                typer.echo(f"waiting for {metrics} (the run has not started logging)…", err=True)
                seen = None
            elif stamp != seen:
                seen = stamp
                records = read_metrics(metrics)  # once: the page and the view show the same steps
                files, findings = write_training_report(output_dir, refresh=max(1, round(every)), records=records)
                if live is not None:
                    live.update(status_view(output_dir, records, findings), refresh=True)
                else:  # not a terminal (a log file, a pipe): one line per change
                    typer.echo(f"{time.strftime('%X')} {status(records)}"
                               + (f" | loss {records[-1]['loss']:.4f}" if records and records[-1].get("loss") is not None else "")
                               + "".join(f" | {f.severity}: {f.title}" for f in findings if f.severity != "info"))
                if finished(records):
                    break
            time.sleep(every)
    typer.echo(f"report: {files[-1]}")


_TARGET_HELP = dict(
    gpus="Devices the run is spread over (data parallel).",
    memory="Memory of each device, e.g. 80GB or 24G (GB = GiB). Given: a GPU; else the GPU here, or this CPU's free RAM.",
    device="gpu or cpu (default: gpu when --gpu-memory is given or a GPU is visible, else cpu).",
)


@app.command("estimate")
def estimate_command(
    config: Path = typer.Argument(..., help="A training config."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. per_device_train_batch_size=8"),
    gpus: int = typer.Option(1, "--gpus", min=1, help=_TARGET_HELP["gpus"]),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help=_TARGET_HELP["memory"]),
    device: Optional[str] = typer.Option(None, "--device", help=_TARGET_HELP["device"]),
    sharding: Optional[str] = typer.Option(None, "--sharding", help="none (DDP: each device holds everything), zero1, zero2, zero3 or fsdp (full shard); default: what the config sets (fsdp, or deepspeed's ZeRO stage)."),
    optim: str = typer.Option("adamw", "--optim", help="adamw (what sftlab trains with: 8 B per trained parameter) or adamw_8bit (2 B; to compare)."),
    no_flash_attn: bool = typer.Option(False, "--no-flash-attn", help="The GPU has no FlashAttention-2 (padded sdpa batches by default)."),
    tflops: Optional[float] = typer.Option(None, "--tflops", help="Peak TFLOP/s of one device (default: the config's peak_tflops, else H100; CPU: measured)."),
    mfu: Optional[float] = typer.Option(None, "--mfu", min=0.01, max=1.0, help="Share of the peak a training step reaches (default 0.4)."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="stats.json of `sftlab data stats`: samples, mean length and trained share for the time."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of the table."),
) -> None:
    """Memory per device (weights, gradients, optimizer, activations, logits, sharding), the batch that fits, and the time; no weights needed."""
    from sftlab.config import load_config
    from sftlab.plan.estimate import estimate_config, make_target

    cfg = load_config(config, overrides or [])
    if sharding is None:
        from sftlab.train.zero import read_deepspeed_config, zero_stage

        stage = zero_stage(read_deepspeed_config(cfg.deepspeed)) if cfg.deepspeed else 0
        sharding = "fsdp" if cfg.fsdp else f"zero{stage}" if stage else "none"
    target = make_target(device, gpus, gpu_memory, sharding, optim, not no_flash_attn, tflops, mfu)
    result = estimate_config(cfg, target, stats)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1))
        return
    typer.echo(f"{result.shape.name} ({result.shape.architecture}, {result.shape.params / 1e6:,.1f} M parameters; config from {result.source})")
    typer.echo(f"{result.method.describe}; micro-batch {cfg.per_device_train_batch_size} × {cfg.cutoff_len:,} tokens "
               f"(cutoff_len: the worst case), {'bf16' if cfg.bf16 else 'fp16' if cfg.fp16 else 'fp32'}, gradient checkpointing "
               f"{'on' if cfg.gradient_checkpointing else 'off'}; per device of {target.describe()}")
    _print_parts([(p.name, p.size, p.at_peak, p.how) for p in result.memory.parts], result.memory.total)
    for line in result.lines():
        typer.echo(line)
    if not result.fits:
        raise typer.Exit(1)


def _print_parts(rows: list[tuple[str, float, float, str]], total: float) -> None:
    """The memory table: a rich table on a terminal, plain lines when piped."""
    from rich.console import Console
    from rich.table import Table

    from sftlab.plan.estimate import GB

    console = Console()
    if console.is_terminal:
        table = Table("part", "size GB", "at peak GB", "how", show_footer=True)
        for name, size, at_peak, how in rows:
            table.add_row(name, f"{size / GB:.3f}", f"{at_peak / GB:.3f}", how)
        table.columns[0].footer, table.columns[2].footer = "total", f"{total / GB:.3f}"
        console.print(table)
        return
    for name, size, at_peak, how in rows:
        typer.echo(f"{name}: {size / GB:.3f} GB, {at_peak / GB:.3f} GB at the peak — {how}")
    typer.echo(f"total: {total / GB:.3f} GB")


@app.command("suggest")
def suggest_command(
    data: list[str] = typer.Argument(..., help="Dataset names (from dataset_info.json) or data files."),
    model: str = typer.Option(..., "--model", help="Model directory, .gguf or Hub id: its tokenizer measures the data, its config sizes the run."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help=_TARGET_HELP["memory"]),
    gpus: int = typer.Option(1, "--gpus", min=1, help=_TARGET_HELP["gpus"]),
    device: Optional[str] = typer.Option(None, "--device", help=_TARGET_HELP["device"]),
    template: Optional[str] = typer.Option(None, "--template", help="Built-in chat template replacing the tokenizer's own."),
    dataset_dir: str = typer.Option("data", "--dataset-dir", help=_DATA_DIR_HELP),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the config here (default: print it)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Encoding processes for the data statistics."),
    as_json: bool = typer.Option(False, "--json", help="The config, the reasons and the estimate as one JSON object."),
) -> None:
    """A full training config from the data's statistics and the model's size, with a reason for every choice."""
    from sftlab.config import load_config
    from sftlab.files import atomic_write
    from sftlab.plan.estimate import load_model_config, make_target, model_shape
    from sftlab.plan.suggest import measure, suggest

    base = load_config(None, [], model_name_or_path=model, dataset=data, template=template, dataset_dir=dataset_dir)
    target = make_target(device, gpus, gpu_memory)
    config, _ = load_model_config(model)
    shape = model_shape(config, model)
    with _byte_progress(_sources(base.dataset, base.dataset_dir), "Measuring") as on_bytes:
        stats = measure(base, workers, on_bytes)
    result = suggest(stats, shape, base, target)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
    text = result.yaml(str(output) if output else "config.yaml")
    if output is not None:
        atomic_write(output, text)
        if not as_json:
            typer.echo(text.rstrip())
            typer.echo(f"wrote {output}; check it with: sftlab estimate {output}")
    elif not as_json:
        typer.echo(text.rstrip())


@app.command("webui")
def webui_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but localhost needs --auth."),
    port: int = typer.Option(7860, "--port", help="Port to listen on."),
    auth: Optional[str] = typer.Option(None, "--auth", help="user:password the browser must give (required off localhost)."),
) -> None:
    """A browser UI (Gradio): look at data, fill a config, train (a detached sftlab train) with live curves, chat."""
    import importlib.util

    from sftlab.webui.app import check_bind, launch

    check_bind(host, auth)  # before the slow import of gradio
    if importlib.util.find_spec("gradio") is None:
        raise SftlabError("sftlab webui needs Gradio: pip install 'sftlab[webui]' (scripts/setup.sh installs it)")
    launch(host, port, auth)


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
