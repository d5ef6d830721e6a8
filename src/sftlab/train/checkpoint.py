"""Checkpoints: written to a temporary directory, fsynced, then renamed into place.

A checkpoint holds the model (or LoRA adapter), tokenizer with the chat template used, the
resolved config, optimizer, scheduler, RNG states and the training position, so that resuming
reproduces the losses of an uninterrupted run.

This module knows the layout of a checkpoint and nothing of how the weights are spread over
processes: what a backend (``train/backend.py``) gathers or writes per rank reaches it as a
``SavedState``, and resuming asks the backend to load its own part (``Backend.load_state``).

Every checkpoint ends with a manifest (each file's size and xxh3-128 hash, per-rank state included), written last;
resuming picks the newest checkpoint that verifies against it, and a file that fails to load is named in one line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from sftlab.config import SFTConfig, dump_config
from sftlab.errors import SftlabError
from sftlab.files import fsync_tree, replace_dir
from sftlab.model.load import pissa_to_lora

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"  # written last: every other file's size and hash
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PISSA_DIR = "pissa"  # a PiSSA checkpoint's unconverted adapter (on the residual base), which resuming loads
ENGINE_DIR = "deepspeed"  # DeepSpeed's own optimizer state (sharded per rank), in place of optimizer.pt
ENGINE_TAG = "zero"  # the tag DeepSpeed files its state under, inside ENGINE_DIR
SHARDED_DIR = "fsdp"  # fsdp_state_dict_type sharded: weights and optimizer state as each rank wrote them, in place of both
_CKPT = re.compile(r"^checkpoint-(\d+)$")
# what a killed run leaves in output_dir: write_model_dir's temporary directories, replace_dir's moved-aside ones,
# the per-rank staging of a checkpoint and publish_final's staging
_LEFTOVER = re.compile(r"^\.(checkpoint-\d+\.(tmp-.+|per-rank|old-\d+)|\.final-staging\.(tmp-.+|old-\d+)|final-staging)$")


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
    train_samples: int = 0  # the train set the steps so far covered (0: unknown, saved by an older sftlab)
    data_fingerprint: str = ""  # its samples' lengths in order, hashed (``data_fingerprint``)


def write_model_dir(target: Path, model, tokenizer, cfg: SFTConfig, extra=None, state_dict: dict | None = None,
                    weights: bool = True, resumable: bool = False) -> None:
    """Atomically write ``target`` holding the model or adapter, tokenizer and config.yaml.

    ``extra(tmp_dir)`` may add files before the rename; ``state_dict`` replaces the model's own (FSDP
    gathers it: the model's parameters are shards); ``weights=False`` writes the model's (or adapter's)
    config without weights (they are elsewhere in ``target``). An existing ``target`` is replaced.
    A PiSSA adapter (pissa_convert) is written converted to a plain LoRA on the original base; ``resumable``
    (a checkpoint) also keeps its PiSSA form in ``PISSA_DIR``, which resuming loads, and ends with a MANIFEST.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if not weights:
            (model.peft_config[model.active_adapter] if hasattr(model, "peft_config") else model.config).save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
            if getattr(model, "pissa_initial", None) is not None:
                _convert_pissa(tmp, model.pissa_initial, resumable)
        tokenizer.save_pretrained(tmp)
        (tmp / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        if extra is not None:
            extra(tmp)
        if resumable:
            write_manifest(tmp)
        fsync_tree(tmp)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_pissa(adapter_dir: Path, initial: dict[str, torch.Tensor], keep: bool) -> None:
    """Replace the PiSSA adapter saved in ``adapter_dir`` by its plain-LoRA form (``pissa_to_lora``); ``keep``: move
    the PiSSA form into ``adapter_dir``/PISSA_DIR first."""
    weights_file, config_file = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / "adapter_config.json"
    weights, config = load_file(weights_file), json.loads(config_file.read_text(encoding="utf-8"))
    if keep:
        (adapter_dir / PISSA_DIR).mkdir()
        for f in (weights_file, config_file):
            os.replace(f, adapter_dir / PISSA_DIR / f.name)
    weights, config = pissa_to_lora(weights, config, initial)
    save_file(weights, weights_file, metadata={"format": "pt"})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def _weights_dir(path: Path) -> Path:
    """Where checkpoint ``path`` keeps the weights training resumes from: its PiSSA form when it has one."""
    return path / PISSA_DIR if (path / PISSA_DIR / ADAPTER_WEIGHTS).is_file() else path


class SavedState(NamedTuple):
    """What every rank's backend prepared for the checkpoint the main process writes (``Backend.save_state``)."""

    weights: dict | None = None  # gathered weights to write instead of the model's own (sharded or half-precision models)
    optimizer_state: dict | None = None  # gathered optimizer state (FSDP) instead of ``optimizer.state_dict()``
    per_rank: tuple[Path, str] | None = None  # (a directory every rank wrote its part of the state to, its name in the checkpoint)


def save_checkpoint(output_dir: Path, model, tokenizer, cfg: SFTConfig, optimizer, scheduler, state: TrainState,
                    saved: SavedState = SavedState()) -> Path:
    """Write ``output_dir``/checkpoint-N atomically from what the ranks prepared (``saved``): a ``per_rank`` directory
    holds the optimizer state (DeepSpeed's ``deepspeed/``; FSDP's sharded ``fsdp/``, which holds the weights too,
    so no safetensors are written then)."""
    def extra(tmp: Path) -> None:
        if saved.per_rank is not None:  # the optimizer state is in there
            os.replace(saved.per_rank[0], tmp / saved.per_rank[1])
        else:
            _save_pt(saved.optimizer_state if saved.optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        _save_pt(scheduler.state_dict(), tmp / "scheduler.pt")
        _save_pt(
            {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            tmp / "rng_state.pt",
        )
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")

    path = output_dir / f"checkpoint-{state.step}"
    weights = saved.per_rank is None or saved.per_rank[1] != SHARDED_DIR
    write_model_dir(path, model, tokenizer, cfg, extra, saved.weights, weights=weights, resumable=True)
    if cfg.save_total_limit:
        best = output_dir / f"checkpoint-{state.best_step}" if cfg.load_best_model_at_end and state.best_step else None
        # checkpoints past this step (left by a run resumed from an earlier one, e.g. past a damaged one) neither count
        # nor go: counted, they could push out the one just written; this run replaces each when it gets there
        earlier = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) <= state.step]
        for old in earlier[: -cfg.save_total_limit]:
            if old != best:  # the best one is kept for load_best_model_at_end, beyond the limit
                shutil.rmtree(old, ignore_errors=True)
    return path


def _save_pt(obj, path: Path) -> None:
    """torch.save through a Python file, so that a refused write keeps its OSError (torch.save to a path raises a
    RuntimeError without the errno; through a file the OSError is its __context__, which ``saving`` reads)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


class Checkpointer:
    """Writes the checkpoints of one run. Every rank calls ``save`` (its backend gathers or writes its part); the main
    process writes the directory."""

    def __init__(self, output_dir: Path, backend, module, optimizer, scheduler, tokenizer, cfg: SFTConfig):
        self.output_dir, self.backend, self.module, self.optimizer, self.scheduler = output_dir, backend, module, optimizer, scheduler
        self.tokenizer, self.cfg = tokenizer, cfg

    def save(self, state: TrainState, weights: dict | None = None) -> Path:
        """Checkpoint ``state``; ``weights``: already gathered on every rank (``Backend.gathered_weights``), else gathered here."""
        staging = self.output_dir / f".checkpoint-{state.step}.per-rank"
        with saving(f"checkpoint-{state.step}", self.output_dir, lambda: _size_of(latest_checkpoint(self.output_dir)),
                    staging if self.backend.is_main else None):
            saved = self.backend.save_state(self.module, self.optimizer, staging, weights)
            if self.backend.is_main:
                model = self.backend.unwrap(self.module).model
                save_checkpoint(self.output_dir, model, self.tokenizer, self.cfg, self.optimizer, self.scheduler, state, saved)
        self.backend.wait()
        return self.output_dir / f"checkpoint-{state.step}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    """The step of checkpoint ``path`` (checkpoint-N), by its name."""
    return int(_CKPT.match(path.name).group(1))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def find_checkpoint(cfg: SFTConfig, world_size: int) -> Path | None:
    """The checkpoint to resume from, per ``resume_from_checkpoint`` (a path, or true for the newest that verifies
    against its manifest; each newer one skipped is logged with why), checked to fit a run of ``cfg`` on
    ``world_size`` processes. A one-line SftlabError before anything is loaded if none fits or the path fails to verify."""
    value = cfg.resume_from_checkpoint
    if value in (None, False, "false", ""):
        return None
    if value is True or value == "true":
        found = list_checkpoints(Path(cfg.output_dir))
        if not found:
            metrics = Path(cfg.output_dir) / "metrics.jsonl"
            if metrics.is_file() and metrics.stat().st_size:  # a run that stopped before its first checkpoint
                raise SftlabError(f"resume_from_checkpoint: true, but {cfg.output_dir} has no checkpoint (its run stopped before "
                                  "the first one); start over with overwrite_output_dir: true and no resume_from_checkpoint")
            raise SftlabError(f"resume_from_checkpoint: true, but {cfg.output_dir} has no checkpoint; remove the key to start fresh")
        path, skipped, tell = None, [], os.environ.get("RANK", "0") == "0"  # every rank looks; one says
        for candidate in reversed(found):
            problem = verify_checkpoint(candidate)
            if problem is None:
                path = candidate
                break
            skipped.append(f"{candidate.name}: {problem}")
            if tell:
                log.warning("%s skipped: %s", candidate.name, problem)
        if path is None:
            raise SftlabError(f"resume_from_checkpoint: true, but no checkpoint in {cfg.output_dir} verifies ({'; '.join(skipped)}); "
                              "copy good ones back, or start over with overwrite_output_dir: true and no resume_from_checkpoint")
        if skipped and tell:
            log.warning("resuming from %s, the newest checkpoint that verifies", path.name)
    else:
        path = Path(value)
        if not (path / STATE_FILE).is_file():
            raise SftlabError(f"resume_from_checkpoint: {path} is not a checkpoint directory (no {STATE_FILE})")
        problem = verify_checkpoint(path)
        if problem is not None:
            raise SftlabError(f"resume_from_checkpoint: {path} is damaged: {problem}; {_instead(path, hashes=True)}")
    if not (path / MANIFEST).is_file():
        log.info("%s has no %s (saved by an older sftlab): resuming without verifying it", path, MANIFEST)
    _check_optimizer_state(path, bool(cfg.deepspeed), world_size)
    return path


# --- manifests: what a checkpoint held when it was written ---------------------------------------------------------


def write_manifest(directory: Path) -> None:
    """Write ``directory``/MANIFEST: every file under it (per-rank state included) by relative path, with its size
    and xxh3-128 hash. Written last, so a checkpoint with a manifest was written to the end."""
    files = {f.relative_to(directory).as_posix(): {"size": f.stat().st_size, "xxh3_128": _hash(f)}
             for f in sorted(directory.rglob("*")) if f.is_file() and f.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")


def _hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: Path, hashes: bool = True) -> str | None:
    """What is wrong with checkpoint ``path`` by its MANIFEST (a file missing, of another size, or with ``hashes``
    other bytes: "optimizer.pt is 12 bytes, the manifest says 3456"); None when it verifies or has no manifest (an
    older sftlab's, taken as it is). Sizes are checked first (a stat each), then hashes (one read, ~7 GB/s cached)."""
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        entries = [(name, int(e["size"]), str(e["xxh3_128"])) for name, e in files.items()]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} cannot be read"
    for name, size, _ in entries:
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing (the manifest lists it)"
        if actual != size:
            return f"{name} is {actual} bytes, the manifest says {size}"
    for name, _, digest in entries if hashes else []:
        if _hash(path / name) != digest:
            return f"{name} does not match its hash in the manifest (its bytes changed after it was saved)"
    return None


def _instead(damaged: Path, hashes: bool = False) -> str:
    """What to resume from instead of checkpoint ``damaged``: the newest other checkpoint beside it that verifies."""
    for other in reversed(list_checkpoints(damaged.parent)):
        if other.resolve() != damaged.resolve() and verify_checkpoint(other, hashes) is None:
            if (other / MANIFEST).is_file():
                return f"resume from the newest good checkpoint instead: resume_from_checkpoint: {other}"
            return f"try the newest other checkpoint (it has no manifest to verify it by): resume_from_checkpoint: {other}"
    return f"no other checkpoint in {damaged.parent} verifies: remove resume_from_checkpoint to start over"


@contextmanager
def reading(checkpoint: Path, file: Path) -> Iterator[None]:
    """Around reading ``file`` of ``checkpoint`` to resume: any failure (a truncated or overwritten file that no
    manifest vouched for) becomes a one-line SftlabError naming it and the newest other checkpoint to try."""
    try:
        yield
    except SftlabError:
        raise
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SftlabError(f"{file} cannot be read ({why}): the checkpoint is damaged; {_instead(checkpoint)}") from e


def load_pt(checkpoint: Path, name: str):
    """``checkpoint``/``name`` (a torch.save file), read under ``reading``."""
    with reading(checkpoint, checkpoint / name):
        return torch.load(checkpoint / name, weights_only=False)


def _load_safetensors(checkpoint: Path, file: Path) -> dict[str, torch.Tensor]:
    with reading(checkpoint, file):
        return load_file(file)


# --- what a stopped run leaves, and saving when the disk refuses ------------------------------------------------------


def sweep_leftovers(output_dir: Path) -> list[str]:
    """Remove the temporary directories a killed run left in ``output_dir`` (``.checkpoint-N.tmp-*``,
    ``.checkpoint-N.per-rank``, ``.checkpoint-N.old-PID``, ``.final-staging``); returns their names, logged. Only
    the process that owns ``output_dir`` may call it (another run's writes in progress look the same)."""
    gone = sorted(p.name for p in output_dir.iterdir() if _LEFTOVER.match(p.name)) if output_dir.is_dir() else []
    for name in gone:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if gone:
        log.info("removed what a stopped run left in %s: %s", output_dir, ", ".join(gone))
    return gone


_REFUSED = {errno.ENOSPC: "free that much there (a lower save_total_limit keeps fewer checkpoints) or set output_dir elsewhere",
            errno.EDQUOT: "free that much of your quota there or set output_dir elsewhere",
            errno.EROFS: "make it writable or set output_dir elsewhere",
            errno.EACCES: "make it writable by this user or set output_dir elsewhere"}


@contextmanager
def saving(what: str, directory: Path, needed: Callable[[], int | None] = lambda: None,
           staging: Path | None = None) -> Iterator[None]:
    """Around writing ``what`` (e.g. "checkpoint-6") into ``directory``: ``staging`` (a directory the write fills
    before publishing) is removed on any failure, and a write the file system refused (ENOSPC, EDQUOT, EROFS,
    EACCES) becomes a one-line SftlabError with its strerror, ``needed()`` bytes (an estimate, or None) and what to
    free. Whatever was saved before is untouched: checkpoints are written aside and renamed into place."""
    try:
        yield
    except Exception as e:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        code = refused_errno(e)
        if code is None:
            raise
        size = needed()
        need = f"it needs about {size / 1e6:.1f} MB; " if size else ""
        advice = _REFUSED[code] if size else _REFUSED[code].replace("free that much", "free space")
        raise SftlabError(f"cannot save {what} in {directory}: {os.strerror(code)}; {need}{advice}, then resume with "
                          "resume_from_checkpoint: true (the checkpoints saved before are intact)") from e


def refused_errno(error: BaseException) -> int | None:
    """The errno of ``_REFUSED`` behind ``error``: an OSError's, one in its chain (torch.save through a file), or the
    "(os error N)" that safetensors' SafetensorError carries in its message; None for any other failure."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _REFUSED:
            return error.errno
        if not isinstance(error, OSError) and (m := re.search(r"\(os error (\d+)\)", str(error))) and int(m.group(1)) in _REFUSED:
            return int(m.group(1))
        error = error.__cause__ or error.__context__
    return None


def _size_of(path: Path | None) -> int | None:
    """The bytes of the files under ``path`` (None for None)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path is not None else None


def weights_size(path: Path) -> int | None:
    """The bytes of the weight files (safetensors) of checkpoint ``path``: about what the final model needs."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors*")) or None if path.is_dir() else None


# --- the data a run trains on, as far as resuming needs to know ------------------------------------------------------


def data_fingerprint(train) -> str:
    """A hash of the lengths of ``train``'s samples (a ``datasets.Dataset``) in its order, from Arrow's list offsets
    and the indices mapping (no token is read): it changes when samples are added, removed, reordered or re-encoded
    to other lengths, which is what moves the samples a resumed step covers."""
    lengths = pc.list_value_length(train.data.column("input_ids"))
    indices = getattr(train, "_indices", None)  # a select/filter/split maps rows without copying them
    if indices is not None:
        lengths = lengths.take(indices.column(0))
    return xxhash.xxh3_64_hexdigest(lengths.to_numpy().astype(np.int64).tobytes())


def check_data(saved: TrainState, checkpoint: Path, train_samples: int, fingerprint: str) -> None:
    """Warn in one line when the train set of this run is not the one ``checkpoint`` was trained on (``saved``):
    users do this on purpose, so it is not an error."""
    if not saved.data_fingerprint or saved.data_fingerprint == fingerprint:
        return
    counts = (f"{saved.train_samples} samples then and now, of other lengths or in another order" if saved.train_samples == train_samples
              else f"{saved.train_samples} samples then, {train_samples} now")
    log.warning("the training data changed since %s was saved (%s): the remaining steps cover the new data, so some "
                "samples may repeat or be skipped", checkpoint.name, counts)


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
    """The weights (adapter or model) that checkpoint ``path`` holds, keyed as saved (a PiSSA adapter's PiSSA form)."""
    files = sorted(_weights_dir(path).glob("*.safetensors"))
    if not files:
        raise SftlabError(f"{_weights_dir(path)}: checkpoint has no weights (*.safetensors)")
    return {k: v for f in files for k, v in _load_safetensors(path, f).items()}


def load_weights(path: Path, model) -> None:
    """Load the trained weights (adapter or model) saved in checkpoint ``path`` into ``model``."""
    if (path / PISSA_DIR).is_dir() != (getattr(model, "pissa_initial", None) is not None):  # base weights differ between the two
        raise SftlabError(f"{path} was trained with pissa_init: {str((path / PISSA_DIR).is_dir()).lower()}; resume it with the same")
    weights = _weights_dir(path)
    if (weights / ADAPTER_WEIGHTS).is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, _load_safetensors(path, weights / ADAPTER_WEIGHTS))
        if result.unexpected_keys:
            raise SftlabError(f"{weights}: its adapter does not fit this model (e.g. {result.unexpected_keys[0]}); "
                              "resume with the LoRA keys it was trained with")
    else:
        model.load_state_dict(saved_weights(path), strict=False)


def load_checkpoint(path: Path, backend, module, optimizer, scheduler) -> TrainState:
    """Restore the optimizer state (through ``backend.load_state``, which knows how its ranks hold it), scheduler and
    RNG states from ``path``; return its TrainState. The weights were loaded before ``module`` was prepared
    (``Backend.load_weights``); ``find_checkpoint`` has said the checkpoint fits this run."""
    with reading(path, path / STATE_FILE):
        state = TrainState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
    backend.load_state(path, module, optimizer)
    scheduler.load_state_dict(load_pt(path, "scheduler.pt"))
    rng = load_pt(path, "rng_state.pt")
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state.early_stopped = False  # resuming an early-stopped run means training on
    return state


# --- keys: how a checkpoint names what a (wrapped, sharded or adapter) model holds ---------------------------------


def is_adapter(module) -> bool:
    """Whether ``module`` (a ``TokenLoss``) trains a PEFT adapter (saved alone, without the frozen base)."""
    return hasattr(module.model, "peft_config")


def as_saved(module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``module``'s (a ``TokenLoss``) state dict keyed as ``module.model`` names it, a tied weight once (as
    save_pretrained writes it)."""
    aliases = {n for n, _ in module.model.named_parameters(remove_duplicate=False)} - {n for n, _ in module.model.named_parameters()}
    state = {k.removeprefix("model."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in aliases}


def saved_keys(module, names) -> dict[str, str]:
    """The key each of ``names`` (``module``'s parameter names) is saved under in a checkpoint's safetensors → that
    name: the 'model.' prefix off, a tied alias dropped, and for an adapter its name taken out as PEFT saves it."""
    keys = as_saved(module, {name: name for name in names})
    if is_adapter(module):  # peft's own renaming (adapter name, DoRA's magnitude, modules_to_save), traced by identity
        from peft import get_peft_model_state_dict

        tokens = {key: torch.empty(0) for key in keys}
        name_of = {id(t): keys[key] for key, t in tokens.items()}
        saved = get_peft_model_state_dict(module.model, state_dict=tokens, adapter_name=module.model.active_adapter,
                                          save_embedding_layers=False)
        keys = {key: name_of[id(t)] for key, t in saved.items()}
    return keys


def param_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name (relative to the unwrapped TokenLoss) of each parameter the optimizer holds, in its order."""
    inner = getattr(module, "module", module)  # DDP
    names = {id(p): n for n, p in inner.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state_by_index(saved: dict, names: list[str]) -> dict:
    """An optimizer state saved by index (``optimizer.state_dict()``) or by parameter name (FSDP), keyed by index;
    ``names``: the parameters in the optimizer's order (``param_names``)."""
    return _renumber(saved, {n: i for i, n in enumerate(names)}) if _by_name(saved) else saved


def optimizer_state_by_name(saved: dict, names: list[str]) -> dict:
    """An optimizer state saved by index or by parameter name, keyed by name (as FSDP loads it)."""
    return saved if _by_name(saved) else _renumber(saved, dict(enumerate(names)))


def _by_name(saved: dict) -> bool:
    return any(isinstance(p, str) for g in saved["param_groups"] for p in g["params"])


def _renumber(saved: dict, key: dict) -> dict:
    """``saved`` with every parameter key (in ``state`` and in the groups) mapped through ``key``."""
    return {"state": {key[k]: v for k, v in saved["state"].items()},
            "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in saved["param_groups"]]}


# --- sharded state: each rank writes its part with torch.distributed.checkpoint; loads resharded, or whole ---------------


def save_sharded(module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Each rank writes its shards of the weights (an adapter's only) and of the optimizer state into ``directory``
    (``torch.distributed.checkpoint``): nothing is gathered. Every rank must call it."""
    options = StateDictOptions(ignore_frozen_params=is_adapter(module))
    weights, moments = get_state_dict(module, inner_optimizer(optimizer), options=options)
    dcp.save({"model": weights, "optimizer": moments}, checkpoint_id=str(directory))


def load_sharded(module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load a ``save_sharded`` checkpoint into ``module`` and ``optimizer``, sharded over any number of processes
    (torch.distributed.checkpoint reshards) or not sharded at all."""
    options = StateDictOptions(ignore_frozen_params=is_adapter(module), strict=False)
    weights, moments = get_state_dict(module, inner_optimizer(optimizer), options=options)
    dcp.load({"model": weights, "optimizer": moments}, checkpoint_id=str(directory), no_dist=not dist.is_initialized())
    set_state_dict(module, inner_optimizer(optimizer), model_state_dict=weights, optim_state_dict=moments, options=options)


def inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one

