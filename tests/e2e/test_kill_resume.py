"""kill -9 at seeded random moments, resume, compare with an uninterrupted run.

A tiny LoRA run (12 steps, a checkpoint every step, so a kill often lands while one is written) is trained once
uninterrupted, in this process: the reference. Then `sftlab train` runs in a process group of its own and the whole
group gets SIGKILL at moments drawn from ``random.Random(SEED + nproc)`` (the same in every CI run): once the launch
has logged ``randint(1, 4)`` steps past the checkpoint it started from, after ``uniform(0, 0.3)`` s more. It is
resumed with ``resume_from_checkpoint=true`` and killed again:

- one process: 2 kills, then a resume that runs to the end;
- two processes (``--nproc 2``, DDP over gloo): 1 kill, then a resume that runs to the end; after each kill no process
  under the launch survives (the CLI, torchrun, and the ranks, which torchrun starts in sessions of their own).

Every launch starts without a traceback, and a resume starts from the newest checkpoint-N that was there when it was
launched (a kill never leaves a damaged checkpoint that resuming would pick or skip). A kill before the first
checkpoint leaves nothing to resume from: ``resume_from_checkpoint: true`` is then a one-line "has no checkpoint"
error, and the harness starts over with ``overwrite_output_dir=true`` (without it the CLI refuses a folder that
"already holds a run"). Compared with the reference: metrics.jsonl's steps (each once: a resumed run drops the
records after its checkpoint), their loss, lr, grad_norm, token_accuracy and tokens, and the final adapter's tensors;
the one-process run exactly, the two-process one (batch 1 × 2 processes against 1 × 2 micro-batches) to
test_distributed.py's tolerances. ``pytest -s`` prints each launch: the moment of its kill, the step it reached, the
half-written checkpoint it left, and how long it ran.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_tiny, write_config

SEED = 24
# a kill: once the launch has logged STEPS steps past its checkpoint, after DELAY seconds more; a step with its
# checkpoint takes ~0.1-0.3 s here, so the kills land in a step, in a checkpoint's writing, or in the final save
STEPS, DELAY = (1, 4), (0.0, 0.3)
# batch 1 × 2 micro-batches: the same global batch as 2 processes × batch 1, so one reference serves both tests
COMMON = dict(max_steps=12, save_steps=1, logging_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=2,
              learning_rate=1e-3, lora_rank=4, cutoff_len=64, seed=7, plot_loss=False)
KEYS = ("loss", "lr", "grad_norm", "token_accuracy", "tokens")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def base(tiny_model_dir, alpaca_rows_file):
    return dict(model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_rows_file), **COMMON)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base, one_thread) -> Path:
    """The uninterrupted run's output_dir."""
    root = tmp_path_factory.mktemp("reference")
    return Path(train_tiny(root / "cfg", output_dir=str(root / "run"), **base).output_dir)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _newest_checkpoint(out: Path) -> int:
    """The step of the newest complete-looking checkpoint-N in ``out`` (0: none)."""
    steps = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()] if out.is_dir() else []
    return max(steps, default=0)


def _processes() -> dict[int, tuple[int, str, str]]:
    """Every process: pid -> (parent pid, state, name), from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # ended while we looked
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        found[int(stat.parent.name)] = (int(rest[1]), rest[0], name)
    return found


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (torchrun's ranks run in sessions of their own, so not in its group)."""
    procs, tree = _processes(), [pid]
    for p in tree:
        tree += [c for c, (parent, _, _) in procs.items() if parent == p]
    return tree


def _launch(cfg: Path, log: Path, overrides: list[str], nproc: int, port: int) -> tuple[subprocess.Popen, object]:
    cmd = [sys.executable, "-m", "sftlab.cli", "train", str(cfg), *overrides]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--master-port", str(port)]
    err = open(log, "w+")  # a file, not a pipe: nothing blocks on a full pipe while the test polls
    return subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=ENV), err


def _logged(proc: subprocess.Popen, out: Path, before: str, step: int, timeout: float = 300) -> bool:
    """Wait until this launch has logged ``step`` (a record of it in metrics.jsonl that the file did not hold at launch);
    False if the process ended first."""
    deadline = time.monotonic() + timeout
    path = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            lines = path.read_text().splitlines()
        except OSError:
            lines = []
        if any(line.endswith("}") and line not in before and json.loads(line)["step"] >= step for line in lines[-3:]):
            return True
        time.sleep(0.01)
    pytest.fail(f"step {step} not logged within {timeout} s")


