"""After training: ``sftlab eval``, ``compare``, ``predict``, ``chat`` and ``export`` over a trained model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from sftlab.cli.common import ADAPTER_HELP, DATA_DIR_HELP, MODEL_HELP, TEMPLATE_HELP, count_progress, inference_config
from sftlab.errors import SftlabError


def eval_command(
    config: Optional[Path] = typer.Argument(None, help="A training config: its trained model, template and validation split."),
    args: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides of the config."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    template: Optional[str] = typer.Option(None, "--template", help=TEMPLATE_HELP),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="Dataset names or files (default: the config's validation split)."),
    dataset_dir: Optional[str] = typer.Option(None, "--dataset-dir", help=DATA_DIR_HELP),
    generate_: Optional[bool] = typer.Option(None, "--generate/--no-generate", help="Generate answers and score them (default: the config's predict_with_generate)."),
    scorers: Optional[list[str]] = typer.Option(None, "--scorer", help="Extra task scorer: json_valid, json_fields, regex:PATTERN, module:function (repeatable)."),
    baseline: bool = typer.Option(False, "--baseline", help="Also evaluate the base model and compare before → after."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Evaluate at most this many samples of each dataset (default: the config's max_samples)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Samples per batch (default: per_device_eval_batch_size)."),
    latency: bool = typer.Option(False, "--latency", help="Also measure first-token time and per-token time (time = k·x + b)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder for eval_results.json and generated_predictions.jsonl (default: OUTPUT_DIR/eval, or eval_results)."),
) -> None:
    """Loss and perplexity on answer tokens; with --generate, BLEU-4, chrF, ROUGE, exact match and task scores."""
    values = dict(dataset=dataset, dataset_dir=dataset_dir, predict_with_generate=generate_, eval_scorers=scorers,
                  per_device_eval_batch_size=batch_size, adapter=adapter, template=template)
    cfg, trained = inference_config(config, args, model, **values)
    validation = config is not None and not dataset
    if validation and cfg.val_size <= 0 and not cfg.eval_dataset:
        raise SftlabError(f"{config}: no evaluation set (val_size: 0 and no eval_dataset); give --dataset to evaluate on")
    from sftlab.evaluate.runs import evaluate_runs

    out = output or (Path(cfg.output_dir) / "eval" if config else Path("eval_results"))
    compared = evaluate_runs(cfg, trained, out, from_config=config is not None, validation=validation, baseline=baseline,
                             latency=latency, max_samples=max_samples, progress=count_progress, on_run=_print_run)
    if compared is not None:
        _print_comparison(*compared)


def _print_run(run) -> None:
    """One evaluated model: what, where, its metrics (and latency)."""
    typer.echo(f"{run.which}: {run.trained.describe()} → {run.out_dir}")
    for name, value in run.results.metrics.items():
        typer.echo(f"  {name:12s} {value}")
    if lat := run.results.latency:
        typer.echo(f"  latency      first token {lat['first_token_s'] * 1000:.1f} ms, then {lat['per_token_s'] * 1000:.2f} ms/token "
                   f"({lat['tokens_per_s'] or 0:.1f} tokens/s), r² {lat['r2']:.3f}")


def _print_comparison(comparison, files: list[Path]) -> None:
    typer.echo(comparison.markdown().split("\n## ")[0].rstrip())
    typer.echo("\ncomparison: " + ", ".join(str(f) for f in files if f.suffix in (".md", ".html")))


def compare_command(
    base: Path = typer.Argument(..., help="The base run: eval_results.json or its folder."),
    tuned: Path = typer.Argument(..., help="The tuned run: eval_results.json or its folder."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Stem of the .md and .html written (default: compare, beside TUNED)."),
) -> None:
    """Every metric before → after with its change, and the samples that changed most; Markdown and HTML."""
    from sftlab.evaluate.comparison import compare_dirs

    tuned_dir = tuned if tuned.is_dir() else tuned.parent
    _print_comparison(*compare_dirs(base, tuned, output or tuned_dir.parent / "compare"))


def predict_command(
    config: Optional[Path] = typer.Argument(None, help="A training config: its trained model and template."),
    args: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides of the config."),
    dataset: list[str] = typer.Option(..., "--dataset", help="Dataset names or files to answer."),
    output: Path = typer.Option(..., "-o", "--output", help="The JSONL written: ref, prompt, reference, prediction per sample."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    template: Optional[str] = typer.Option(None, "--template", help=TEMPLATE_HELP),
    dataset_dir: Optional[str] = typer.Option(None, "--dataset-dir", help=DATA_DIR_HELP),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Answer at most this many samples of each dataset (default: the config's max_samples)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Samples per batch (default: per_device_eval_batch_size)."),
) -> None:
    """Generate an answer for every sample of a dataset (batched, with the trained template), into a JSONL file."""
    from sftlab.evaluate.results import Prediction, write_predictions
    from sftlab.evaluate.run import predict, questions, samples_from_datasets
    from sftlab.infer.generate import GenerationSettings, load_trained

    cfg, trained = inference_config(config, args, model, dataset=dataset, dataset_dir=dataset_dir,
                                    per_device_eval_batch_size=batch_size, adapter=adapter, template=template)
    asked, skipped = questions(samples_from_datasets(cfg.dataset, cfg.dataset_dir, max_samples or cfg.max_samples), cfg.default_system)
    for ref, reason in skipped[:3]:
        typer.secho(f"{ref}: skipped ({reason})", fg="yellow", err=True)
    model_obj, tokenizer = load_trained(trained, cfg.trust_remote_code)
    kwargs = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
    with count_progress(len(asked), "Generating") as on_batch:
        answers = predict(model_obj, tokenizer, asked, GenerationSettings.from_config(cfg), cfg.per_device_eval_batch_size, kwargs, on_batch)
    write_predictions(output, [Prediction(i, q.sample.ref, q.prompt_text, q.reference, a) for i, (q, a) in enumerate(zip(asked, answers))])
    typer.echo(f"{len(answers):,} predictions → {output}" + (f" ({len(skipped)} unreadable samples skipped)" if skipped else ""))


def chat_command(
    config: Optional[Path] = typer.Argument(None, help="A training config: chat with its trained model and template."),
    args: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides of the config (e.g. temperature=0.7)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    template: Optional[str] = typer.Option(None, "--template", help=TEMPLATE_HELP),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (default: the config's default_system, else the template's)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="0 = greedy (default: the config's)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling with temperature > 0."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Longest answer in tokens."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="1.0 = off."),
) -> None:
    """Multi-turn chat in the terminal, streamed, with the template saved at training time. /clear, /system TEXT, /exit."""
    from sftlab.infer.chat import chat_loop
    from sftlab.infer.generate import GenerationSettings, load_trained

    cfg, trained = inference_config(config, args, model, adapter=adapter, template=template)
    settings = GenerationSettings.from_config(cfg, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                              repetition_penalty=repetition_penalty)
    model_obj, tokenizer = load_trained(trained, cfg.trust_remote_code)
    kwargs = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
    chat_loop(model_obj, tokenizer, settings, system if system is not None else cfg.default_system, sys.stdin, sys.stdout, kwargs)


def export_command(
    config: Optional[Path] = typer.Argument(None, help="A training config: merge its trained adapter (export_dir, export_size from it)."),
    args: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides of the config."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    export_dir: Optional[str] = typer.Option(None, "--export-dir", help="Where the merged model goes (default: the config's export_dir)."),
    export_size: Optional[float] = typer.Option(None, "--export-size", help="Largest safetensors shard in GB (default 5)."),
    export_format: Optional[str] = typer.Option(None, "--format", help="hf (safetensors), or gguf: also model-<quant>.gguf and an Ollama Modelfile."),
    export_quant: Optional[str] = typer.Option(None, "--quant", help="GGUF type: f16, bf16, q8_0 (default); q4_k_m… with llama-cpp-python."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the parity gate (training's vs the export's tokens and greedy answers)."),
) -> None:
    """Merge LoRA into the base weights and save a plain Hugging Face model (safetensors, tokenizer, template, generation config),
    and with --format gguf a GGUF and an Ollama Modelfile beside it; checked by the parity gate (docs/gguf.md)."""
    cfg, trained = inference_config(config, args, model, adapter=adapter, export_dir=export_dir, export_size=export_size,
                                    export_format=export_format, export_quant=export_quant)
    if not cfg.export_dir:
        raise SftlabError("no export_dir: set it in the config or pass --export-dir")
    from sftlab.export.merge import export_model

    result = export_model(trained, Path(cfg.export_dir), shard_gb=cfg.export_size, on_progress=logging.getLogger("sftlab").info,
                          trust_remote_code=cfg.trust_remote_code, export_format=cfg.export_format, quant=cfg.export_quant,
                          verify=not no_verify)
    for line in result.lines():
        typer.echo(line)
