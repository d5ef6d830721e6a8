"""``sftlab serve`` (alias ``sftlab api``): the OpenAI-compatible HTTP server over a trained model."""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
from pathlib import Path
from typing import Optional

import typer

from sftlab.cli.common import ADAPTER_HELP, MODEL_HELP, TEMPLATE_HELP, check_port, inference_config
from sftlab.errors import SftlabError


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_limits(**values: int | None) -> None:
    """Each option at least its least value (the port at most 65535); else one error line naming it."""
    least = {"port": 1, "max_batch": 1, "max_queue": 1, "context_length": 8}
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is not None and value < least[key]:
            raise SftlabError(f"{flag} {value}: must be at least {least[key]}")
    if values["port"] > 65535:
        raise SftlabError(f"--port {values['port']}: must be at most 65535")


def serve_command(
    config: Optional[Path] = typer.Argument(None, help="A training config: serve its trained model with its template."),
    args: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides of the config (e.g. temperature=0.7)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    template: Optional[str] = typer.Option(None, "--template", help=TEMPLATE_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but localhost needs --api-key."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="API_KEY", help="Every request must send 'Authorization: Bearer KEY' (env API_KEY)."),
    name: Optional[str] = typer.Option(None, "--name", help="The model name clients ask for (default: the config's file name, else --model as given)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Most answers generated together in one decode loop."),
    max_queue: int = typer.Option(64, "--max-queue", help="Most answers waiting for a place in the batch; more are answered 429."),
    context_length: Optional[int] = typer.Option(None, "--context-length", help="Longest prompt + answer in tokens (default: the model's max_position_embeddings)."),
) -> None:
    """OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /health) with continuous batching."""
    _check_limits(port=port, max_batch=max_batch, max_queue=max_queue, context_length=context_length)
    if not _loopback(host) and not api_key:
        raise SftlabError(f"--host {host} is reachable from other machines: give --api-key KEY (or set API_KEY), or serve on 127.0.0.1")
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise SftlabError(f"sftlab serve needs {' and '.join(missing)}: pip install 'sftlab[serve]'")
    check_port(host, port)  # before the model loads
    cfg, trained = inference_config(config, args, model, adapter=adapter, template=template)
    from sftlab.infer.generate import GenerationSettings, load_trained
    from sftlab.serve.app import create_app, run, served_model

    model_obj, tokenizer = load_trained(trained, cfg.trust_remote_code)
    kwargs = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
    served = served_model(model_obj, tokenizer, GenerationSettings.from_config(cfg), name or (config.stem if config else model),
                          template_kwargs=kwargs, default_system=cfg.default_system, thinking=cfg.thinking, api_key=api_key,
                          max_batch=max_batch, max_queue=max_queue, context_length=context_length)
    log = logging.getLogger("sftlab")
    log.info("serving '%s' on http://%s:%d/v1 (%s)", served.name, host, port,
             "tools: " + (f"{served.tool_format.open}…{served.tool_format.close}" if served.tool_format else "not supported by the template"))
    run(create_app(served), host, port)
