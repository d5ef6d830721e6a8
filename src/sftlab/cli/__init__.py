"""The ``sftlab`` command: thin verbs over the workflow functions, one module per family (data, run, infer, plan, serve).

Each verb imports what it runs inside itself, so a bad argument or config is reported before torch and
transformers are imported.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

from sftlab.cli import data, infer, plan, run, serve
from sftlab.errors import SftlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Supervised fine-tuning of LLMs, correct by construction.")
data_app = typer.Typer(no_args_is_help=True, help="Look at data as training will see it.")
app.add_typer(data_app, name="data")

# The verbs, in the order --help lists them.
app.command("train")(run.train)
app.command("eval")(infer.eval_command)
app.command("compare")(infer.compare_command)
app.command("predict")(infer.predict_command)
app.command("chat")(infer.chat_command)
app.command("export")(infer.export_command)
app.command("serve")(serve.serve_command)
app.command("api", help="Alias of serve (LLaMA-Factory's verb).")(serve.serve_command)
app.command("report")(run.report_command)
app.command("estimate")(plan.estimate_command)
app.command("suggest")(plan.suggest_command)
app.command("webui")(run.webui_command)
app.command("config-docs")(run.config_docs)
data_app.command("preview")(data.data_preview)
data_app.command("check")(data.data_check)
data_app.command("stats")(data.data_stats)
data_app.command("dedup")(data.data_dedup)
data_app.command("split")(data.data_split)
data_app.command("convert")(data.data_convert)
data_app.command("sample")(data.data_sample)


@app.callback()
def _main(ctx: typer.Context, debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    if isinstance(ctx.obj, dict):  # main()'s: it re-raises a failure with its traceback under --debug
        ctx.obj["debug"] = debug
    _setup_logging()


def _setup_logging() -> None:
    from rich.console import Console
    from rich.logging import RichHandler

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


def main() -> None:
    """The console entry point: a failure is one ``error:`` line and its exit code (the traceback with --debug)."""
    import click

    options = {"debug": False}  # set by _main once the command line is parsed
    try:
        code = app(standalone_mode=False, obj=options, prog_name="sftlab")  # also under python -m sftlab.cli
    except SftlabError as e:
        if options["debug"]:
            raise
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(e.exit_code)
    except (typer.Abort, click.exceptions.Abort, KeyboardInterrupt):  # a second Ctrl-C while a checkpoint was pending
        typer.secho("error: interrupted", fg="red", err=True)
        sys.exit(130)
    except (typer.TyperException, click.ClickException) as e:  # typer >= 0.22 raises its own vendored click's errors
        if getattr(e, "ctx", None) is not None and type(e).__name__ == "NoArgsIsHelpError":  # `sftlab`, `sftlab data`
            typer.echo(e.ctx.get_help())
            sys.exit(0)
        if options["debug"]:
            raise
        typer.secho(f"error: {usage_error(e, sys.argv[1:])}", fg="red", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code or 0)


def usage_error(e: Exception, argv: list[str]) -> str:
    """A command-line mistake as one line: click's message (with its "did you mean"), where to read the usage, and, for
    ``--key=value`` after a verb that takes ``key=value`` overrides, how an override is written."""
    message = " ".join(e.format_message().split())  # one line
    message = message[:1].lower() + message[1:]
    ctx = getattr(e, "ctx", None)
    option = getattr(e, "option_name", None)
    if option and ctx is not None and any(getattr(p, "nargs", 1) == -1 for p in ctx.command.params):
        from sftlab.config import SFTConfig

        key = option.lstrip("-").replace("-", "_")
        if key in SFTConfig.model_fields:  # click's "possible options" would point away from the fix
            at = next((i for i, a in enumerate(argv) if a == option or a.startswith(option + "=")), None)
            value = argv[at].partition("=")[2] if at is not None else ""
            if not value and at is not None and at + 1 < len(argv) and not argv[at + 1].startswith("-"):
                value = argv[at + 1]
            return f"no such option: {option}; config overrides are written without dashes: {key}={value or 'VALUE'}"
    message = message.rstrip(".")
    return f"{message} (see: {ctx.command_path} --help)" if ctx is not None else message
