"""How a run's model is spread over its processes, and the few places where that changes a step or a checkpoint.

The loop (``train/loop.py``) and the chain (``train/run.py``) call only the methods of ``Backend`` and never ask
which backend they have. This base class is itself the backend of one process and of DDP: every rank holds the
whole model, accelerate wraps it and averages the gradients over the ranks. ``train/fsdp.py`` (``fsdp: true``) and
``train/deepspeed.py`` (``deepspeed: ds.json``) override what they do differently.
"""

from __future__ import annotations

import math
import os
import shutil
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from sftlab.config import SFTConfig
from sftlab.errors import SftlabError
from sftlab.model.loss import TokenLoss
from sftlab.train.checkpoint import (SHARDED_DIR, SavedState, holds_weights, load_pt, load_sharded, load_weights, optimizer_state_by_index,
                                     param_names)
from sftlab.train.launch import launched


class Backend:
    """One process or DDP; the interface every backend implements. Methods marked "every rank" are collective."""

    sharded_weights = False  # each rank holds only part of the weights: evaluation runs on every rank together
    lockstep_micro_batches = False  # every rank must run as many micro-batches per step as the others

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    @classmethod
    def for_run(cls, cfg: SFTConfig, precision: str) -> Backend:
        """The backend of a run, with its Accelerator. Without a GPU, accelerate runs the ranks of a launch as
        MULTI_CPU (gloo) only when told cpu=True."""
        return cls(Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available() and launched()))

    # --- the processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def wait(self) -> None:
        """Every rank: a barrier."""
        self.accelerator.wait_for_everyone()

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank: ``tensor`` summed over the ranks."""
        return self.accelerator.reduce(tensor, "sum")

    def any_rank(self, flag: bool) -> bool:
        """Every rank: whether ``flag`` is true on any rank (a signal may reach the ranks a step apart)."""
        if self.world_size == 1:
            return flag
        return bool(self.reduce_sum(torch.tensor(float(flag), device=self.device)) > 0)

    # --- training

    def prepare(self, model: torch.nn.Module, build_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]):
        """(module, optimizer): ``model`` inside ``TokenLoss``, wrapped for the processes, and its optimizer."""
        return self.accelerator.prepare(TokenLoss(model), build_optimizer(model))

    def unwrap(self, module: torch.nn.Module) -> TokenLoss:
        """The ``TokenLoss`` inside what ``prepare`` returned (``.model`` is the trained model)."""
        return self.accelerator.unwrap_model(module)

    def micro_batch(self, module: torch.nn.Module, last: bool) -> AbstractContextManager:
        """Around the forward and backward of one micro-batch: gradients are synchronised only after the step's last."""
        return nullcontext() if last else self.accelerator.no_sync(module)

    def backward(self, module: torch.nn.Module, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_gradients(self, module: torch.nn.Module, max_grad_norm: float) -> float:
        """The step's gradients are complete: clip them to ``max_grad_norm`` (0: no clipping) and return their norm
        before clipping (NaN when unknown). The update is ``optimizer_step``'s."""
        params = [p for p in module.parameters() if p.requires_grad]
        if max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if norm is None:
            return math.nan
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor when the gradients are sharded

    def optimizer_step(self, optimizer: torch.optim.Optimizer, apply: bool) -> None:
        """End the step: update the weights when ``apply`` (the step was finite), and zero the gradients."""
        if apply:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # --- checkpoints

    def load_weights(self, checkpoint: Path, model: torch.nn.Module) -> None:
        """Resuming: put the checkpoint's weights into the whole ``model``, before ``prepare``."""
        if holds_weights(checkpoint):
            load_weights(checkpoint, model)

    def load_state(self, checkpoint: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Resuming: the checkpoint's optimizer state into ``optimizer`` (saved by index, or by name under FSDP); a
        checkpoint written per rank (FSDP's sharded ones) holds the weights too, which load here, resharded or whole."""
        if (checkpoint / SHARDED_DIR).is_dir():
            load_sharded(self.unwrap(module), optimizer, checkpoint / SHARDED_DIR)
            return
        saved = load_pt(checkpoint, "optimizer.pt")
        optimizer.load_state_dict(optimizer_state_by_index(saved, param_names(self.unwrap(module), optimizer)))

    def gathered_weights(self, module: torch.nn.Module) -> dict | None:
        """Every rank: the weights to save, whole on the main process; None where the model's own parameters are them."""
        return None

    def save_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, staging: Path,
                   weights: dict | None = None) -> SavedState:
        """Every rank: what the main process needs to write a checkpoint; a backend whose ranks each write their part
        write it into ``staging``. ``weights``: already gathered (``gathered_weights``)."""
        return SavedState(weights)

    def load_full_weights(self, module: torch.nn.Module, checkpoint: Path) -> None:
        """Every rank: the whole weights saved in ``checkpoint`` into the prepared ``module`` (the best checkpoint,
        for the evaluation after training)."""
        load_weights(checkpoint, self.unwrap(module).model)

    def unsharded(self, module: torch.nn.Module) -> AbstractContextManager:
        """Every rank (with sharded weights): the model inside can be called directly (evaluation, generation)."""
        return nullcontext()


def per_rank_dir(backend: Backend, staging: Path) -> Path:
    """``staging`` emptied of what a crash left, ready for every rank to write its part into."""
    if backend.is_main:
        shutil.rmtree(staging, ignore_errors=True)
    backend.wait()
    return staging


def require_launch(key: str) -> None:
    """FSDP and DeepSpeed need a process group, which torchrun (or accelerate launch) sets up, even for one process."""
    if "LOCAL_RANK" not in os.environ:
        raise SftlabError(f"{key}: runs as a torchrun launch, also on one process; start it with sftlab train CONFIG [--nproc N] "
                          "(which launches itself), torchrun or accelerate launch")
