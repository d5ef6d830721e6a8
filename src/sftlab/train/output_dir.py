"""What ``output_dir`` may be, and who writes it: one run at a time, never over a user's files or the run's inputs.

A run writes into output_dir only when it is absent, empty, or a sftlab run (``is_run``); its main process holds
``output_dir/.sftlab.lock`` (flock) from the start to the end, and the file, left behind, marks the folder as a run.
Light on imports: the CLI and the web UI check a directory here before anything slow loads.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from sftlab.config import SFTConfig
from sftlab.data.sources import resolve_sources, saved_tokenized
from sftlab.errors import SftlabError
from sftlab.evaluate.workflow import data_to_read

log = logging.getLogger(__name__)

LOCK_FILE = ".sftlab.lock"
TRASH_PREFIX = ".sftlab-trash-"
_CHECKPOINT = re.compile(r"checkpoint-\d+")
RESULT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
# beside config.yaml, what runs written before the lock file existed leave (trained, predicted or evaluated)
_RUN_OUTPUTS = {*RESULT_FILES, "adapter_config.json", "generated_predictions.jsonl", "predict_results.json", "eval", "eval_baseline"}
_LOADABLE = ("adapter_config.json", "config.json")  # without these nothing in the folder loads as a model or adapter


def is_run(out: Path) -> bool:
    """Whether the folder ``out`` holds what a sftlab run writes: the lock file (every run writes it first),
    metrics.jsonl, a checkpoint-N folder, or config.yaml beside a model, adapter, predictions or evaluation."""
    names = {p.name for p in out.iterdir()}
    if LOCK_FILE in names or "metrics.jsonl" in names or any(_CHECKPOINT.fullmatch(n) and (out / n).is_dir() for n in names):
        return True
    return "config.yaml" in names and bool(names & _RUN_OUTPUTS)


def holds_result(out: Path) -> bool:
    """Whether the run in ``out`` got somewhere: a checkpoint, a final model or adapter, or logged steps."""
    if not out.is_dir():
        return False
    metrics = out / "metrics.jsonl"
    return (any(_CHECKPOINT.fullmatch(p.name) and p.is_dir() for p in out.iterdir())
            or any((out / f).is_file() for f in RESULT_FILES) or (metrics.is_file() and metrics.stat().st_size > 0))


def run_inputs(cfg: SFTConfig, config: Path | None = None) -> dict[Path, str]:
    """The files and folders the run reads (path → what it is): the config file, the data files, the model,
    adapters, DeepSpeed config and saved tokenized sets given as local paths."""
    inputs: dict[Path, str] = {Path(config): "config file"} if config is not None else {}
    try:  # a dataset that does not resolve is build_data's error to report, with its own message
        for names in data_to_read(cfg):
            for source in resolve_sources(names, cfg.dataset_dir):
                inputs.update({f: "dataset file" for f in source.files})
        if (saved := saved_tokenized(cfg.tokenized_path)) is not None:
            inputs[saved] = "tokenized_path"
    except SftlabError:
        pass
    if (info := Path(cfg.dataset_dir) / "dataset_info.json").is_file():
        inputs[info] = "dataset_info.json"
    for adapter in (cfg.adapter_name_or_path or "").split(","):
        if adapter.strip():
            inputs[Path(adapter.strip()).expanduser()] = "adapter directory"
    if cfg.deepspeed:
        inputs[Path(cfg.deepspeed)] = "DeepSpeed config"
    inputs[Path(cfg.model_name_or_path).expanduser()] = "model directory"  # a Hub id is no local path: skipped below
    return {path: what for path, what in inputs.items() if path.exists()}


def check_output_dir(cfg: SFTConfig, config: Path | None = None, create: bool = True) -> Path:
    """``output_dir``, created (``create``; else only checked: a folder that is not there yet is left so), once it is
    certain that training may write there; raises a one-line SftlabError when it is a file, contains one of the run's
    inputs, is a non-empty folder that is not a sftlab run (whatever overwrite_output_dir says), or cannot be written.
    ``config``: the config file the run was started with."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise SftlabError(f"output_dir {out} is a file, not a folder: set output_dir to a folder (a new one is created)")
    target = out.resolve()
    try:
        run = out.is_dir() and is_run(out)
        found = sorted(p.name for p in out.iterdir()) if out.is_dir() and not run else []
    except OSError as e:
        raise SftlabError(f"output_dir {out} cannot be read ({e.strerror}): choose a folder you can write to") from None
    for path, what in run_inputs(cfg, config).items():
        path = path.resolve()
        if run and what == "config file" and path == target / "config.yaml":
            continue  # the run's own record of its config, started again: rewritten with the same keys
        if path == target or path.is_relative_to(target):
            raise SftlabError(f"output_dir {out} {'is' if path == target else 'contains'} this run's {what} ({path}); training "
                              "writes there (and overwrite_output_dir would delete it): choose another output_dir")
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise SftlabError(f"output_dir {out} is a folder that holds other files ({shown}), not a sftlab run; training would write "
                          "over them and overwrite_output_dir never deletes a folder that is not a run: choose a new or empty output_dir")
    try:  # a real write: os.access does not know read-only mounts, ACLs or quotas
        if create:
            out.mkdir(parents=True, exist_ok=True)
        where = out
        while not where.exists():  # not created: the folder it would be created in
            where = where.parent
        fd, probe = tempfile.mkstemp(prefix=".sftlab-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SftlabError(f"output_dir {out} cannot be written ({e.strerror}: {e.filename or out}): choose a folder you can write to") from None
    return out


def clear_run(out: Path) -> None:
    """Remove every file of the previous run in ``out`` (all but the lock file, which the caller holds): moved into one
    hidden trash folder, which is then deleted. The files that make a model or adapter load move first, so a crash
    halfway never leaves a previous result that chat, eval or export would take for this run's."""
    trash = out / f"{TRASH_PREFIX}{os.getpid()}"
    trash.mkdir(exist_ok=True)
    entries = sorted((p for p in out.iterdir() if p.name not in (LOCK_FILE, trash.name)), key=lambda p: p.name not in _LOADABLE)
    for path in entries:
        os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)
    log.info("overwrite_output_dir: removed the previous run from %s (%d entries)", out, len(entries))


