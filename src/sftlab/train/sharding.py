"""FSDP (``fsdp: true``): weights, gradients and optimizer states sharded across ranks with PyTorch's FSDP2.

Each decoder layer is one unit (its weights are gathered for its forward and backward only) and the
rest (embeddings, final norm, head) is the root unit around ``TokenLoss``. Checkpoints hold the
full model or adapter, gathered to the main process, so they load anywhere; the optimizer state is
saved by parameter name (``torch.distributed.checkpoint``'s full state dict) and converted when a
run without FSDP resumes from it, or the other way round. With ``fsdp_state_dict_type: sharded`` each
rank writes its own shards instead (nothing gathered), which load resharded on any number of processes.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from sftlab.data.render import IGNORE_INDEX
from sftlab.errors import SftlabError
from sftlab.train.checkpoint import saved_weights
from sftlab.train.loss import TokenLoss, _base

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(module: TokenLoss, precision: str) -> TokenLoss:
    """Shard ``module`` in place: one FSDP unit per decoder layer, then the root. bf16 computes in bf16 and
    reduces gradients in fp32 (the master weights stay fp32)."""
    dtype = torch.bfloat16 if precision == "bf16" else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for layer in _base(module.model).get_decoder().layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    _base(module.model)._is_fsdp_managed_module = True  # transformers' generate then keeps the ranks in step (synced_gpus)
    return module


@contextmanager
def root_unsharded(module: TokenLoss) -> Iterator[None]:
    """The root unit's weights (embeddings, final norm, head) gathered, so that the model inside can be called
    directly (evaluation, generation); each decoder layer gathers its own in its forward. Every rank must run
    the same forwards."""
    with torch.no_grad():  # FSDP makes the first module run forward its root: a two-token forward, nothing trained
        ids = torch.zeros((1, 2), dtype=torch.long, device=next(module.parameters()).device)
        module(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX))
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def full_model_state(module: TokenLoss) -> dict[str, torch.Tensor]:
    """The whole model's state dict (an adapter's: its own weights) on the main process ({} elsewhere), keys as
    ``module.model`` names them, a tied weight once (as save_pretrained writes it). Every rank must call it."""
    # an adapter is saved alone: the frozen base is never gathered
    options = dataclasses.replace(_FULL, ignore_frozen_params=is_adapter(module))
    return as_saved(module, get_model_state_dict(module, options=options))


def as_saved(module: TokenLoss, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``module``'s state dict keyed as ``module.model`` names it, a tied weight once (as save_pretrained writes it)."""
    aliases = {n for n, _ in module.model.named_parameters(remove_duplicate=False)} - {n for n, _ in module.model.named_parameters()}
    state = {k.removeprefix("model."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in aliases}


def saved_keys(module: TokenLoss, names) -> dict[str, str]:
    """The key each of ``names`` (``module``'s parameter names) is saved under in a checkpoint's safetensors → that
    name: the 'model.' prefix off, a tied alias dropped, and for an adapter its name taken out as PEFT saves it."""
    keys = as_saved(module, {name: name for name in names})
    if is_adapter(module):
        adapter = module.model.active_adapter
        keys = {k.replace(f".{adapter}", ""): name for k, name in keys.items()}
    return keys


def load_full_weights(module: TokenLoss, checkpoint: Path) -> None:
    """Put the weights saved in ``checkpoint`` (whole, as ``full_model_state`` gathered them) into the sharded
    ``module``: each rank reads the files and keeps its shards. Every rank must call it."""
    saved = saved_weights(checkpoint)
    names = saved_keys(module, get_model_state_dict(module, options=StateDictOptions(ignore_frozen_params=is_adapter(module))))
    if not saved.keys() <= names.keys():
        raise SftlabError(f"{checkpoint}: its weights do not belong to this model (e.g. {sorted(saved.keys() - names.keys())[0]})")
    set_model_state_dict(module, {names[k]: v for k, v in saved.items()}, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, whole, on the main process. Every rank must call it."""
    return get_optimizer_state_dict(module, _inner(optimizer), options=_FULL)


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict, sharded: bool) -> None:
    """Load an optimizer state saved by index (``optimizer.state_dict()``) or by name (FSDP) into ``optimizer``."""
    by_name = any(isinstance(p, str) for g in saved["param_groups"] for p in g["params"])
    names = _names_in_order(module, optimizer)
    if sharded:
        saved = saved if by_name else _renumber(saved, dict(enumerate(names)))
        set_optimizer_state_dict(module, _inner(optimizer), optim_state_dict=saved, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(_renumber(saved, {n: i for i, n in enumerate(names)}) if by_name else saved)


def save_sharded(module: TokenLoss, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Each rank writes its shards of the weights (an adapter's only) and of the optimizer state into ``directory``
    (``torch.distributed.checkpoint``): nothing is gathered. Every rank must call it."""
    options = StateDictOptions(ignore_frozen_params=is_adapter(module))
    weights, moments = get_state_dict(module, _inner(optimizer), options=options)
    dcp.save({"model": weights, "optimizer": moments}, checkpoint_id=str(directory))


def load_sharded(module: TokenLoss, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load a ``save_sharded`` checkpoint into ``module`` and ``optimizer``, sharded over any number of processes
    (torch.distributed.checkpoint reshards) or not sharded at all."""
    options = StateDictOptions(ignore_frozen_params=is_adapter(module), strict=False)
    weights, moments = get_state_dict(module, _inner(optimizer), options=options)
    dcp.load({"model": weights, "optimizer": moments}, checkpoint_id=str(directory), no_dist=not dist.is_initialized())
    set_state_dict(module, _inner(optimizer), model_state_dict=weights, optim_state_dict=moments, options=options)


def is_adapter(module: TokenLoss) -> bool:
    """Whether ``module`` trains a PEFT adapter (saved alone, without the frozen base)."""
    return hasattr(module.model, "peft_config")


def finite(params: list[torch.Tensor]) -> bool:
    """Whether this rank's part of ``params`` holds only finite numbers."""
    with torch.no_grad():
        return all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _names_in_order(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name (relative to the unwrapped TokenLoss) of each parameter the optimizer holds, in its order."""
    inner = getattr(module, "module", module)  # DDP
    names = {id(p): n for n, p in inner.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _renumber(saved: dict, key: dict) -> dict:
    """``saved`` with every parameter key (in ``state`` and in the groups) mapped through ``key``."""
    return {"state": {key[k]: v for k, v in saved["state"].items()},
            "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in saved["param_groups"]]}
