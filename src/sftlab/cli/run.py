"""``sftlab train``, ``report``, ``webui`` and ``config-docs``: run a training, follow or report it, or do it from a browser."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

from sftlab.cli.common import check_port, resolve
from sftlab.errors import SftlabError


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

    from sftlab.evaluate.workflow import check_steps, data_to_read

    cfg = load_config(config, overrides or [])  # checked once, before any process starts (and before torch is imported)
    check_steps(cfg)  # train / predict keys that cannot go together
    for names in data_to_read(cfg):  # the data files exist, dataset_info.json names them: said before the slow imports
        resolve(names, cfg.dataset_dir)
    if int(os.environ.get("RANK", "0")) == 0 and node_rank == 0:  # output_dir is held by the main process, not the other ranks
        from sftlab.train.output_dir import check_free, check_output_dir

        check_free(check_output_dir(cfg, config, create=False))  # a folder it may not write, or a run still going: said at once
    from sftlab.train.checkpoint import find_checkpoint
    from sftlab.train.deepspeed import check_deepspeed
    from sftlab.train.launch import launched, run_launcher, torchrun_command

    check_deepspeed(cfg)
    # DeepSpeed and FSDP always run under a launcher (they need the process group, even for one process)
    if ((nproc > 1 or nnodes > 1) and not launched()) or ((cfg.deepspeed or cfg.fsdp) and "LOCAL_RANK" not in os.environ):
        find_checkpoint(cfg, nproc * nnodes)  # what every rank would refuse, said once, before any process starts
        command = torchrun_command(str(config), overrides or [], nproc, nnodes, node_rank, master_addr, master_port)
        logging.getLogger("sftlab").info("launching %d process(es) on this node: %s", nproc, " ".join(command[1:]))
        raise typer.Exit(run_launcher(command))
    from sftlab.train.run import run_training  # transformers, peft, …: not in a process that only launches the ranks

    out = run_training(cfg, config)
    if int(os.environ.get("RANK", "0")) == 0:  # once, not per rank
        typer.echo(f"done: {out}")


def report_command(
    output_dir: Path = typer.Argument(..., help="A training run's output_dir (it holds metrics.jsonl)."),
    watch: bool = typer.Option(False, "--watch", help="Follow a running training: re-render the page (which then reloads itself) and a terminal view every --every seconds, until the run ends (or Ctrl-C)."),
    every: float = typer.Option(10.0, "--every", min=1.0, help="Seconds between renders with --watch."),
) -> None:
    """Loss curves (raw and smoothed, eval loss), token accuracy, lr, grad norm, speed, memory, diagnosis, before/after; HTML + PNGs."""
    if watch:
        _watch(output_dir, every)
        return
    from sftlab.report.training_report import write_training_report

    files, findings = write_training_report(output_dir)
    typer.echo(f"report: {files[-1]}")
    for f in findings:
        typer.echo(f"{f.severity}: {f.title} — {f.evidence}. {f.advice}")


def _watch(output_dir: Path, every: float) -> None:
    """report --watch: a live view on a terminal; elsewhere (a log file, a pipe) one line per change."""
    import time
    from contextlib import nullcontext

    from rich.console import Console
    from rich.live import Live

    from sftlab.report.live import status, status_view, watch

    console = Console()
    with Live(console=console, auto_refresh=False, transient=False) if console.is_terminal else nullcontext() as live:
        def show(records: list[dict], findings: list) -> None:
            if live is not None:
                live.update(status_view(output_dir, records, findings), refresh=True)
                return
            typer.echo(f"{time.strftime('%X')} {status(records)}"
                       + (f" | loss {records[-1]['loss']:.4f}" if records and records[-1].get("loss") is not None else "")
                       + "".join(f" | {f.severity}: {f.title}" for f in findings if f.severity != "info"))

        files = watch(output_dir, every, show,
                      on_waiting=lambda metrics: typer.echo(f"waiting for {metrics} (the run has not started logging)…", err=True))
    typer.echo(f"report: {files[-1]}")


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
    check_port(host, port)
    launch(host, port, auth)


def config_docs(output: Path = typer.Option(Path("docs/config.md"), help="Where to write the reference.")) -> None:
    """Regenerate the config reference from the config declaration."""
    from sftlab.config import config_reference

    output.write_text(config_reference(), encoding="utf-8")
    typer.echo(f"wrote {output}")