class RunLock:
    """``output_dir/.sftlab.lock``, held (``flock``, exclusive) by a run's main process while the run lasts; the file
    says who holds it (JSON: pid, host, started, command). The kernel releases the flock when the process ends, so a
    file left by a dead run is simply taken over. A context manager: leaving it releases the lock (if held)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise SftlabError naming who holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SftlabError(f"output_dir {self.path.parent} cannot be written ({e.strerror}: {self.path}): choose a folder "
                              "you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SftlabError(busy_message(self.path.parent)) from None
        except OSError as e:  # a filesystem without locks (some network mounts): run, but say it is unguarded
            log.warning("output_dir %s cannot be locked (%s): nothing stops a second run from writing there", self.path.parent, e.strerror)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": _command()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the flock goes with the last descriptor; the file stays, marking the folder as a run
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(out: Path) -> None:
    """Raise SftlabError (naming the holder) when a run holds ``out``'s lock now; takes nothing and creates nothing."""
    try:
        fd = os.open(Path(out) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no run has started there
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SftlabError(busy_message(Path(out))) from None
    except OSError:
        pass
    finally:
        os.close(fd)  # releases it again when it was free


def busy_message(out: Path) -> str:
    try:
        info = json.loads((out / LOCK_FILE).read_text(encoding="utf-8"))
        who = f"pid {info['pid']} on {info['host']}, since {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):  # taken a moment ago, not written yet
        who = "a process that has not written its pid yet"
    return (f"output_dir {out} is in use by a run that is still going ({who}); a second run, or overwrite_output_dir, "
            "cannot write there until it ends: wait, stop it, or choose another output_dir")


def _command() -> str:
    """This process's command line, as the user would type it when it is the sftlab CLI."""
    argv = sys.argv
    if argv and Path(argv[0]).name in ("sftlab", "__main__.py"):
        return shlex.join(["sftlab", *argv[1:]])
    return shlex.join([Path(sys.executable).name, *argv])
