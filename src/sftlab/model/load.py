"""Load the tokenizer and model, and make the right parameters trainable."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sftlab.config import SFTConfig
from sftlab.data.templates import resolve_template
from sftlab.errors import SftlabError
from sftlab.model.assets import resolve_model
from sftlab.model.attention import attention_implementation, use_flat_batches

log = logging.getLogger(__name__)


def load_tokenizer(cfg: SFTConfig, model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer with the chat template training will use set on it (so saving it saves the template).

    A pad token is added only when there is none; padding positions are masked by the attention mask
    and labels, so reusing EOS as pad never hides a trained EOS.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    if not tokenizer.is_fast:  # labels are placed through character offsets, which only fast tokenizers give
        raise SftlabError(f"{model_dir}: the tokenizer ({type(tokenizer).__name__}) has no fast version with offsets, "
                          "which exact label masking needs; convert it to a tokenizer.json (tokenizers library)")
    if cfg.stage == "sft":
        tokenizer.chat_template = resolve_template(cfg.template, tokenizer.chat_template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: SFTConfig, model_dir: Path, device: torch.device) -> PreTrainedModel:
    """The base model with the fine-tuning method applied: LoRA adapters, frozen layers, or all weights.

    Frozen base weights are kept in bf16/fp16 on a GPU when mixed precision is on (they get no
    optimizer state); everything trainable is fp32.
    """
    frozen_half = device.type == "cuda" and cfg.finetuning_type != "full" and (cfg.bf16 or cfg.fp16)
    dtype = (torch.bfloat16 if cfg.bf16 else torch.float16) if frozen_half else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            attn_implementation=attention_implementation(device, use_flat_batches(cfg, device.type)),
            trust_remote_code=cfg.trust_remote_code,
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise SftlabError(f"{model_dir}: this model needs its own code; set trust_remote_code: true if you trust it") from None
        raise
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if cfg.finetuning_type == "lora":
        model = _apply_lora(cfg, model)
    elif cfg.finetuning_type == "freeze":
        _freeze(cfg, model)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if cfg.torch_compile:  # per layer: small graphs, shared by all layers of the same shape
        for layer in decoder_layers(model):
            layer.compile()
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 (DeepSpeed ZeRO-3 loads each weight partitioned)
    n_train = sum(numel(p) for p in model.parameters() if p.requires_grad)
    n_all = sum(numel(p) for p in model.parameters())
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{n_train:,}", f"{n_all:,}", 100 * n_train / n_all)
    return model


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """Names (last path component) of every linear layer except the output head."""
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return sorted(names)


def _apply_lora(cfg: SFTConfig, model: PreTrainedModel) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    available = linear_module_names(model)
    if cfg.lora_target == "all":
        targets = available
    else:
        targets = list(cfg.lora_target)
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise SftlabError(f"lora_target: {', '.join(unknown)} not in this model; its linear layers are {', '.join(available)} (or use 'all')")
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (the longest ModuleList)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise SftlabError("finetuning_type: freeze needs a model with a list of decoder layers; use lora or full")
    return max(lists, key=len)


def _freeze(cfg: SFTConfig, model: PreTrainedModel) -> None:
    layers = decoder_layers(model)
    n = cfg.freeze_trainable_layers
    if n == 0 or abs(n) > len(layers):
        raise SftlabError(f"freeze_trainable_layers: {n} — this model has {len(layers)} layers; use 1..{len(layers)} (or negative for the first layers)")
    chosen = layers[-n:] if n > 0 else layers[:-n]
    model.requires_grad_(False)
    for layer in chosen:
        layer.requires_grad_(True)


# ---------------------------------------------------------------- inference (eval, chat, predict, export)


ADAPTER_CONFIG = "adapter_config.json"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class Trained:
    """What to load for inference: the base model, an optional LoRA adapter, and where the tokenizer (with the
    chat template used in training) comes from."""

    model_dir: Path
    adapter_dir: Path | None
    tokenizer_dir: Path
    template: str | None = None  # a built-in template replacing the tokenizer's own

    def describe(self) -> str:
        return f"{self.model_dir}" + (f" + adapter {self.adapter_dir}" if self.adapter_dir else "")


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file()


def _is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def _is_model(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHTS)


def locate_trained(model: str, adapter: str | None = None, template: str | None = None) -> Trained:
    """``model`` (a name, a model directory, or a training output_dir / checkpoint holding an adapter) and an
    optional ``adapter`` → what to load. The tokenizer comes from the adapter's directory when it saved one
    (it carries the chat template training used), else from the model.

    Raises SftlabError for an adapter directory without adapter_config.json, or two adapters given.
    """
    path = Path(model).expanduser()
    if path.is_dir() and _is_adapter(path) and not _is_model(path):  # a LoRA output_dir given as the model
        if adapter is not None:
            raise SftlabError(f"{path} is itself a LoRA adapter; give the base model with --model and the adapter with --adapter")
        adapter, model = str(path), _adapter_base(path)
    model_dir = resolve_model(model)
    adapter_dir = None
    if adapter is not None:
        adapter_dir = Path(adapter).expanduser()
        if not _is_adapter(adapter_dir):
            raise SftlabError(f"{adapter_dir}: not a LoRA adapter directory (no {ADAPTER_CONFIG}); "
                              "for a fully tuned model pass its directory as the model")
    tokenizer_dir = adapter_dir if adapter_dir is not None and _has_tokenizer(adapter_dir) else model_dir
    return Trained(model_dir, adapter_dir, tokenizer_dir, template)


def _adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on: the run's config.yaml, else adapter_config.json."""
    import json

    import yaml

    cfg = adapter_dir / "config.yaml"
    if cfg.is_file():
        base = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("model_name_or_path")
        if base:
            return str(base)
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise SftlabError(f"{adapter_dir}: the adapter does not name its base model; pass it with --model")
    return str(base)


