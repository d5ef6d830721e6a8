"""DeepSpeed ZeRO (``deepspeed: path/to/ds_config.json``), as LLaMA-Factory and the HF Trainer take it.

The JSON says how to shard (ZeRO stage 2 or 3, CPU offload, bucket sizes); the YAML says what to
train. Every ``"auto"`` in the JSON is filled from the YAML (batch, accumulation, clipping,
precision, bucket sizes from the hidden size), and a value the JSON pins that disagrees with the
YAML is an error, not a silent winner. The optimizer and the learning-rate schedule are sftlab's
(AdamW and ``lr_scheduler_type``); a JSON ``optimizer`` or ``scheduler`` section is refused.

``DeepSpeed`` is the run's backend (``train/backend.py``): the loop drives the engine through it
(``backward`` per micro-batch, ``step`` once per optimizer step); DeepSpeed clips with
``gradient_clipping`` and skips an update whose gradient is not finite. Checkpoints hold the full
model or adapter (gathered, as under FSDP) plus DeepSpeed's own sharded optimizer state in
``deepspeed/``, which resumes on the same number of processes. DeepSpeed is an optional dependency,
imported only where a run uses it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from sftlab.config import SFTConfig
from sftlab.errors import SftlabError
from sftlab.train.backend import Backend, per_rank_dir, require_launch
from sftlab.train.checkpoint import ENGINE_DIR, ENGINE_TAG, SavedState, as_saved, is_adapter, saved_keys, saved_weights


def read_deepspeed_config(path: str | Path) -> dict:
    """The JSON at ``path``; SftlabError naming the file when it is missing or not a JSON object."""
    p = Path(path)
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SftlabError(f"deepspeed: {p} does not exist; use one of examples/deepspeed/*.json or write your own") from None
    except json.JSONDecodeError as e:
        raise SftlabError(f"deepspeed: {p} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(ds, dict):
        raise SftlabError(f"deepspeed: {p} holds a JSON {type(ds).__name__}, not an object of DeepSpeed settings")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise SftlabError(f"deepspeed: {p} has a \"{section}\" section; sftlab builds the optimizer and schedule from the YAML "
                              f"(learning_rate, weight_decay, lr_scheduler_type, warmup): remove the section")
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        raise SftlabError(f"deepspeed: {p}: zero_optimization.stage is {stage!r}; use 0, 1, 2 or 3")
    return ds


def check_deepspeed(cfg) -> dict | None:
    """The run's DeepSpeed JSON (None without ``deepspeed:``), checked against the rest of the config."""
    if not cfg.deepspeed:
        return None
    ds = read_deepspeed_config(cfg.deepspeed)
    if importlib.util.find_spec("deepspeed") is None:
        raise SftlabError(f"deepspeed: {cfg.deepspeed} is set, and DeepSpeed is not installed: pip install 'sftlab[deepspeed]'")
    return ds


def zero_stage(ds: dict) -> int:
    return ds.get("zero_optimization", {}).get("stage", 0)


