"""``sftlab estimate`` and ``suggest``: what a run will need, and a config that fits the data and the hardware."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sftlab.cli.common import DATA_DIR_HELP, TEMPLATE_HELP, byte_progress, resolve

_TARGET_HELP = dict(
    gpus="Devices the run is spread over (data parallel).",
    memory="Memory of each device, e.g. 80GB or 24G (GB = GiB). Given: a GPU; else the GPU here, or this CPU's free RAM.",
    device="gpu or cpu (default: gpu when --gpu-memory is given or a GPU is visible, else cpu).",
)


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
        from sftlab.train.deepspeed import read_deepspeed_config, zero_stage

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


def suggest_command(
    data: list[str] = typer.Argument(..., help="Dataset names (from dataset_info.json) or data files."),
    model: str = typer.Option(..., "--model", help="Model directory, .gguf or Hub id: its tokenizer measures the data, its config sizes the run."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help=_TARGET_HELP["memory"]),
    gpus: int = typer.Option(1, "--gpus", min=1, help=_TARGET_HELP["gpus"]),
    device: Optional[str] = typer.Option(None, "--device", help=_TARGET_HELP["device"]),
    template: Optional[str] = typer.Option(None, "--template", help=TEMPLATE_HELP),
    dataset_dir: str = typer.Option("data", "--dataset-dir", help=DATA_DIR_HELP),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the config here (default: print it)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Encoding processes for the data statistics."),
    as_json: bool = typer.Option(False, "--json", help="The config, the reasons and the estimate as one JSON object."),
    force: bool = typer.Option(False, "--force", help="Replace the -o file if it exists."),
) -> None:
    """A full training config from the data's statistics and the model's size, with a reason for every choice."""
    from sftlab.config import load_config
    from sftlab.data.sources import source_files
    from sftlab.files import atomic_write, check_outputs

    base = load_config(None, [], model_name_or_path=model, dataset=data, template=template, dataset_dir=dataset_dir)
    sources = resolve(base.dataset, base.dataset_dir)
    if output is not None:
        check_outputs([output], source_files(sources), force)  # before torch imports and the model is read
    from sftlab.plan.estimate import load_model_config, make_target, model_shape
    from sftlab.plan.suggest import measure, suggest

    target = make_target(device, gpus, gpu_memory)
    config, _ = load_model_config(model)
    shape = model_shape(config, model)
    with byte_progress(sources, "Measuring") as on_bytes:
        stats = measure(base, workers, on_bytes)
    result = suggest(stats, shape, base, target)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
    text = result.yaml(str(output) if output else "config.yaml")
    if output is not None:
        atomic_write(output, text)
    if not as_json:
        typer.echo(text.rstrip())
        if output is not None:
            typer.echo(f"wrote {output}; check it with: sftlab estimate {output}")
