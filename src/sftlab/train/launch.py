"""Several processes: ``sftlab train --nproc N`` relaunches itself through torchrun; helpers the ranks share.

sftlab has no distributed system of its own: torchrun starts the processes, accelerate (PyTorch DDP,
FSDP, DeepSpeed) does the rest. A run launched by ``torchrun`` or ``accelerate launch`` directly is
recognised by the environment those launchers set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from sftlab.errors import SftlabError

# How long ranks wait (outside NCCL's own timeout) for the main process to prepare the data or run an
# evaluation on its own. Tokenizing millions of samples takes a while; a dead main process still ends
# the run, since torchrun stops every rank when one fails.
WAIT_FOR_MAIN = timedelta(hours=12)
LAUNCHER_PID = "SFTLAB_LAUNCHER_PID"  # set by ``torchrun`` below for the ranks it starts


def launched() -> bool:
    """Whether this process is one rank of a torchrun / accelerate launch."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_command(config: str, overrides: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str = "127.0.0.1", master_port: int = 29500) -> list[str]:
    """The torchrun command line that runs ``sftlab train config overrides`` on ``nproc`` processes per node."""
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise SftlabError(f"--nproc {nproc} --nnodes {nnodes} --node-rank {node_rank}: need nproc ≥ 1, nnodes ≥ 1 and 0 ≤ node-rank < nnodes")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise SftlabError(f"--nproc {nproc}, but this machine has {torch.cuda.device_count()} GPU(s): use one process per GPU")
    return [sys.executable, "-m", "sftlab.train.launch", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}",
            f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}",
            "-m", "sftlab.cli", "train", config, *overrides]


def torchrun(argv: list[str]) -> int:
    """torchrun with ``argv``; a failed rank ends it with that rank's exit code, a signal with 128 + its number.
    The ranks have already said what happened (sftlab's one-line error, or where the checkpoint is), so
    torchrun's own traceback of it is not printed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks inherit it: see die_with_launcher
    try:
        run(get_args_parser().parse_args(argv))
    except SignalException as e:  # passed on to the ranks, which checkpointed and said where
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"sftlab: rank {rank} failed (exit code {failure.exitcode}); its message is above", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def die_with_launcher() -> None:
    """In a rank that ``torchrun`` above started: have the kernel SIGKILL this process when that launcher dies, and
    die now if it already has. torchrun starts each rank in a session of its own, so a SIGKILL of the launch's process
    group (a scheduler, the OOM killer, a test's timeout) reaches the launcher only, and the ranks would train on,
    unseen, holding output_dir. Elsewhere (no launcher of ours is the parent; not Linux) it does nothing."""
    launcher = int(os.environ.get(LAUNCHER_PID, "0"))
    if not launcher or not sys.platform.startswith("linux"):
        return
    if os.getppid() == launcher:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        if os.getppid() == launcher:
            return
    try:  # not its child: a rank whose launcher has ended (then this one goes too), or a process a rank started
        os.kill(launcher, 0)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGKILL)


def run_launcher(command: list[str]) -> int:
    """Run torchrun and return its exit code. SIGINT/SIGTERM sent to this process are passed on (torchrun
    passes them to the ranks, which checkpoint and stop), so stopping sftlab never leaves ranks behind."""
    launcher = subprocess.Popen(command)
    forward = lambda signum, frame: launcher.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return launcher.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class WaitGroup:
    """A gloo process group with a long timeout, for waiting on the main process outside NCCL's timeout."""

    def __init__(self, num_processes: int):
        self.group = dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN) if num_processes > 1 and dist.is_initialized() else None

    def wait(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    @contextmanager
    def first(self, is_first: bool) -> Iterator[None]:
        """Run the body on the ``is_first`` process(es) first, then on the others (which then hit the cache)."""
        if not is_first:
            self.wait()
        yield
        if is_first:
            self.wait()


if __name__ == "__main__":  # what ``torchrun_command`` runs
    sys.exit(torchrun(sys.argv[1:]))