def fill_deepspeed_config(ds: dict, path: str, *, micro_batch: int, accumulation: int, world_size: int, max_grad_norm: float,
                          precision: str) -> dict:
    """A copy of ``ds`` with the YAML's values in place of "auto"; SftlabError where a pinned value disagrees.
    The bucket sizes need the model: ``size_buckets`` fills them."""
    ds = copy.deepcopy(ds)
    owned = {  # key path → the YAML's value and the YAML key it comes from
        ("train_micro_batch_size_per_gpu",): (micro_batch, "per_device_train_batch_size"),
        ("gradient_accumulation_steps",): (accumulation, "gradient_accumulation_steps"),
        ("train_batch_size",): (micro_batch * accumulation * world_size, "per_device_train_batch_size × gradient_accumulation_steps × processes"),
        ("gradient_clipping",): (max_grad_norm, "max_grad_norm"),
        ("bf16", "enabled"): (precision == "bf16", "bf16"),
        ("fp16", "enabled"): (precision == "fp16", "fp16"),
    }
    for keys, (value, yaml_key) in owned.items():
        parent = ds
        for k in keys[:-1]:
            parent = parent.setdefault(k, {})
        pinned = parent.get(keys[-1], "auto")
        if pinned != "auto" and pinned != value:
            raise SftlabError(f"deepspeed: {path}: {'.'.join(keys)} is {json.dumps(pinned)} but the YAML's {yaml_key} gives "
                              f"{json.dumps(value)}; set it to \"auto\" (the YAML decides) or change the YAML")
        parent[keys[-1]] = value
    z = ds.setdefault("zero_optimization", {})
    if zero_stage(ds) == 3:
        z["stage3_gather_16bit_weights_on_model_save"] = True  # checkpoints hold the full model, gathered layer by layer
    ds["zero_allow_untested_optimizer"] = True  # the YAML's AdamW (torch), not DeepSpeed's fused or CPU one
    ds["zero_force_ds_cpu_optimizer"] = False  # offloading steps torch's AdamW on the CPU: no compiled op needed
    ds.setdefault("steps_per_print", 2**31 - 1)  # sftlab logs the steps
    return ds


