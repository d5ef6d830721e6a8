"""The processes the web UI starts: training as a detached ``sftlab train CONFIG`` (the UI never holds the training
model), its state in a small JSON file under ``$SFTLAB_CACHE/webui/jobs`` so a reopened page, or a restarted UI, finds
the job again; and other verbs (eval, export) as child processes whose output the UI shows as it grows."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from sftlab.config import SFTConfig, dump_config
from sftlab.errors import SftlabError
from sftlab.files import atomic_write
from sftlab.model.assets import cache_dir

LOG_TAIL_BYTES = 16_000


@dataclass
class Job:
    """A ``sftlab train`` process started from the UI, as its state file records it."""

    output_dir: str  # absolute
    config: str
    log: str
    pid: int
    command: list[str]
    started: float
    returncode: int | None = None

    @property
    def state_file(self) -> Path:
        return Path(self.config).parent / "job.json"

    def save(self) -> None:
        atomic_write(self.state_file, json.dumps(asdict(self), indent=1))


def jobs_dir() -> Path:
    return cache_dir() / "webui" / "jobs"


def job_dir(output_dir: str | Path) -> Path:
    """One folder per output_dir: the config the job ran, its log, job.json."""
    key = str(Path(output_dir).resolve())
    return jobs_dir() / (Path(key).name + "-" + hashlib.sha1(key.encode()).hexdigest()[:10])


def latest_job() -> Job | None:
    files = sorted(jobs_dir().glob("*/job.json"), key=lambda p: p.stat().st_mtime) if jobs_dir().is_dir() else []
    return Job(**json.loads(files[-1].read_text(encoding="utf-8"))) if files else None


def alive(pid: int) -> bool:
    """Whether ``pid`` is still a running sftlab process (not a zombie, not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (macOS): existence only
            return True
        except OSError:
            return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"sftlab" in cmdline


def start_job(cfg: SFTConfig, resume: bool = False) -> Job:
    """Start ``sftlab train`` on ``cfg`` in its own session (closing the browser or the UI does not stop it).

    Raises SftlabError when a job for the same output_dir is still running (started here, or anywhere: its lock is
    held), or training may not write into output_dir.
    """
    from sftlab.train.output_dir import check_free, check_output_dir

    folder = job_dir(cfg.output_dir)
    if (folder / "job.json").is_file():
        old = Job(**json.loads((folder / "job.json").read_text(encoding="utf-8")))
        if alive(old.pid):
            raise SftlabError(f"a run into {old.output_dir} is still going (pid {old.pid}); stop it first")
    check_free(check_output_dir(cfg, create=False))  # said on the page, not only in the log of a process that ends at once
    folder.mkdir(parents=True, exist_ok=True)
    config = atomic_write(folder / "config.yaml", dump_config(cfg))
    command = [sys.executable, "-m", "sftlab.cli", "train", str(config)] + (["resume_from_checkpoint=true"] if resume else [])
    log_path = folder / "train.log"
    with open(log_path, "ab") as log:
        log.write(f"$ sftlab train {config}{' resume_from_checkpoint=true' if resume else ''}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    job = Job(str(Path(cfg.output_dir).resolve()), str(config), str(log_path), proc.pid, command, time.time())
    job.save()

    def record_exit() -> None:  # while this UI runs, the exit code is known; after a restart it is inferred
        job.returncode = proc.wait()
        job.save()

    threading.Thread(target=record_exit, daemon=True).start()
    return job


def stop_job(job: Job) -> str:
    """SIGTERM: training saves a checkpoint after the current step and exits 130."""
    if not alive(job.pid):
        return "not running"
    os.kill(job.pid, signal.SIGTERM)
    return f"sent SIGTERM to {job.pid}: saving a checkpoint, then stopping"


def job_state(job: Job, records: list[dict]) -> str:
    from sftlab.report.training_report import finished

    if alive(job.pid):
        return "running"
    rc = job.returncode
    if rc is None:  # started by an earlier UI process
        return "finished" if finished(records) else "ended"
    return {0: "finished", 130: "stopped (resumable)"}.get(rc, f"failed (exit {rc})")


def log_tail(path: str | Path, size: int = LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def cli_run(verb: str, cfg: SFTConfig, args: list[str] = ()) -> Iterator[str]:
    """``sftlab VERB CONFIG ARGS`` in a child process (the model is loaded there, not in the UI): its output so far,
    growing line by line, then the exit code."""
    folder = job_dir(cfg.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config = atomic_write(folder / f"{verb}.yaml", dump_config(cfg))
    text = f"$ sftlab {verb} {config} {' '.join(args)}\n"
    yield text
    with subprocess.Popen([sys.executable, "-m", "sftlab.cli", verb, str(config), *args], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            text += line
            yield text
    yield text + f"exit code {proc.returncode}" + (" (done)" if proc.returncode == 0 else " (failed)")

