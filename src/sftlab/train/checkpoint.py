"""Checkpoints: written to a temporary directory, fsynced, then renamed into place.

A checkpoint holds the model (or LoRA adapter), tokenizer with the chat template used, the
resolved config, optimizer, scheduler, RNG states and the training position, so that resuming
reproduces the losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sftlab.config import SFTConfig, dump_config
from sftlab.errors import SftlabError
from sftlab.files import fsync_tree, replace_dir

STATE_FILE = "trainer_state.json"
ENGINE_DIR = "deepspeed"  # DeepSpeed's own optimizer state (sharded per rank), in place of optimizer.pt
ENGINE_TAG = "zero"  # the tag DeepSpeed files its state under, inside ENGINE_DIR
SHARDED_DIR = "fsdp"  # fsdp_state_dict_type sharded: weights and optimizer state as each rank wrote them, in place of both
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Where training is: optimizer steps done, tokens seen, the last and best eval loss."""

    step: int = 0
    tokens: int = 0
    epoch: float = 0.0
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0  # counted against early_stopping_patience
    skipped_steps: int = 0  # not applied because the loss or gradient was not finite (nan_policy: skip_step)
    early_stopped: bool = False
    effective_batch: int = 0  # per-device batch × accumulation × processes of the run that saved it (0: unknown)


def write_model_dir(target: Path, model, tokenizer, cfg: SFTConfig, extra=None, state_dict: dict | None = None,
                    weights: bool = True) -> None:
    """Atomically write ``target`` holding the model or adapter, tokenizer and config.yaml.

    ``extra(tmp_dir)`` may add files before the rename; ``state_dict`` replaces the model's own (FSDP
    gathers it: the model's parameters are shards); ``weights=False`` writes the model's (or adapter's)
    config without weights (they are elsewhere in ``target``). An existing ``target`` is replaced.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if not weights:
            (model.peft_config[model.active_adapter] if hasattr(model, "peft_config") else model.config).save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(tmp)
        (tmp / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        if extra is not None:
            extra(tmp)
        fsync_tree(tmp)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(output_dir: Path, model, tokenizer, cfg: SFTConfig, optimizer, scheduler, state: TrainState,
                    state_dict: dict | None = None, optimizer_state: dict | None = None,
                    per_rank: tuple[Path, str] | None = None) -> Path:
    """Write ``output_dir``/checkpoint-N atomically; ``state_dict`` and ``optimizer_state`` as gathered under FSDP;
    ``per_rank``: (a directory every rank wrote its part of the state to, its name in the checkpoint): DeepSpeed's
    optimizer state (``deepspeed/``) or FSDP's sharded weights and optimizer state (``fsdp/``, no safetensors then)."""
    def extra(tmp: Path) -> None:
        if per_rank is not None:  # the optimizer state is in there
            os.replace(per_rank[0], tmp / per_rank[1])
        else:
            torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(
            {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            tmp / "rng_state.pt",
        )
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")

    path = output_dir / f"checkpoint-{state.step}"
    write_model_dir(path, model, tokenizer, cfg, extra, state_dict, weights=per_rank is None or per_rank[1] != SHARDED_DIR)
    if cfg.save_total_limit:
        best = output_dir / f"checkpoint-{state.best_step}" if cfg.load_best_model_at_end and state.best_step else None
        for old in list_checkpoints(output_dir)[: -cfg.save_total_limit]:
            if old != best:  # the best one is kept for load_best_model_at_end, beyond the limit
                shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(cfg: SFTConfig, world_size: int) -> Path | None:
    """The checkpoint to resume from, per ``resume_from_checkpoint`` (a path, or true for the latest), checked to
    fit a run of ``cfg`` on ``world_size`` processes (a one-line error before anything is loaded if not)."""
    value = cfg.resume_from_checkpoint
    if value in (None, False, "false", ""):
        return None
    if value is True or value == "true":
        found = list_checkpoints(Path(cfg.output_dir))
        if not found:
            raise SftlabError(f"resume_from_checkpoint: true, but {cfg.output_dir} has no checkpoint; remove the key to start fresh")
        path = found[-1]
    else:
        path = Path(value)
        if not (path / STATE_FILE).is_file():
            raise SftlabError(f"resume_from_checkpoint: {path} is not a checkpoint directory (no {STATE_FILE})")
    _check_optimizer_state(path, bool(cfg.deepspeed), world_size)
    return path


def _check_optimizer_state(checkpoint: Path, deepspeed: bool, world_size: int) -> None:
    """Whether a run (under DeepSpeed or not, on ``world_size`` processes) can resume ``checkpoint``'s optimizer
    state; SftlabError if not. DeepSpeed's state is sharded per process."""
    saved = checkpoint / ENGINE_DIR
    if not deepspeed:
        if saved.is_dir() and not (checkpoint / "optimizer.pt").is_file():
            raise SftlabError(f"{checkpoint} holds DeepSpeed's optimizer state, sharded per process; resume it with deepspeed: set "
                              f"and as many processes as saved it, or start a new run from its weights")
        return
    if not saved.is_dir():
        raise SftlabError(f"{checkpoint} was not saved under deepspeed (no {ENGINE_DIR}/ with its optimizer state); "
                          f"resume it without deepspeed:, or start a new run from its weights")
    ranks = len(list((saved / ENGINE_TAG).glob("*optim_states.pt")))
    if ranks != world_size:
        raise SftlabError(f"{checkpoint} holds DeepSpeed optimizer state sharded over {ranks} process(es) and this run has "
                          f"{world_size}; resume it on {ranks}")


def holds_weights(path: Path) -> bool:
    """Whether checkpoint ``path`` holds its weights as safetensors (not: FSDP's sharded state, loaded with the optimizer)."""
    return not (path / SHARDED_DIR).is_dir()


def saved_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights (adapter or model) that checkpoint ``path`` holds, keyed as saved."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SftlabError(f"{path}: checkpoint has no weights (*.safetensors)")
    return {k: v for f in files for k, v in load_file(f).items()}


def load_weights(path: Path, model) -> None:
    """Load the trained weights (adapter or model) saved in checkpoint ``path`` into ``model``."""
    if (path / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    else:
        model.load_state_dict(saved_weights(path), strict=False)


def load_checkpoint(path: Path, module, optimizer, scheduler, sharded: bool = False, engine=None) -> TrainState:
    """Restore optimizer, scheduler and RNG states from ``path`` (the weights: ``load_weights``, before
    ``module`` is wrapped or sharded); return its TrainState. ``engine``: DeepSpeed's, which loads its own state
    (``find_checkpoint`` has said the checkpoint fits this run)."""
    from sftlab.train.sharding import load_optimizer_state, load_sharded
    from sftlab.train.zero import load_engine_state

    if engine is not None:
        load_engine_state(engine, path)
    elif (path / SHARDED_DIR).is_dir():  # weights and optimizer state, resharded to this run
        load_sharded(module, optimizer, path / SHARDED_DIR)
    else:
        load_optimizer_state(module, optimizer, torch.load(path / "optimizer.pt", weights_only=False), sharded)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / "rng_state.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = TrainState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
    state.early_stopped = False  # resuming an early-stopped run means training on
    return state