def size_buckets(ds: dict, path: str, hidden_size: int) -> None:
    """Fill the "auto" bucket sizes of ``ds`` in place from the model's hidden size (the HF Trainer's rule);
    SftlabError when any other "auto" is left."""
    z = ds.setdefault("zero_optimization", {})
    sized = {"reduce_bucket_size": hidden_size * hidden_size, "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "stage3_param_persistence_threshold": 10 * hidden_size}
    for key, value in sized.items():
        if z.get(key) == "auto":
            z[key] = value
    left = [k for k, v in _walk(ds) if v == "auto"]
    if left:
        raise SftlabError(f"deepspeed: {path}: sftlab cannot fill {', '.join(left)} (\"auto\"); give a number")


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _reduce_with_gloo() -> None:
    """On a CPU, DeepSpeed compiles its shared-memory all-reduce kernels (``deepspeed_shm_comm``) when the process group
    starts: a C++ build of 35–110 s on 2 cores at the first run, and one that is killed leaves torch's lock file in
    ``~/.cache/torch_extensions``, on which every later run waits forever without a word. The ranks reduce with gloo
    instead, as sftlab's DDP and FSDP runs do on a CPU; the op is marked unavailable in DeepSpeed's table of the ops
    this machine can build, which DeepSpeed consults before building it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeed(Backend):
    """The backend of a ``deepspeed:`` run: ``prepare`` makes accelerate build DeepSpeed's engine, which the methods
    below drive. Under ZeRO-3 the weights are partitioned over the ranks."""

    lockstep_micro_batches = True  # the engine reduces and (ZeRO-3) gathers in every micro-batch, on every rank

    def __init__(self, accelerator: Accelerator, config_path: str, stage: int):
        super().__init__(accelerator)
        self.config_path = config_path
        self.sharded_weights = stage == 3

    @classmethod
    def for_run(cls, cfg: SFTConfig, precision: str) -> DeepSpeed:
        ds = check_deepspeed(cfg)
        require_launch("deepspeed")
        filled = fill_deepspeed_config(ds, cfg.deepspeed, micro_batch=cfg.per_device_train_batch_size,
                                       accumulation=cfg.gradient_accumulation_steps, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                                       max_grad_norm=cfg.max_grad_norm, precision=precision)
        # accelerate's cpu=True would turn DeepSpeed off: on a CPU, DeepSpeed is told its backend instead
        cpu = not torch.cuda.is_available()
        if cpu:
            _reduce_with_gloo()
        accelerator = Accelerator(mixed_precision=precision, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=filled),
                                  kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu else None)
        return cls(accelerator, cfg.deepspeed, zero_stage(ds))

    def prepare(self, model, build_optimizer):
        size_buckets(self.accelerator.state.deepspeed_plugin.deepspeed_config, self.config_path, model.config.hidden_size)
        return super().prepare(model, build_optimizer)

    def micro_batch(self, module, last: bool) -> AbstractContextManager:
        module.set_gradient_accumulation_boundary(last)  # the engine reduces at the boundary it is told; no_sync is not its way
        return nullcontext()

    def backward(self, module, loss: torch.Tensor) -> None:
        module.backward(loss, scale_wrt_gas=False)  # the loop has already divided by the step's tokens

    def clip_gradients(self, module, max_grad_norm: float) -> float:
        """The engine clips (gradient_clipping), applies the update and zeroes the gradients in this one call, and
        skips the update when the gradient is not finite."""
        module.step()
        norm = module.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def optimizer_step(self, optimizer, apply: bool) -> None:
        pass  # the engine's step (in clip_gradients) has updated the weights and zeroed the gradients

    def load_weights(self, checkpoint: Path, model) -> None:
        pass  # loaded with the engine's state (load_state)

    def load_state(self, checkpoint: Path, module, optimizer) -> None:
        """DeepSpeed's optimizer state and the weights from ``checkpoint``/deepspeed (``find_checkpoint`` has checked
        that it was saved on this number of processes)."""
        module.load_checkpoint(str(checkpoint / ENGINE_DIR), tag=ENGINE_TAG, load_module_strict=False, load_optimizer_states=True,
                               load_lr_scheduler_states=False)

    def gathered_weights(self, module) -> dict[str, torch.Tensor] | None:
        """The weights to save, on the main process ({} on the others), keys as ``TokenLoss.model`` names them;
        None where the model's own parameters already are that (ZeRO-0/1/2 in fp32: whole on every rank).

        ZeRO-3 gathers them layer by layer (an adapter's only). Under bf16/fp16 the engine computes with a
        half-precision copy, so the trained weights are taken from the optimizer's fp32 master copy
        instead, as the HF Trainer's ``zero_to_fp32`` does after the fact.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        engine = module
        half = engine.bfloat16_enabled() or engine.fp16_enabled()
        if not (half or self.sharded_weights):
            return None
        if self.sharded_weights:
            state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=is_adapter(engine.module)) or {}
        else:
            state = dict(engine.module.state_dict())  # references; an adapter's own keys are picked when saving
        if half:
            for name, p in engine.module.named_parameters():
                if p.requires_grad:
                    master = safe_get_full_fp32_param(p)  # gathered on every rank under ZeRO-3
                    state[name] = master.cpu() if engine.global_rank == 0 else None
        return as_saved(engine.module, state) if engine.global_rank == 0 else {}

    def save_state(self, module, optimizer, staging: Path, weights: dict | None = None) -> SavedState:
        """Each rank writes its part of DeepSpeed's optimizer (and engine) state into ``staging``; the weights are
        gathered (ZeRO-3) or taken from the fp32 master copy (bf16/fp16)."""
        per_rank_dir(self, staging)
        module.save_checkpoint(str(staging), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=is_adapter(module.module))
        weights = self.gathered_weights(module) if weights is None else weights
        self.wait()
        return SavedState(weights, None, (staging, ENGINE_DIR))

    def load_full_weights(self, module, checkpoint: Path) -> None:
        """ZeRO-3: one parameter at a time, gathered, set from the main process's copy of the file, partitioned again."""
        if not self.sharded_weights:
            return super().load_full_weights(module, checkpoint)
        import deepspeed

        saved = saved_weights(checkpoint) if self.is_main else None
        named = dict(module.module.named_parameters())
        names = saved_keys(module.module, [n for n, p in named.items() if p.requires_grad or not is_adapter(module.module)])
        for key, name in names.items():
            with deepspeed.zero.GatheredParameters([named[name]], modifier_rank=0):
                if saved is not None and key in saved:
                    named[name].data.copy_(saved[key])
