"""The ``sftlab`` command: thin verbs over the workflow functions."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
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
