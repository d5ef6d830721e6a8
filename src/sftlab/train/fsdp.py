"""FSDP (``fsdp: true``): weights, gradients and optimizer states sharded across ranks with PyTorch's FSDP2.

``FSDP`` is the run's backend (``train/backend.py``); the rest of this module is what it does.

Each decoder layer is one unit (its weights are gathered for its forward and backward only) and the
rest (embeddings, final norm, head) is the root unit around ``TokenLoss``. Checkpoints hold the
full model or adapter, gathered to the main process, so they load anywhere; the optimizer state is
saved by parameter name (``torch.distributed.checkpoint``'s full state dict) and converted when a
run without FSDP resumes from it, or the other way round. With ``fsdp_state_dict_type: sharded`` each
rank writes its own shards instead (nothing gathered), which load resharded on any number of processes.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from sftlab.config import SFTConfig
from sftlab.data.render import IGNORE_INDEX
from sftlab.errors import SftlabError
from sftlab.model.loss import TokenLoss, base_model
from sftlab.train.backend import Backend, per_rank_dir, require_launch
from sftlab.train.checkpoint import (SHARDED_DIR, SavedState, as_saved, inner_optimizer, is_adapter, load_pt, optimizer_state_by_name,
                                     param_names, save_sharded, saved_keys, saved_weights)

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class FSDP(Backend):
    """The backend of an ``fsdp: true`` run (``fsdp_state_dict_type``: checkpoints gathered, or written per rank)."""

    sharded_weights = True

    def __init__(self, accelerator: Accelerator, precision: str, sharded_checkpoints: bool = False):
        super().__init__(accelerator)
        self.precision, self.sharded_checkpoints = precision, sharded_checkpoints

    @classmethod
    def for_run(cls, cfg: SFTConfig, precision: str) -> FSDP:
        require_launch("fsdp")
        return cls(Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available()), precision,
                   cfg.fsdp_state_dict_type == "sharded")

    def prepare(self, model, build_optimizer):
        module = shard(TokenLoss(model), self.precision)  # sharded first: the optimizer must hold the sharded parameters
        return module, self.accelerator.prepare(build_optimizer(model))

    def load_state(self, checkpoint: Path, module, optimizer) -> None:
        if (checkpoint / SHARDED_DIR).is_dir():
            return super().load_state(checkpoint, module, optimizer)
        saved = optimizer_state_by_name(load_pt(checkpoint, "optimizer.pt"), param_names(module, optimizer))
        set_optimizer_state_dict(module, inner_optimizer(optimizer), optim_state_dict=saved, options=StateDictOptions(full_state_dict=True))

    def gathered_weights(self, module) -> dict[str, torch.Tensor]:
        return full_model_state(module)

    def save_state(self, module, optimizer, staging: Path, weights: dict | None = None) -> SavedState:
        """Gathered to the main process; with sharded checkpoints each rank writes its shards into ``staging`` instead."""
        if self.sharded_checkpoints:
            save_sharded(module, optimizer, per_rank_dir(self, staging))
            self.wait()
            return SavedState(per_rank=(staging, SHARDED_DIR))
        weights = full_model_state(module) if weights is None else weights
        return SavedState(weights, full_optimizer_state(module, optimizer))

    def load_full_weights(self, module, checkpoint: Path) -> None:
        load_full_weights(module, checkpoint)

    def unsharded(self, module) -> AbstractContextManager:
        return root_unsharded(module)


def shard(module: TokenLoss, precision: str) -> TokenLoss:
    """Shard ``module`` in place: one FSDP unit per decoder layer, then the root. bf16 computes in bf16 and
    reduces gradients in fp32 (the master weights stay fp32)."""
    dtype = torch.bfloat16 if precision == "bf16" else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for layer in base_model(module.model).get_decoder().layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    base_model(module.model)._is_fsdp_managed_module = True  # transformers' generate then keeps the ranks in step (synced_gpus)
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
    return get_optimizer_state_dict(module, inner_optimizer(optimizer), options=_FULL)
