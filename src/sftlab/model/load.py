"""Load the tokenizer and model, and make the right parameters trainable."""

from __future__ import annotations

import gc
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
from sftlab.model.quantize import Quantization, check_prequantized, quiet_bitsandbytes

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
        tokenizer.chat_template = resolve_template(cfg.template, tokenizer.chat_template, tokenizer, cfg.enable_thinking)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: SFTConfig, model_dir: Path, device: torch.device) -> PreTrainedModel:
    """The base model with the fine-tuning method applied: LoRA adapters, frozen layers, or all weights.

    Frozen base weights are kept in bf16/fp16 on a GPU when mixed precision is on (they get no
    optimizer state); everything trainable is fp32.
    """
    _check_lora_keys(cfg)  # before any weight loads
    check_prequantized(model_dir)
    frozen_half = device.type == "cuda" and cfg.finetuning_type != "full" and (cfg.bf16 or cfg.fp16)
    dtype = (torch.bfloat16 if cfg.bf16 else torch.float16) if frozen_half else torch.float32
    quant = Quantization.recorded(cfg)
    quantized = {} if quant is None else quant.load_kwargs(_precision_dtype(cfg), device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            attn_implementation=attention_implementation(device, use_flat_batches(cfg, device.type)),
            trust_remote_code=cfg.trust_remote_code,
            **quantized,
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise SftlabError(f"{model_dir}: this model needs its own code; set trust_remote_code: true if you trust it") from None
        raise
    if quant is not None:
        model = _prepare_quantized(model, quant)
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


def _precision_dtype(cfg: SFTConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32


def _prepare_quantized(model: PreTrainedModel, quant: Quantization) -> PreTrainedModel:
    """The quantized base made ready for LoRA as peft's ``prepare_model_for_kbit_training`` does (QLoRA's recipe, as
    LLaMA-Factory and TRL use it): every weight frozen, the ones left unquantized (norms, embeddings, the head) in
    fp32. Gradient checkpointing is applied after, as for any model."""
    from peft import prepare_model_for_kbit_training

    quiet_bitsandbytes()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    _unmap_weights_file(model)
    log.info("base model quantized to %s by bitsandbytes (frozen; LoRA trains in fp32)", quant.describe())
    return model


def _unmap_weights_file(model: PreTrainedModel) -> None:
    """A quantized base on the CPU: its weights left unquantized (norms, embeddings, the head) are views of the mapped
    safetensors file, which keeps every full-precision page read while quantizing in memory (0.4 of SmolLM2-135M's
    0.5 GB, measured). Copied out, the file is unmapped."""
    for p in model.parameters():
        if p.dtype.is_floating_point and p.device.type == "cpu":
            p.data = p.data.clone()
    gc.collect()


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """Names (last path component) of every linear layer except the output head."""
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return sorted(names)


def _names(value: str | list[str] | None) -> list[str]:
    """A comma-separated key (or a list) as a list of names."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [str(s).strip() for s in items if str(s).strip()]


_LORA_ONLY = ("use_dora", "use_rslora", "pissa_init", "pissa_convert", "additional_target", "adapter_name_or_path", "create_new_adapter")


def _check_lora_keys(cfg: SFTConfig) -> None:
    """The LoRA-variant keys that cannot work as set: SftlabError naming the key and what to do."""
    if cfg.finetuning_type != "lora":
        if given := [k for k in _LORA_ONLY if getattr(cfg, k)]:
            raise SftlabError(f"{', '.join(given)}: LoRA keys, and finetuning_type is {cfg.finetuning_type}; set finetuning_type: lora or remove them")
        return
    if cfg.pissa_init and not cfg.pissa_convert:
        raise SftlabError("pissa_init: true needs pissa_convert: true — a PiSSA adapter only reproduces the trained model on the "
                          "residual base, which is not saved; converted, it loads on the unchanged model (eval, chat, export)")
    if cfg.pissa_convert and not cfg.pissa_init:
        raise SftlabError("pissa_convert: true converts PiSSA adapters and pissa_init is false; set pissa_init: true or remove pissa_convert")
    if cfg.create_new_adapter and not cfg.adapter_name_or_path:
        raise SftlabError("create_new_adapter: true merges the adapters of adapter_name_or_path, and none is set; name them or remove create_new_adapter")
    out = Path(cfg.output_dir).resolve()
    if any(Path(a).expanduser().resolve() == out for a in _names(cfg.adapter_name_or_path)):
        raise SftlabError(f"adapter_name_or_path names this run's output_dir {cfg.output_dir}, which training replaces; "
                          "write the run to a new output_dir")
    if cfg.quantization_bit is not None and adapter_plan(cfg)[0]:
        raise SftlabError(f"adapter_name_or_path with quantization_bit: {cfg.quantization_bit}: merging adapters into quantized weights "
                          "rounds them away; name one adapter to continue training it (without create_new_adapter), or export the "
                          "merged model first (sftlab export) and train QLoRA on it")
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # the weights are partitioned when the adapter is applied
        if cfg.pissa_init:
            raise SftlabError("pissa_init under DeepSpeed ZeRO-3: the SVD needs whole weights; use ZeRO-2 or fsdp: true")
        if len(adapter_plan(cfg)[0]):
            raise SftlabError("adapter_name_or_path: merging adapters under DeepSpeed ZeRO-3 needs whole weights; "
                              "name one adapter (without create_new_adapter), or use ZeRO-2 or fsdp: true")


def _apply_lora(cfg: SFTConfig, model: PreTrainedModel) -> PreTrainedModel:
    """The model with its LoRA: a new one, or the last adapter of ``adapter_name_or_path`` trained on (after merging
    the others into the base; all of them with ``create_new_adapter``).

    A PiSSA model carries its initial adapter as ``model.pissa_initial`` (lora_A/lora_B as saved, on the CPU):
    saving converts against it (``pissa_to_lora``).
    """
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    merge, trained_on = adapter_plan(cfg)
    model = _merge_adapters(model, merge)
    if merge:
        log.info("merged %d adapter(s) into the base: %s", len(merge), ", ".join(map(str, merge)))
    if trained_on is not None:
        model = PeftModel.from_pretrained(model, trained_on, is_trainable=True)
        _say_adapter_settings(cfg, model, trained_on)
        return model

    available = linear_module_names(model)
    if cfg.lora_target == "all":
        targets = available
    else:
        targets = list(cfg.lora_target)
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise SftlabError(f"lora_target: {', '.join(unknown)} not in this model; its linear layers are {', '.join(available)} (or use 'all')")
    extra = _names(cfg.additional_target)
    if extra:
        modules = [name for name, _ in model.named_modules() if name]
        unknown = [t for t in extra if not any(n == t or n.endswith("." + t) for n in modules)]
        if unknown:
            names = sorted({n.rsplit(".", 1)[-1] for n in modules if not n.rsplit(".", 1)[-1].isdigit()})
            raise SftlabError(f"additional_target: {', '.join(unknown)} not in this model; its modules are {', '.join(names)}")
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=(("pissa" if cfg.pissa_iter == -1 else f"pissa_niter_{cfg.pissa_iter}") if cfg.pissa_init else True),
        modules_to_save=extra or None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.pissa_init:  # what saving converts against: the base now holds W - scaling·B0·A0
        model.pissa_initial = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()
                               if ".lora_A." in k or ".lora_B." in k}
    return model


def _merge_adapters(model: PreTrainedModel, adapters: list[Path]) -> PreTrainedModel:
    """``model`` with each of ``adapters`` merged into its weights, in order."""
    from peft import PeftModel

    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        untie_diverged(model)
    return model


def untie_diverged(model: PreTrainedModel) -> None:
    """After merging an adapter that trained the input or the output embedding (modules_to_save) of a model that ties
    them, the two are different tensors: the config says so, so that saving writes both and loading ties nothing."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    text = model.config.get_text_config()
    if getattr(text, "tie_word_embeddings", False) and inp is not None and out is not None and inp.weight is not out.weight:
        text.tie_word_embeddings = False
        model.config.tie_word_embeddings = False


def _say_adapter_settings(cfg: SFTConfig, model, adapter: Path) -> None:
    """One log line when the YAML's LoRA keys differ from those of the adapter training continues (which win)."""
    saved = model.peft_config[model.active_adapter]
    targets = linear_module_names(model.get_base_model()) if cfg.lora_target == "all" else list(cfg.lora_target)
    pissa = str(saved.init_lora_weights).startswith("pissa")
    pairs = [("lora_rank", cfg.lora_rank, saved.r), ("lora_alpha", cfg.alpha, saved.lora_alpha),
             ("lora_dropout", cfg.lora_dropout, saved.lora_dropout), ("use_dora", cfg.use_dora, bool(saved.use_dora)),
             ("use_rslora", cfg.use_rslora, bool(saved.use_rslora)), ("pissa_init", cfg.pissa_init, pissa),
             ("lora_target", sorted(targets), sorted(saved.target_modules or [])),
             ("additional_target", sorted(_names(cfg.additional_target)), sorted(saved.modules_to_save or []))]
    differ = [(k, mine, theirs) for k, mine, theirs in pairs if mine != theirs]
    if differ:
        log.info("continuing adapter %s with its own settings, not the YAML's: %s", adapter,
                 "; ".join(f"{k} {theirs} (YAML: {mine})" for k, mine, theirs in differ))


def pissa_to_lora(weights: dict[str, torch.Tensor], config: dict, initial: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A trained PiSSA adapter (saved ``weights`` and adapter_config ``config``) as a plain LoRA on the original base.

    The base holds W - s·B0·A0, so the trained model is W + s·(B·A - B0·A0) = W + s·[B | -B0]·[A ; A0]: rank 2r
    with the same scaling s (alpha doubled; × √2 under rslora), as peft's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` converts it. Every other tensor (DoRA's magnitude,
    modules_to_save, which peft's conversion leaves out) is kept as it is: it acts on the same effective weight.
    ``initial``: the adapter's lora_A/lora_B before training, keyed as saved.
    """
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise SftlabError("pissa_convert: adapters with rank_pattern/alpha_pattern cannot be converted")
    out = {}
    for key, value in weights.items():
        if ".lora_A." in key:
            value = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif ".lora_B." in key:
            value = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
        out[key] = value.contiguous()
    converted = {**config, "r": 2 * config["r"], "init_lora_weights": True,
                 "lora_alpha": config["lora_alpha"] * (2 ** 0.5 if config.get("use_rslora") else 2)}
    return out, converted


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
    template: str | None = None  # the template key it was trained with (a LLaMA-Factory name or builtin:NAME)
    merged: tuple[Path, ...] = ()  # adapters merged into the base, in order, before adapter_dir applies (what it was trained on)
    quantization: Quantization | None = None  # the base quantized as the adapter was trained on it (QLoRA)

    def describe(self) -> str:
        return (f"{self.model_dir}" + (f" ({self.quantization.describe()})" if self.quantization else "")
                + "".join(f" + merged {m}" for m in self.merged) + (f" + adapter {self.adapter_dir}" if self.adapter_dir else ""))


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file()


def _is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def _is_model(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHTS)


def locate_trained(model: str, adapter: str | None = None, template: str | None = None) -> Trained:
    """``model`` (a name, a model directory, or a training output_dir / checkpoint holding an adapter) and an
    optional ``adapter`` → what to load. The tokenizer comes from the adapter's directory when it saved one
    (it carries the chat template training used), else from the model. An adapter trained on top of merged
    adapters (its config.yaml says so) brings them (``Trained.merged``).

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
        adapter_dir = _adapter_dir(adapter, "adapter")
    tokenizer_dir = adapter_dir if adapter_dir is not None and _has_tokenizer(adapter_dir) else model_dir
    merged = tuple(merged_before(adapter_dir)) if adapter_dir is not None else ()
    quant = Quantization.recorded(_recorded(adapter_dir)) if adapter_dir is not None else None
    return Trained(model_dir, adapter_dir, tokenizer_dir, template, merged, quant)


def _adapter_dir(adapter: str | Path, key: str) -> Path:
    path = Path(adapter).expanduser()
    if not _is_adapter(path):
        raise SftlabError(f"{key}: {path} is not a LoRA adapter directory (no {ADAPTER_CONFIG}); "
                          "for a fully tuned model pass its directory as the model")
    return path


def _adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on: the run's config.yaml, else adapter_config.json."""
    import json

    base = _recorded(adapter_dir).get("model_name_or_path")
    if base:
        return str(base)
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise SftlabError(f"{adapter_dir}: the adapter does not name its base model; pass it with --model")
    return str(base)


def _recorded(run_dir: Path) -> dict:
    """The config.yaml training wrote into ``run_dir`` (an output_dir, a checkpoint), as a dict; {} if none."""
    import yaml

    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def _expand(adapters: list[str], seen: tuple[Path, ...] = ()) -> list[Path]:
    """Each adapter preceded by the adapters it was itself trained on (merged before it), in order."""
    out = []
    for name in adapters:
        path = _adapter_dir(name, "adapter_name_or_path")
        if path.resolve() in seen:
            raise SftlabError(f"adapter_name_or_path: {path} was trained on top of itself (its config.yaml); name another adapter")
        out += [*merged_before(path, (*seen, path.resolve())), path]
    return out


def merged_before(adapter_dir: Path, seen: tuple[Path, ...] = ()) -> list[Path]:
    """The adapters merged into the base, in order, before ``adapter_dir`` was trained (its config.yaml, from
    adapter_name_or_path and create_new_adapter); [] for an adapter trained on the plain base.

    Recorded paths are read as training wrote them (relative ones from the current directory, like
    model_name_or_path); SftlabError when one is not there."""
    rec = _recorded(adapter_dir)
    listed = _names(rec.get("adapter_name_or_path"))
    if not (listed and rec.get("do_train", True) and rec.get("finetuning_type", "lora") == "lora"):
        return []
    missing = [a for a in listed if not _is_adapter(Path(a).expanduser())]
    if missing:
        raise SftlabError(f"{adapter_dir} was trained on top of adapter {missing[0]} (its config.yaml), which is not there; "
                          "run from the directory training ran in, or put that adapter back")
    chain = _expand(listed, (*seen, adapter_dir.resolve()))
    return chain if rec.get("create_new_adapter") else chain[:-1]


def adapter_plan(cfg: SFTConfig) -> tuple[list[Path], Path | None]:
    """Training from ``adapter_name_or_path`` (LLaMA-Factory's meaning): (the adapters merged into the base, in
    order; the adapter trained on, or None for a new LoRA). Several adapters: all but the last merged, the last
    trained on; ``create_new_adapter``: all merged. An adapter trained on merged adapters brings them first."""
    chain = _expand(_names(cfg.adapter_name_or_path))
    if not chain:
        return [], None
    return (chain, None) if cfg.create_new_adapter else (chain[:-1], chain[-1])


def _trained_from_adapters(cfg: SFTConfig) -> bool:
    """Whether ``cfg`` trains from its adapter_name_or_path: its output_dir holds a run (config.yaml) that trained
    from the same adapters. Otherwise a config naming adapters is an inference config (LLaMA-Factory's
    inference/merge YAMLs), whose adapters are what eval, chat and export load."""
    listed = _names(cfg.adapter_name_or_path)
    rec = _recorded(Path(cfg.output_dir))
    return (bool(listed) and rec.get("do_train", True) and rec.get("finetuning_type", "lora") == "lora"
            and _names(rec.get("adapter_name_or_path")) == listed)


def trained_from_config(cfg: SFTConfig, tuned: bool = True) -> Trained:
    """What a training config's run produced (``tuned``), or what it started from (``tuned=False``: the base
    model, with the adapters it trained from when it did).

    A config that names ``adapter_name_or_path`` and did not train from it (no run of it in output_dir) loads those
    adapters (the last one on top of the others merged); else a LoRA run's output_dir is the adapter (with the
    adapters it was trained on merged first), a full/freeze run's output_dir the model. Raises SftlabError when
    ``tuned`` and the run has not written its final model yet.
    """
    out = Path(cfg.output_dir)
    base = resolve_model(cfg.model_name_or_path)
    listed = _names(cfg.adapter_name_or_path)
    from_adapters = cfg.finetuning_type == "lora" and _trained_from_adapters(cfg)
    if not tuned:
        merge, start = adapter_plan(cfg) if from_adapters else ([], None)
        return Trained(base, start, base, cfg.template, tuple(merge), Quantization.recorded(cfg))
    adapter = None
    if listed and not from_adapters:
        chain = _expand(listed)
        adapter, merged = chain[-1], tuple(chain[:-1])
    elif cfg.finetuning_type == "lora" and _is_adapter(out):
        adapter, merged = out, tuple(merged_before(out))
    if adapter is not None:
        saved = _has_tokenizer(adapter)  # training saved the tokenizer with the template it used
        quant = Quantization.recorded(_recorded(adapter) or cfg)  # as the adapter's run trained it, else as this config says
        return Trained(base, adapter, adapter if saved else base, None if saved else cfg.template, merged, quant)
    if cfg.finetuning_type != "lora" and _is_model(out):
        return Trained(out, None, out, None)
    raise SftlabError(f"output_dir {out} holds no trained {'adapter' if cfg.finetuning_type == 'lora' else 'model'} yet; "
                      "train first (sftlab train), or pass --model (and --adapter) to evaluate something else")


def inference_tokenizer(trained: Trained, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer with the chat template training used (or ``trained.template``), and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(trained.tokenizer_dir, trust_remote_code=trust_remote_code)
    tokenizer.chat_template = resolve_template(trained.template, tokenizer.chat_template, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_for_inference(trained: Trained, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (the adapters it was trained on merged, its own adapter not) in eval mode and the tokenizer (left
    padding, chat template set)."""
    tokenizer = inference_tokenizer(trained, trust_remote_code)
    tokenizer.padding_side = "left"
    quant = trained.quantization
    quantized = {} if quant is None else quant.load_kwargs(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(trained.model_dir, dtype=dtype, trust_remote_code=trust_remote_code, **quantized)
    if quant is not None:
        quiet_bitsandbytes()
        _unmap_weights_file(model)
    model = _merge_adapters(model, list(trained.merged))
    if trained.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, trained.adapter_dir)
    model.config.use_cache = True
    return (model if quant is not None else model.to(device)).eval(), tokenizer
