"""Facts about the device a run trains on: which precision it can compute in, and how much memory the run has used."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch

from sftlab.config import SFTConfig
from sftlab.errors import SftlabError

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 bf16 or AMX); elsewhere autocast would be slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def mixed_precision(cfg: SFTConfig) -> str:
    """'no', 'bf16' or 'fp16'; raises SftlabError where the hardware cannot do what the config asks.

    ``bf16: true`` on a CPU without native bf16 still runs (autocast emulates it, as the HF Trainer does), so a
    YAML written for a GPU runs unchanged on a laptop; one warning says that fp32 is faster there."""
    cuda = torch.cuda.is_available()
    if cfg.fp16 and not cuda:
        raise SftlabError("fp16: true needs a CUDA GPU and none is visible; set fp16: false (or bf16: true on a CPU with AVX-512 bf16)")
    if cfg.bf16:
        if cuda and not torch.cuda.is_bf16_supported():
            raise SftlabError("bf16: true, but this GPU has no bfloat16; set bf16: false and fp16: true")
        if not cuda and not cpu_supports_bf16():
            log.warning("bf16: true on a CPU without bf16 arithmetic (AVX-512 bf16 / AMX): autocast converts each matmul's "
                        "inputs to bf16 and computes in fp32, so this run is slower than with bf16: false; set bf16: false here")
        return "bf16"
    return "fp16" if cfg.fp16 else "no"


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak RSS elsewhere.

    On Linux the peak RSS is VmHWM, this program's own: ru_maxrss starts from the RSS of the process it was forked
    from (a run started by the web UI, a test or a benchmark would report its parent's memory as its own)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
