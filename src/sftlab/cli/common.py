"""What several verbs share: progress bars, help texts, and reading a model and config from the command line.

Imports of torch, transformers and datasets stay inside the functions, so that a bad argument is reported at once.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from sftlab.errors import SftlabError

DATA_DIR_HELP = "Folder with dataset_info.json, for dataset names (paths work without it)."
MODEL_HELP = "Model directory, .gguf, Hub id, or a training output_dir (a LoRA output_dir brings its base model)."
ADAPTER_HELP = "A LoRA adapter directory to load on top of the model (its saved chat template is used)."
TEMPLATE_HELP = "Chat template: a LLaMA-Factory name means the tokenizer's own (else its built-in equivalent); builtin:NAME replaces the tokenizer's own."


@contextmanager
def progress(total: int, what: str, counter):
    """A progress bar to ``total`` (``counter``: rich's column that shows the count); yields the callback that
    advances it. Drawn on stderr, only on a terminal and when there is something to count (piped output stays clean)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(f"[bold]{what}", BarColumn(), counter, TimeRemainingColumn(), console=console,
                  disable=not (console.is_terminal and total), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def byte_progress(sources, what: str):
    """A progress bar over the bytes of ``sources``; yields the ``on_bytes`` callback for iter_rows."""
    from rich.progress import DownloadColumn

    from sftlab.data.rows import total_bytes

    return progress(sum(total_bytes(s) for s in sources), what, DownloadColumn())


def count_progress(total: int, what: str):
    """A progress bar over ``total`` samples; yields the callback that counts finished ones."""
    from rich.progress import MofNCompleteColumn

    return progress(total, what, MofNCompleteColumn())


def resolve(data: list[str], dataset_dir: str):
    """Dataset names (from dataset_info.json in ``dataset_dir``) or file/folder paths → sources, as training reads them."""
    from sftlab.data.sources import resolve_sources

    return resolve_sources(data, dataset_dir)


def inference_config(config: Optional[Path], args: Optional[list[str]], model: Optional[str], **values):
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
        cfg = load_config(None, overrides, model_name_or_path=model, dataset=given.pop("dataset", None), **given)
        return cfg, locate_trained(model, adapter, template)
    cfg = load_config(config, overrides, **given)
    if model is not None or adapter is not None:
        return cfg, locate_trained(model or cfg.model_name_or_path, adapter, template or cfg.template)
    return cfg, trained_from_config(cfg)


def check_port(host: str, port: int) -> None:
    """Raises SftlabError (one line naming --host/--port) when this process could not listen on ``host``:``port``:
    a port out of range, in use, or not allowed. Checked by binding it, before a server's slow imports."""
    import errno
    import socket

    if not 1 <= port <= 65535:
        raise SftlabError(f"--port {port}: must be from 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise SftlabError(f"--host {host}: not an address ({e.strerror}); use 127.0.0.1 (this machine) or 0.0.0.0 (every interface)") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: a port in TIME_WAIT is free
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise SftlabError(f"--port {port}: {host}:{port} is already in use (another server?); stop it or choose "
                                  f"another port, e.g. --port {port + 1 if port < 65535 else 8000}") from None
            if e.errno == errno.EACCES:
                raise SftlabError(f"--port {port}: not allowed to listen on {host}:{port} (ports below 1024 need root); "
                                  "choose a port above 1023 with --port") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise SftlabError(f"--host {host}: not an address of this machine; use 127.0.0.1 or 0.0.0.0") from None
            raise SftlabError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); choose another --port") from None
