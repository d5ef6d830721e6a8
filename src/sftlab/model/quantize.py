"""QLoRA's base model: quantized to 4 or 8 bits by bitsandbytes when it loads (LLaMA-Factory's quantization_bit keys).

What a run trained on is recorded in its config.yaml; ``Quantization.recorded`` reads it back, so evaluation, chat
and resume load the same quantized base. Export never does: it merges into the full-precision weights.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftlab.errors import SftlabError


@dataclass(frozen=True)
class Quantization:
    """How the base model's linear layers are quantized: ``bits`` 4 (``kind`` nf4 or fp4, ``double``: the block
    constants quantized too) or 8 (LLM.int8)."""

    bits: int
    kind: str = "nf4"
    double: bool = True

    @classmethod
    def recorded(cls, values: Any) -> "Quantization | None":
        """From a config (SFTConfig or a run's config.yaml as a dict); None when it trained on an unquantized base."""
        get = values.get if isinstance(values, dict) else lambda k, d=None: getattr(values, k, d)
        bits = get("quantization_bit")
        return None if bits is None else cls(int(bits), get("quantization_type", "nf4"), bool(get("double_quantization", True)))

    def describe(self) -> str:
        return f"{self.bits}-bit ({self.kind}{', double' if self.double else ''})" if self.bits == 4 else "8-bit (LLM.int8)"

    def bnb_config(self, compute_dtype: torch.dtype):
        """The transformers BitsAndBytesConfig; matmuls of 4-bit layers run in ``compute_dtype`` (the run's precision)."""
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SftlabError(f"quantization_bit: {self.bits} needs bitsandbytes: pip install 'sftlab[bnb]'")
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.kind, bnb_4bit_use_double_quant=self.double,
                                  bnb_4bit_compute_dtype=compute_dtype)

    def load_kwargs(self, compute_dtype: torch.dtype, device: torch.device | str) -> dict[str, Any]:
        """What ``from_pretrained`` takes to load the base quantized, whole, on ``device``."""
        return {"quantization_config": self.bnb_config(compute_dtype), "device_map": {"": str(device)}}


def quiet_bitsandbytes() -> None:
    """bitsandbytes' 8-bit matmul warns on every call that fp32 inputs are cast to fp16 (how LLM.int8 works)."""
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


def quant_method(config: dict) -> str | None:
    """How a model's config.json (parsed) says its publisher quantized it (its quantization_config: "gptq", "awq",
    "bitsandbytes", …; "quantized" when it does not say); None for full-precision weights."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    return quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"


def prequantized_method(model_dir: Path) -> str | None:
    """``quant_method`` of the checkpoint in ``model_dir``; None without a config.json."""
    path = Path(model_dir) / "config.json"
    return quant_method(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def check_prequantized(model_dir: Path) -> None:
    """A checkpoint quantized by its publisher (GPTQ, AWQ, …) that sftlab cannot train here: SftlabError naming it."""
    method = prequantized_method(model_dir)
    if method is None or method == "bitsandbytes":
        return  # a bitsandbytes checkpoint loads through bitsandbytes, as quantization_bit does
    raise SftlabError(f"{model_dir} is a {method} checkpoint: training on its pre-quantized weights needs that method's kernels "
                      f"(GPTQ: gptqmodel + optimum, AWQ: autoawq, on a CUDA GPU), which sftlab does not install; train on the "
                      "full-precision model with quantization_bit: 4 (QLoRA with bitsandbytes) instead")
