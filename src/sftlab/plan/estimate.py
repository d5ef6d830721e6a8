"""Memory and time of a training run, from the model's config alone (``sftlab estimate``).

Memory per device is what is alive at the run's peak: weights, gradients, AdamW states, the tensors
autograd saves for backward (activations), the loss's chunk of logits and a runtime overhead. The
activations are counted tensor by tensor for a Llama-style decoder layer as sftlab trains it (checked
with saved-tensor hooks; docs/estimate.md); time is ``model.flops.FlopCounter``'s FLOPs over a stated
device throughput. No weights are read: the model is built on the meta device from its config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sftlab.config import SFTConfig
from sftlab.data.schedule import Schedule
from sftlab.errors import SftlabError
from sftlab.model.attention import use_flat_batches
from sftlab.model.flops import GPU_PEAK_TFLOPS, FlopCounter, measure_cpu_peak
from sftlab.model.loss import LOGITS_PER_CHUNK, TokenLoss

GB = 2**30  # as peak_memory_gb: "GB" is GiB throughout
CPU_RUNTIME = 0.55 * GB  # python + torch + transformers + datasets + peft + tokenizer: RSS before the model (measured)
GPU_RUNTIME = 1.0 * GB  # CUDA context (~0.5) and caching-allocator slack; not in max_memory_allocated
# glibc keeps the forward's freed tensors (1-32 MiB: under its dynamic mmap threshold) in a fragmented heap: CPU
# peak RSS exceeds the live tensors by this share of what the forward allocates (the activations without gradient
# checkpointing, whether or not it is on). Fitted on two runs, checked on the others (docs/estimate.md).
CPU_HEAP_SLACK = {"lora": 0.8, "full": 0.25, "freeze": 0.25}
DEFAULT_MFU = {"cuda": 0.4, "cpu": 0.4}  # assumed share of the peak a training step reaches
THUMB_FULL_BYTES_PER_PARAM = 12  # a common rule: VRAM ≈ parameters × 12 for full tuning (1B → 12 GB)
THUMB_GB_PER_1024_TOKENS = 2.5  # a common rule: ~2.5 GB per 1024 tokens of cutoff_len
THUMB_LORA_GB = 2.0  # a common rule: LoRA rank 8-16 ≈ 2 GB

Sharding = Literal["none", "zero1", "zero2", "zero3", "fsdp"]


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: sizes from its config, parameter counts from a meta-device instance."""

    name: str
    architecture: str
    params: int  # every parameter once (tied embeddings once)
    layers: int
    layer_params: int  # parameters of one decoder layer
    hidden: int
    intermediate: int  # MLP width per token (for mixture-of-experts: active experts × expert width)
    gated_mlp: bool
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: tuple[tuple[str, int, int], ...]  # (name, in, out) of every linear layer but the head
    largest_param: int  # elements of the biggest parameter tensor
    selective_loss: bool  # TokenLoss runs the head only at trained positions (a plain linear head)
    flops: FlopCounter  # all weights trained; ``method_flops`` adjusts it
    max_positions: int | None = None

    @property
    def lora_names(self) -> list[str]:
        return sorted({name for name, _, _ in self.linears})