def trained_from_config(cfg: SFTConfig, tuned: bool = True) -> Trained:
    """What a training config's run produced (``tuned``), or its base model (``tuned=False``).

    ``adapter_name_or_path`` wins; else a LoRA run's output_dir is the adapter, a full/freeze run's output_dir the
    model. Raises SftlabError when ``tuned`` and the run has not written its final model yet.
    """
    out = Path(cfg.output_dir)
    if not tuned:
        return Trained(resolve_model(cfg.model_name_or_path), None, resolve_model(cfg.model_name_or_path), cfg.template)
    adapter = cfg.adapter_name_or_path or (str(out) if cfg.finetuning_type == "lora" and _is_adapter(out) else None)
    if adapter is not None:
        found = locate_trained(cfg.model_name_or_path, adapter)
        saved = found.tokenizer_dir == found.adapter_dir  # training saved the tokenizer with the template it used
        return Trained(found.model_dir, found.adapter_dir, found.tokenizer_dir, None if saved else cfg.template)
    if cfg.finetuning_type != "lora" and _is_model(out):
        return Trained(out, None, out, None)
    raise SftlabError(f"output_dir {out} holds no trained {'adapter' if cfg.finetuning_type == 'lora' else 'model'} yet; "
                      "train first (sftlab train), or pass --model (and --adapter) to evaluate something else")


def inference_tokenizer(trained: Trained, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer with the chat template training used (or ``trained.template``), and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(trained.tokenizer_dir, trust_remote_code=trust_remote_code)
    tokenizer.chat_template = resolve_template(trained.template, tokenizer.chat_template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_for_inference(trained: Trained, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (with its adapter, not merged) in eval mode and the tokenizer (left padding, chat template set)."""
    tokenizer = inference_tokenizer(trained, trust_remote_code)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(trained.model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    if trained.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, trained.adapter_dir)
    model.config.use_cache = True
    return model.to(device).eval(), tokenizer
