"""Facts about the device: the peak memory a run reports is its own."""

import subprocess
import sys

import torch

from sftlab.model.device import peak_memory_gb


def test_peak_memory_of_a_process_started_from_a_big_one_is_its_own():
    """A run started by a process holding 1.5 GiB (the web UI, a test session) reports its own peak, not its parent's."""
    held = torch.ones(3 * 2**27)  # 1.5 GiB, every page touched
    assert peak_memory_gb(torch.device("cpu")) > 1.5
    child = subprocess.run([sys.executable, "-c", "import torch; from sftlab.model.device import peak_memory_gb; "
                            "print(peak_memory_gb(torch.device('cpu')))"], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert float(child.stdout) < 1.0  # importing torch takes ~0.3 GiB
    del held