def model_shape(config: Any, name: str = "", trust_remote_code: bool = False) -> ModelShape:
    """A transformers config → ModelShape (the model is instantiated on the meta device: no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    text = config.get_text_config()
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise SftlabError(f"{name or 'model'}: cannot build a {type(config).__name__} causal LM from its config ({e}); "
                          "is it a decoder-only model (and trust_remote_code: true if it needs its own code)?") from None
    head = model.get_output_embeddings()
    linears = tuple((n.rsplit(".", 1)[-1], m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    heads = text.num_attention_heads
    experts = getattr(text, "num_experts_per_tok", None)
    expert_width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
    return ModelShape(
        name=name or getattr(config, "_name_or_path", "") or type(config).__name__,
        architecture=type(model).__name__,
        params=sum(p.numel() for p in model.parameters()),
        layers=len(layers),
        layer_params=sum(p.numel() for p in layers[0].parameters()),
        hidden=text.hidden_size,
        intermediate=expert_width * experts if experts else text.intermediate_size,
        gated_mlp=sum(1 for n, _, _ in linears if n in ("gate_proj", "w1", "w3", "up_proj", "gate_up_proj")) > 0,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        tied=head is not None and head.weight is model.get_input_embeddings().weight,
        linears=linears,
        largest_param=max(p.numel() for p in model.parameters()),
        selective_loss=TokenLoss(model).selective,
        flops=FlopCounter.for_model(model),
        max_positions=getattr(text, "max_position_embeddings", None),
    )


def load_model_config(name: str, trust_remote_code: bool = False) -> tuple[Any, str]:
    """``model_name_or_path`` → (transformers config, where it came from), reading no weights.

    Raises SftlabError when the name is no model directory, GGUF file, cached or packaged model, and the Hub
    cannot be reached.
    """
    from transformers import AutoConfig

    from sftlab.model.assets import locate_config

    where = locate_config(name)
    try:
        if where.suffix == ".gguf":
            return AutoConfig.from_pretrained(where.parent, gguf_file=where.name), f"{where} (GGUF header)"
        return AutoConfig.from_pretrained(where.parent, trust_remote_code=trust_remote_code), str(where)
    except ValueError as e:
        raise SftlabError(f"{where}: cannot read the model config ({e})") from None


# --- the machine ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The machine an estimate is for: ``devices`` of ``memory`` bytes each."""

    device: Literal["cuda", "cpu"] = "cuda"
    devices: int = 1
    memory: float = 80 * GB
    sharding: Sharding = "none"
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    flash_attn: bool = True  # FlashAttention-2 installed on the GPU (decides padded vs padding-free batches)
    peak_tflops: float | None = None  # per device; None: the GPU table (H100) or a CPU measurement
    mfu: float | None = None

    def describe(self) -> str:
        shard = "" if self.sharding == "none" else f", {self.sharding.upper()}"
        kind = "GPU" if self.device == "cuda" else "CPU"
        return f"{self.devices} × {kind} of {self.memory / GB:.3g} GB{shard}"


def parse_size(text: str) -> float:
    """'80GB', '24G', '24000MB', '80' (GB) → bytes (GB = GiB, as everywhere in sftlab)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise SftlabError(f"memory size '{text}': write it as e.g. 80GB, 24G or 16000MB")
    unit = {"": GB, "k": 2**10, "m": 2**20, "g": GB, "t": 2**40}[m.group(2)]
    return float(m.group(1)) * unit


# --- the run ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """What the fine-tuning method trains: counts of parameters and where they are."""

    trainable: int
    frozen: int
    lora: int  # of trainable, LoRA's A and B matrices
    lora_modules: int  # targeted linear layers per decoder layer
    lora_inputs: int  # their input widths, summed (each gets its own dropout)
    layers_with_grad: int  # decoder layers whose activations are kept for backward
    trained_layers: int  # decoder layers with trained weights
    layer_trainable: int  # trained parameters of one such layer
    norms_trained: bool
    head_trained: bool
    describe: str


def method(shape: ModelShape, cfg: SFTConfig) -> Method:
    """Which parameters ``cfg.finetuning_type`` trains (as ``model.load.load_model`` sets them).

    Raises SftlabError for LoRA target names the model lacks, or a freeze layer count out of range.
    """
    if cfg.finetuning_type == "full":
        return Method(shape.params, 0, 0, 0, 0, shape.layers, shape.layers, shape.layer_params, True, True, "full: every weight trained")
    if cfg.finetuning_type == "freeze":
        n = cfg.freeze_trainable_layers
        if n == 0 or abs(n) > shape.layers:
            raise SftlabError(f"freeze_trainable_layers: {n} — this model has {shape.layers} layers; use 1..{shape.layers}")
        # Trained layers at the top keep activations from there up; trained layers at the bottom need them all.
        kept = abs(n) if n > 0 else shape.layers
        trainable = abs(n) * shape.layer_params
        return Method(trainable, shape.params - trainable, 0, 0, 0, kept, abs(n), shape.layer_params, True, False,
                      f"freeze: {abs(n)} {'last' if n > 0 else 'first'} layers trained")
    names = shape.lora_names if cfg.lora_target == "all" else list(cfg.lora_target)
    unknown = [t for t in names if t not in shape.lora_names]
    if unknown:
        raise SftlabError(f"lora_target: {', '.join(unknown)} not in this model; its linear layers are "
                          f"{', '.join(shape.lora_names)} (or use 'all')")
    targets = [(i, o) for n, i, o in shape.linears if n in names]
    lora = sum(cfg.lora_rank * (i + o) for i, o in targets)
    layers = max(shape.layers, 1)
    return Method(lora, shape.params, lora, len(targets) // layers, sum(i for i, _ in targets) // layers, shape.layers, shape.layers,
                  lora // layers, False, False,
                  f"{'QLoRA' if cfg.quantization_bit else 'LoRA'} r={cfg.lora_rank} on {', '.join(names)}"
                  + (f", the base in {cfg.quantization_bit} bits" if cfg.quantization_bit else ""))


def method_flops(shape: ModelShape, m: Method, cfg: SFTConfig) -> FlopCounter:
    """FlopCounter for the method: LoRA computes no frozen weight gradients; freeze only its layers'."""
    base = shape.flops
    if cfg.finetuning_type == "full":
        return base
    share = m.lora / max(base.matmul_params, 1) if cfg.finetuning_type == "lora" else m.trainable / max(base.matmul_params, 1)
    return dataclasses.replace(base, trained_fraction=min(share, 1.0), head_trained=False)


