"""Model FLOPs utilisation: the FLOPs a training step needs ÷ time ÷ the device's peak.

Counted FLOPs (2 per multiply-add) are the ones the method needs, not the ones a kernel happens to
run: decoder matmuls (forward; backward = activation gradients, plus weight gradients only for
trained weights), causal attention (forward 2·layers·width·L² per sample of length L; backward
twice that), and the output head at trained positions only. Padding is never counted, so MFU
rewards not computing it. The peak is a table for known GPUs, a short matmul measured once on
CPU (in the run's precision), or ``peak_tflops`` from the config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sftlab.model.loss import base_model

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by GPU name fragment; fp32 runs use TF32 peaks.
GPU_PEAK_TFLOPS = {"H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0), "L40S": (362.0, 183.0),
                   "A10G": (125.0, 62.5), "L4": (121.0, 60.0), "4090": (165.0, 82.6), "3090": (71.0, 35.6)}


@dataclass
class FlopCounter:
    matmul_params: int  # weights of the decoder's linear layers (embeddings and head excluded)
    head_params: int  # vocab × hidden
    attn_width: int  # layers × heads × head_dim
    trained_fraction: float  # share of the decoder matmul weights that get gradients (≈0 for LoRA)
    head_trained: bool

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "FlopCounter":
        base = base_model(model)
        cfg = base.config.get_text_config()
        head = base.get_output_embeddings()
        linears = [m for m in base.modules() if isinstance(m, torch.nn.Linear) and m is not head]
        weights = [m.weight for m in linears]  # LoRA's own A/B matrices count as trained, tiny
        total = sum(w.numel() for w in weights)
        trained = sum(w.numel() for w in weights if w.requires_grad)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(total, head.weight.numel() if head is not None else 0,
                   cfg.num_hidden_layers * cfg.num_attention_heads * head_dim, trained / max(total, 1),
                   head is not None and head.weight.requires_grad)

    def step_flops(self, seq_lens: list[int], n_trained: float) -> float:
        """FLOPs of forward + backward over samples of ``seq_lens`` tokens with ``n_trained`` labels."""
        linear = 2.0 * self.matmul_params * sum(seq_lens)
        attention = 2.0 * self.attn_width * sum(n * n for n in seq_lens)
        head = 2.0 * self.head_params * n_trained
        return (linear * (2 + self.trained_fraction) + 3 * attention + head * (3 if self.head_trained else 2))


def measure_cpu_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul on this CPU in ``dtype`` (best of repeats over ~``seconds``)."""
    g = torch.Generator().manual_seed(0)  # own generator: training's random state is untouched
    a = torch.rand(size, size, generator=g).to(dtype)
    b = torch.rand(size, size, generator=g).to(dtype)
    a @ b  # warm-up
    best, spent = 0.0, 0.0
    while spent < seconds:
        t = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t
        spent += dt
        best = max(best, 2.0 * size**3 / dt)
    return best


def peak_flops(device: torch.device, half_precision: bool, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s for MFU: the override, the GPU table, or a CPU measurement; None for an unknown GPU."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (half if half_precision else tf32) * 1e12
        return None
    if device.type == "cpu":
        return measure_cpu_peak(torch.bfloat16 if half_precision else torch.float32)
    return None