def _sigkill_group(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the process group of ``proc``, as a scheduler or a test's timeout does; returns the processes under it
    just before. Fails if any of them survives (zombies, dead but not yet reaped, count as ended)."""
    members = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 3  # the kernel ends them at once; a rank left running would train on
    while time.monotonic() < deadline:
        procs = _processes()
        left = [f"{p} {procs[p][2]}" for p in members if p in procs and procs[p][1] != "Z"]
        if not left:
            break
        time.sleep(0.05)
    assert not left, f"processes of the killed run survive the SIGKILL of its group: {left}"
    return members


def _moments(kills: int, nproc: int) -> list[tuple[int, float]]:
    """The seeded kill moments: (steps past the checkpoint the launch starts from, then seconds)."""
    rng = random.Random(SEED + nproc)
    return [(rng.randint(*STEPS), round(rng.uniform(*DELAY), 3)) for _ in range(kills)]


def _kill_and_resume(tmp_path: Path, base: dict, kills: int, nproc: int = 1, port: int = 0) -> tuple[Path, list[dict]]:
    """Train ``base`` into tmp_path/run, killed at each of ``_moments(kills, nproc)`` and resumed, the last resume
    running to the end; returns the output_dir and what each launch did."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "config.yaml", output_dir=str(out), **base)
    history, launch = [], 0
    for moment in [*_moments(kills, nproc), None]:
        overrides = ["resume_from_checkpoint=true"] if launch else []
        while True:
            log = tmp_path / f"launch-{launch}.log"
            from_step = _newest_checkpoint(out)
            before = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").is_file() else ""
            started = time.monotonic()
            proc, err = _launch(cfg, log, overrides, nproc, port + launch)  # a fresh port: the killed store's may linger
            launch += 1
            try:
                if moment is None:
                    proc.wait(timeout=300)
                elif _logged(proc, out, before, target := min(from_step + moment[0], COMMON["max_steps"])):
                    time.sleep(moment[1])
                    members = _sigkill_group(proc)
                    logged = max(r["step"] for r in _records(out))
                    half = sorted(p.name for p in out.iterdir() if p.name.startswith((".checkpoint-", ".final")))
            finally:  # a launch that hangs or fails the test never outlives it
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                err.close()
            took = time.monotonic() - started
            text = log.read_text()
            assert "Traceback" not in text and "skipped:" not in text, text[-4000:]
            errors = [line for line in text.splitlines() if line.startswith("error:")]
            if proc.returncode != 0 and errors and "has no checkpoint" in errors[0]:  # killed before checkpoint-1 was written
                assert proc.returncode == 2 and len(errors) == 1, text[-3000:]
                history.append(dict(launch=launch, refused=errors[0]))
                print(f"  launch {launch}: {errors[0]}")
                overrides = ["overwrite_output_dir=true"]  # start over; without it: "already holds a run"
                continue
            break
        start = "fresh"
        if overrides and overrides[0].startswith("resume"):  # the newest checkpoint when it started (rich wraps the log line)
            resumed = re.search(r"resumedfrom\S*?/checkpoint-(\d+)atstep(\d+)", "".join(text.split()))
            assert resumed and resumed.groups() == (str(from_step), str(from_step)), text[-3000:]
            start = f"resumed from checkpoint-{from_step}"
        if moment is None:
            assert proc.returncode == 0, text[-3000:]
            history.append(dict(launch=launch, from_step=from_step, finished=True, seconds=took))
            print(f"  launch {launch}: {start}, ran to the end ({took:.1f} s)")
        else:
            assert proc.returncode == -signal.SIGKILL, f"the run ended ({proc.returncode}) before its kill:\n{text[-3000:]}"
            history.append(dict(launch=launch, from_step=from_step, moment=moment, logged=logged, checkpoint=_newest_checkpoint(out),
                                half_written=half, processes=len(members), seconds=took))
            print(f"  launch {launch}: {start}; SIGKILL {moment[1]:.3f} s after step {target} was logged, "
                  f"at step {logged} (checkpoint-{_newest_checkpoint(out)} the newest; half-written: {', '.join(half) or 'none'}; "
                  f"{len(members)} process(es) killed; {took:.1f} s)")
    return out, history


def _same_run(reference: Path, out: Path, exact: bool) -> None:
    ref, got = _records(reference), _records(out)
    # each step once: resuming from checkpoint-N drops metrics.jsonl's records after step N, so nothing repeats
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, COMMON["max_steps"] + 1))
    for a, b in zip(ref, got):
        for key in KEYS:
            assert key in a and key in b, (a["step"], key)
            if exact:
                assert b[key] == a[key], (a["step"], key, a[key], b[key])
            else:  # test_distributed.py's tolerance for 2 processes against one
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    wa, wb = load_file(reference / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)


def test_kill_9_twice_then_resume_gives_the_uninterrupted_run(tmp_path, base, reference):
    print()
    out, history = _kill_and_resume(tmp_path, base, kills=2)
    assert sum("moment" in h for h in history) == 2 and history[-1].get("finished")
    _same_run(reference, out, exact=True)


def test_kill_9_of_two_processes_leaves_no_rank_and_resumes_to_the_same_run(tmp_path, base, reference):
    print()
    out, history = _kill_and_resume(tmp_path, base | dict(gradient_accumulation_steps=1), kills=1, nproc=2,
                                    port=20000 + os.getpid() % 1000 * 4)  # test_distributed.py: 29500 + ...
    kills = [h for h in history if "moment" in h]
    assert len(kills) == 1 and history[-1].get("finished")
    assert all(h["processes"] >= 4 for h in kills), history  # the CLI, torchrun and both ranks were running when it hit
    _same_run(reference, out, exact=False)