@dataclass
class Part:
    """One row of the memory table: its full size and what of it is alive at the peak (bytes)."""

    name: str
    size: float
    at_peak: float
    how: str


@dataclass
class Memory:
    parts: list[Part]
    peak_phase: str
    activation_bytes_per_token: float  # one decoder layer, one token, as configured
    activations_without_gc: float
    activations_with_gc: float
    full_logits: float  # what [tokens, vocab] logits would take (the unchunked loss)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(p.at_peak for p in self.parts)


def layer_activation_bytes(shape: ModelShape, m: Method, cfg: SFTConfig, target: Target, seq_len: int) -> float:
    """Bytes autograd keeps for one decoder layer per token (Llama-style: RMSNorm, attention, gated MLP).

    Counted as measured with saved-tensor hooks: the two norms' inputs (fp32), and their normalised copies
    when norm weights train; the norm outputs feeding q/k/v and the MLP; q and k after RoPE, v, the attention
    output and o_proj's input; the MLP's gate, activation, up and product (gated; plain: 2); the attention's
    logsumexp. Padded batches without FlashAttention add k/v repeated to every head and a float mask row.
    LoRA adds each adapter's rank-r middle, and with dropout a dropped copy of each input and its mask.
    """
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    act = 2 if (cfg.bf16 or cfg.fp16) else 4
    mlp = (4 if shape.gated_mlp else 2) * shape.intermediate
    b = 4 * 2 * h + (4 * 2 * h if m.norms_trained else 0)
    b += act * (2 * h + q + 2 * kv + q + q + mlp) + 4 * shape.heads
    if not use_flat_batches(cfg, target.device, target.flash_attn) and not (target.device == "cuda" and target.flash_attn):
        b += act * 2 * (q - kv) + 4 * seq_len  # repeat_kv for GQA; the [L, L] mask row of each token
    if m.lora:
        b += act * cfg.lora_rank * m.lora_modules
        if cfg.lora_dropout > 0:
            b += (act + 1) * m.lora_inputs  # the dropped copy and its bool mask
    return b


def memory(shape: ModelShape, cfg: SFTConfig, target: Target, seq_len: int | None = None, trained_share: float = 1.0) -> Memory:
    """Peak memory of one device for ``cfg`` on ``target``.

    A micro-batch holds ``per_device_train_batch_size`` samples of ``seq_len`` tokens (default cutoff_len: the
    worst case; with packing, rows of cutoff_len), ``trained_share`` of them trained. Raises SftlabError for a
    method the model cannot take (see ``method``).
    """
    m = method(shape, cfg)
    notes: list[str] = []
    seq = seq_len or cfg.cutoff_len
    tokens = cfg.per_device_train_batch_size * seq
    trained = max(1.0, tokens * trained_share)
    n = target.devices
    mixed = cfg.bf16 or cfg.fp16
    act = 2 if mixed else 4
    half_frozen = target.device == "cuda" and mixed and cfg.finetuning_type != "full"
    shard_w = n if target.sharding in ("zero3", "fsdp") else 1
    shard_g = n if target.sharding in ("zero2", "zero3", "fsdp") else 1
    shard_o = n if target.sharding != "none" else 1

    weights = (4 * m.trainable + (2 if half_frozen else 4) * m.frozen) / shard_w
    quantized = shape.flops.matmul_params if cfg.quantization_bit else 0  # QLoRA: the decoder's linear weights
    if quantized:  # the rest of the frozen base (embeddings, head, norms) is fp32, as prepare_model_for_kbit_training leaves it
        half_frozen = False
        weights = 4 * m.trainable + quantized_bytes(cfg) * quantized + 4 * (m.frozen - quantized)
    grads = 4 * m.trainable / shard_g
    state_bytes = 8 if target.optimizer == "adamw" else 2
    optimizer = state_bytes * m.trainable / shard_o
    # autocast casts every fp32 weight a matmul uses to half precision; backward keeps the copy (of layers with gradients)
    casts = 2 * shape.flops.matmul_params * m.layers_with_grad / shape.layers / shard_w if mixed and not half_frozen and not quantized else 0.0

    a_layer = layer_activation_bytes(shape, m, cfg, target, seq)
    stream = 2 if half_frozen else 4
    head_saved = trained * shape.hidden * stream + tokens * shape.hidden * 4 * (2 if m.norms_trained else 1)
    acts_full = m.layers_with_grad * a_layer * tokens + head_saved
    acts_gc = m.layers_with_grad * tokens * shape.hidden * stream + a_layer * tokens + head_saved
    acts = acts_gc if cfg.gradient_checkpointing else acts_full
    per_layer_acts = (tokens * shape.hidden * stream if cfg.gradient_checkpointing else a_layer * tokens)

    if shape.selective_loss:
        rows = min(trained, max(64, LOGITS_PER_CHUNK // shape.vocab))
        loss = rows * shape.vocab * (4 + 4 + (2 if mixed else 0)) + (4 * 2 * shape.vocab * shape.hidden if m.head_trained else 0)
    else:
        loss = tokens * shape.vocab * (act + 4 + 4)
        notes.append("this model's head has logit scaling or softcapping: the loss builds full [tokens, vocab] logits")
    full_logits = tokens * shape.vocab * (act + 4 + 4)
    scratch = tokens * (3 * shape.intermediate + 2 * shape.hidden) * act  # one layer's gradient temporaries in backward
    transient = max(loss, scratch)

    layer_grads = 4 * m.layer_trainable / shard_g
    fixed_grads = grads - m.trained_layers * layer_grads  # embeddings, head, final norm: computed by the loss, early
    if cfg.gradient_accumulation_steps > 1:  # later micro-batches run with every gradient already there
        phase, at_acts, at_grads = "in a later micro-batch's backward: all activations and the step's gradients", acts, grads
    elif per_layer_acts >= layer_grads:
        phase, at_acts, at_grads = "at the start of backward: all activations and the head's gradient", acts, fixed_grads
    else:
        phase, at_acts, at_grads = "at the end of backward: all gradients, one layer's activations", per_layer_acts, grads
    step_scratch = 4 * m.trainable / shard_o if target.device == "cuda" else 4 * min(shape.largest_param, m.trainable)
    if grads + step_scratch > at_acts + at_grads + transient:
        phase, at_acts, at_grads, transient = "in the optimizer step", 0.0, grads, step_scratch

    frozen_how = (f" + {quantized / 1e6:,.1f} M quantized × {quantized_bytes(cfg):.3g} B + {(m.frozen - quantized) / 1e6:,.1f} M "
                  "frozen × 4 B" if quantized else f" + {m.frozen / 1e6:,.1f} M frozen × {2 if half_frozen else 4} B" if m.frozen else "")
    parts = [
        Part("weights", weights, weights, f"{m.trainable / 1e6:,.1f} M trained × 4 B" + frozen_how + (f" ÷ {shard_w}" if shard_w > 1 else "")),
        Part("gradients", grads, at_grads, "4 B × trained" + (f" ÷ {shard_g}" if shard_g > 1 else "")),
        Part("optimizer states", optimizer, optimizer, ("AdamW: 2 × 4 B" if state_bytes == 8 else "8-bit AdamW: 2 × 1 B") + " × trained"
             + (f" ÷ {shard_o}" if shard_o > 1 else "")),
        Part("activations", acts, at_acts, f"{m.layers_with_grad} layers × {tokens:,} tokens × {a_layer / 1024:,.1f} KiB"
             + (" (checkpointed: each layer's input + one layer)" if cfg.gradient_checkpointing else "")),
        Part("loss / backward temporaries", transient, transient, _transient_how(shape, trained, loss, scratch, step_scratch, transient)),
    ]
    if quantized:  # bitsandbytes dequantizes each weight for its matmul (and again in backward)
        largest = max(i * o for _, i, o in shape.linears)
        parts.append(Part("dequantized weight (QLoRA)", largest * act, largest * act, f"the largest linear weight in {act}-byte floats, "
                          "for its matmul"))
    if casts:
        parts.append(Part("half weight copies (autocast)", casts, casts, "2 B × the decoder's matmul weights, kept from forward to backward"))
    if n > 1 and target.sharding == "none":
        parts.append(Part("DDP gradient buckets", grads, grads, "a flat copy of the gradients for all-reduce"))
    if target.sharding in ("zero3", "fsdp"):
        gathered = 2 * shape.layer_params * (2 if mixed else 4)
        parts.append(Part("gathered layers (ZeRO-3/FSDP)", gathered, gathered, "two layers' full weights at once (prefetch)"))
    runtime = GPU_RUNTIME if target.device == "cuda" else CPU_RUNTIME
    parts.append(Part("runtime", runtime, runtime,
                      "CUDA context + allocator slack" if target.device == "cuda" else "python, torch, tokenizer, data"))
    if target.device == "cpu":
        slack = CPU_HEAP_SLACK[cfg.finetuning_type] * acts_full  # RSS is a high-water mark: the forward's heap stays
        parts.append(Part("CPU heap slack (glibc)", slack, slack, f"{CPU_HEAP_SLACK[cfg.finetuning_type]:.0%} of the forward's activations: "
                          "freed tensors kept in a fragmented heap"))
    if shape.max_positions and cfg.cutoff_len > shape.max_positions:
        notes.append(f"cutoff_len {cfg.cutoff_len} is over the model's max_position_embeddings {shape.max_positions}")
    return Memory(parts, phase, a_layer, acts_full, acts_gc, full_logits, notes)


def quantized_bytes(cfg: SFTConfig) -> float:
    """Bytes per quantized weight: 4-bit packs two per byte plus an fp32 absmax per block of 64 (with
    double_quantization an 8-bit one, and an fp32 per 256 blocks: bitsandbytes' layout); 8-bit one byte (the
    per-row scales are negligible)."""
    if cfg.quantization_bit == 8:
        return 1.0
    return 0.5 + ((1 + 4 / 256) / 64 if cfg.double_quantization else 4 / 64)


def _transient_how(shape: ModelShape, trained: float, loss: float, scratch: float, step: float, transient: float) -> str:
    if transient == step and transient not in (loss, scratch):
        return "AdamW's scratch in the optimizer step"
    if transient == scratch and scratch > loss:
        return "one layer's gradient temporaries in backward"
    if not shape.selective_loss:
        return "full [tokens, vocab] logits, their fp32 copy and gradient"
    return f"chunked head: {min(trained, max(64, LOGITS_PER_CHUNK // shape.vocab)):,.0f} rows × {shape.vocab:,} fp32 logits"


def max_batch(shape: ModelShape, cfg: SFTConfig, target: Target, seq_len: int | None = None, trained_share: float = 1.0,
              limit: int = 4096) -> int:
    """The largest per_device_train_batch_size whose peak fits ``target.memory`` (0: not even 1)."""
    def fits(b: int) -> bool:
        return memory(shape, cfg.model_copy(update={"per_device_train_batch_size": b}), target, seq_len, trained_share).total <= target.memory

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi): memory grows with the batch
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# --- time -------------------------------------------------------------------------------------------------------------


@dataclass
class Time:
    step_flops: float  # one optimizer step, all devices
    step_s: float
    steps: int | None
    total_s: float | None
    peak_flops: float  # per device
    mfu: float
    throughput: str  # where the peak comes from
    basis: str  # what the token count assumes


def device_peak(cfg: SFTConfig, target: Target) -> tuple[float, str]:
    """Peak FLOP/s of one device and where it comes from: --tflops, the config's peak_tflops, H100 table, or a CPU matmul."""
    half = cfg.bf16 or cfg.fp16
    given = target.peak_tflops or cfg.peak_tflops
    if given:
        return given * 1e12, f"{given:g} TFLOP/s given"
    if target.device == "cuda":
        tflops = GPU_PEAK_TFLOPS["H100"][0 if half else 1]
        return tflops * 1e12, f"H100 {'bf16' if half else 'TF32'} peak {tflops:g} TFLOP/s; --tflops for another GPU"
    flops = measure_cpu_peak(torch.bfloat16 if half else torch.float32)
    return flops, f"this CPU's {'bf16' if half else 'fp32'} matmul, measured: {flops / 1e12:.2f} TFLOP/s"


def training_time(shape: ModelShape, cfg: SFTConfig, target: Target, samples: int | None, mean_len: float | None,
                  trained_share: float = 1.0) -> Time:
    """Time of one optimizer step and of the run: ``FlopCounter.step_flops`` (2·N per token forward, 2·N backward for
    activations, 2·N more for trained weights only; causal attention; head at trained positions) ÷ (peak × MFU).

    ``samples``: training samples (None: steps unknown unless max_steps); ``mean_len``: tokens per sample
    (None: cutoff_len, an upper bound).
    """
    m = method(shape, cfg)
    counter = method_flops(shape, m, cfg)
    length = mean_len or cfg.cutoff_len
    if cfg.packing:  # a row is cutoff_len tokens of samples
        per_micro = [length] * max(1, round(cfg.per_device_train_batch_size * cfg.cutoff_len / length))
    else:
        per_micro = [length] * cfg.per_device_train_batch_size
    micro = counter.step_flops(per_micro, sum(per_micro) * trained_share)
    peak, where = device_peak(cfg, target)
    mfu = target.mfu or DEFAULT_MFU[target.device]
    step_s = micro * cfg.gradient_accumulation_steps / (peak * mfu)  # the devices run their micro-batches side by side
    steps = None
    if cfg.max_steps > 0:
        steps = cfg.max_steps
    elif samples:
        units = samples if not cfg.packing else math.ceil(samples * length / cfg.cutoff_len)
        steps = Schedule(units, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, target.devices, cfg.seed).total_steps(cfg)
    basis = f"{len(per_micro)} samples of {length:,.0f} tokens per micro-batch" + (" (cutoff_len: an upper bound)" if not mean_len else " (mean)")
    return Time(micro * cfg.gradient_accumulation_steps * target.devices, step_s, steps, steps * step_s if steps else None,
                peak, mfu, where, basis)


# --- common rules of thumb ---------------------------------------------------------------------------------------------------


def rule_of_thumb(shape: ModelShape, cfg: SFTConfig) -> tuple[float, str]:
    """The common rule-of-thumb estimate (bytes) and its formula: 12 B/param for full tuning (weights otherwise, +2 GB for LoRA),
    plus 2.5 GB per 1024 tokens of cutoff_len."""
    tokens = THUMB_GB_PER_1024_TOKENS * cfg.cutoff_len / 1024 * GB
    if cfg.finetuning_type == "full":
        return THUMB_FULL_BYTES_PER_PARAM * shape.params + tokens, "12 B × parameters + 2.5 GB per 1024 tokens of cutoff_len"
    w = 2 if (cfg.bf16 or cfg.fp16) else 4
    if cfg.quantization_bit:
        q = cfg.quantization_bit / 8
        return (q * shape.params + THUMB_LORA_GB * GB + tokens,
                f"{q:g} B × parameters ({cfg.quantization_bit}-bit) + 2 GB for LoRA + 2.5 GB per 1024 tokens of cutoff_len")
    if cfg.finetuning_type == "lora":
        return w * shape.params + THUMB_LORA_GB * GB + tokens, f"{w} B × parameters + 2 GB for LoRA + 2.5 GB per 1024 tokens of cutoff_len"
    m = method(shape, cfg)
    return (w * m.frozen + THUMB_FULL_BYTES_PER_PARAM * m.trainable + tokens,
            f"{w} B × frozen + 12 B × trained parameters + 2.5 GB per 1024 tokens of cutoff_len")


# --- the whole estimate ------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    shape: ModelShape
    source: str
    cfg: SFTConfig
    target: Target
    method: Method
    memory: Memory
    fits: bool
    max_batch: int
    max_batch_gc: int
    time: Time
    rule_of_thumb: tuple[float, str]
    seq_len: int
    trained_share: float

    def lines(self) -> list[str]:
        """Everything but the memory table, as plain lines."""
        cfg, mem, t = self.cfg, self.memory, self.time
        out = []
        verdict = "fits" if self.fits else "does NOT fit"
        out.append(f"peak {mem.total / GB:.2f} GB per device: {verdict} in {self.target.memory / GB:.3g} GB (peak {mem.peak_phase})")
        other = "with" if not cfg.gradient_checkpointing else "without"
        out.append(f"activations {mem.activations_without_gc / GB:.2f} GB without gradient checkpointing, "
                   f"{mem.activations_with_gc / GB:.2f} GB with it; full [tokens, vocab] logits would add {mem.full_logits / GB:.2f} GB")
        out.append(f"largest per_device_train_batch_size that fits at {self.seq_len:,} tokens: {self.max_batch} "
                   f"({other} gradient checkpointing: {self.max_batch_gc})")
        if self.method.lora:
            out.append(f"LoRA parameters: {self.method.lora / 1e6:,.2f} M ({self.method.lora / self.shape.params:.2%} of the model), "
                       f"{16 * self.method.lora / GB:.3f} GB with gradients and AdamW states")
        when = f"{t.steps:,} steps → {duration(t.total_s)}" if t.steps else "steps unknown (give --stats, or set max_steps)"
        out.append(f"time: {t.step_flops / 1e12:,.1f} TFLOP per optimizer step → {t.step_s:.3g} s at {t.mfu:.0%} MFU; {when}")
        out.append(f"  ({t.basis}; {t.throughput})")
        thumb, formula = self.rule_of_thumb
        out.append(f"common rule of thumb: {thumb / GB:.1f} GB ({formula}) vs this estimate {mem.total / GB:.1f} GB "
                   f"(× {mem.total / thumb:.2f})")
        out.extend(f"note: {n}" for n in mem.notes)
        return out

    def to_dict(self) -> dict[str, Any]:
        mem, t = self.memory, self.time
        return {
            "model": self.shape.name, "source": self.source, "architecture": self.shape.architecture, "parameters": self.shape.params,
            "method": self.method.describe, "trainable_parameters": self.method.trainable, "lora_parameters": self.method.lora,
            "target": dataclasses.asdict(self.target), "seq_len": self.seq_len,
            "per_device_train_batch_size": self.cfg.per_device_train_batch_size, "gradient_checkpointing": self.cfg.gradient_checkpointing,
            "memory_gb": {p.name: {"size": p.size / GB, "at_peak": p.at_peak / GB, "how": p.how} for p in mem.parts},
            "peak_gb": mem.total / GB, "peak_phase": mem.peak_phase, "fits": self.fits,
            "activations_gb": {"without_checkpointing": mem.activations_without_gc / GB, "with_checkpointing": mem.activations_with_gc / GB},
            "full_logits_gb": mem.full_logits / GB,
            "max_per_device_train_batch_size": self.max_batch, "max_per_device_train_batch_size_other_checkpointing": self.max_batch_gc,
            "time": {"step_tflop": t.step_flops / 1e12, "step_s": t.step_s, "steps": t.steps, "total_s": t.total_s,
                     "peak_tflops": t.peak_flops / 1e12, "mfu": t.mfu, "basis": t.basis},
            "rule_of_thumb_gb": self.rule_of_thumb[0] / GB, "notes": mem.notes,
        }


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(shape: ModelShape, cfg: SFTConfig, target: Target, source: str = "", samples: int | None = None,
             mean_len: float | None = None, trained_share: float = 1.0) -> Estimate:
    """Memory (the worst micro-batch: samples of cutoff_len, every token trained), the batch that fits, the time
    (samples of ``mean_len``, ``trained_share`` of tokens trained) and the common rule of thumb for ``cfg``."""
    mem = memory(shape, cfg, target)
    other = cfg.model_copy(update={"gradient_checkpointing": not cfg.gradient_checkpointing})
    return Estimate(shape, source, cfg, target, method(shape, cfg), mem, mem.total <= target.memory,
                    max_batch(shape, cfg, target), max_batch(shape, other, target),
                    training_time(shape, cfg, target, samples, mean_len, trained_share), rule_of_thumb(shape, cfg),
                    cfg.cutoff_len, trained_share)


def read_stats(path: Path) -> tuple[int, float, float]:
    """``sftlab data stats``'s stats.json (or its folder) → (samples, mean tokens per sample, trained share of tokens)."""
    path = path / "stats.json" if path.is_dir() else path
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
        mean = s["tokens"]["length"]["mean"]
        return int(s["samples"]), float(mean), float(s["tokens"]["answer"]["mean"]) / max(float(mean), 1.0)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SftlabError(f"{path}: not a stats.json of `sftlab data stats` ({type(e).__name__}: {e}); run sftlab data stats first") from None


def count_samples(cfg: SFTConfig) -> int | None:
    """Training samples of ``cfg``'s datasets: rows (each source capped as training caps it) less the validation split.
    None when a dataset cannot be read here (the estimate then gives time per step only)."""
    from sftlab.data.rows import iter_rows
    from sftlab.data.sources import resolve_sources

    try:
        total = 0
        for source in resolve_sources(cfg.dataset, cfg.dataset_dir):
            limit = min(n for n in (cfg.max_samples, source.num_samples, 1 << 62) if n is not None)
            total += sum(1 for _, _ in zip(range(limit), iter_rows(source)))
    except SftlabError:
        return None
    return train_samples(total, cfg.val_size) or None


def train_samples(total: int, val_size: float) -> int:
    """Samples left for training after the validation split (``val_size`` as ``data.pipeline`` reads it)."""
    from sftlab.data.pipeline import validation_count

    return max(total - validation_count(val_size, total), 0)


def estimate_config(cfg: SFTConfig, target: Target, stats: Path | None = None) -> Estimate:
    """``sftlab estimate``: the model's config (no weights) → Estimate; samples from ``stats`` (a stats.json of
    ``sftlab data stats``) or counted in the data files."""
    config, source = load_model_config(cfg.model_name_or_path, cfg.trust_remote_code)
    shape = model_shape(config, cfg.model_name_or_path, cfg.trust_remote_code)
    if stats is not None:
        samples, mean_len, share = read_stats(stats)
        if cfg.max_samples:  # training reads at most max_samples rows of each dataset
            samples = min(samples, cfg.max_samples * len(cfg.dataset))
        return estimate(shape, cfg, target, source, train_samples(samples, cfg.val_size), min(mean_len, cfg.cutoff_len), share)
    return estimate(shape, cfg, target, source, count_samples(cfg))


def make_target(device: str | None, gpus: int, gpu_memory: str | None, sharding: str = "none", optimizer: str = "adamw",
                flash_attn: bool = True, tflops: float | None = None, mfu: float | None = None) -> Target:
    """The CLI's options → Target. ``device`` None: a GPU when ``gpu_memory`` is given or one is visible, else this CPU
    (its available RAM). Raises SftlabError for an unknown choice."""
    if device not in (None, "gpu", "cpu"):
        raise SftlabError(f"--device {device}: use gpu or cpu")
    if sharding not in ("none", "zero1", "zero2", "zero3", "fsdp"):
        raise SftlabError(f"--sharding {sharding}: use none, zero1, zero2, zero3 or fsdp")
    if optimizer not in ("adamw", "adamw_8bit"):
        raise SftlabError(f"--optim {optimizer}: use adamw or adamw_8bit")
    gpu = device == "gpu" or (device is None and (gpu_memory is not None or torch.cuda.is_available()))
    if gpu:
        memory = parse_size(gpu_memory) if gpu_memory else (
            torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * GB)
    else:
        memory = parse_size(gpu_memory) if gpu_memory else available_ram()
    return Target("cuda" if gpu else "cpu", gpus, memory, sharding, optimizer, flash_attn, tflops, mfu)  # type: ignore[arg-type]


def available_ram() -> float:
    """Bytes of RAM available to a new process here (MemAvailable; the total where /proc is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
