"""The optimizer, the learning-rate schedule and NEFTune of a run, built from the keys the Hugging Face Trainer and
LLaMA-Factory use for them (optim, adam_beta1/adam_beta2/adam_epsilon, weight_decay, lr_scheduler_type and
lr_scheduler_kwargs, loraplus_lr_ratio, neftune_noise_alpha), with the same meaning."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import get_scheduler

from sftlab.config import SFTConfig
from sftlab.errors import SftlabError

log = logging.getLogger(__name__)

EIGHT_BIT = {"adamw_8bit": "AdamW8bit", "adamw_bnb_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}  # bitsandbytes classes


def build_optimizer(cfg: SFTConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``cfg.optim`` over the trainable parameters of ``model`` (``param_groups``: weight decay, LoRA+ rates).

    adamw_torch / adamw_torch_fused / the 8-bit AdamWs take adam_beta1, adam_beta2 and adam_epsilon; adafactor and sgd
    only the learning rate, as in the HF Trainer. Raises SftlabError when an 8-bit optimizer's bitsandbytes is missing.
    """
    groups = param_groups(cfg, model)
    lr, adam = cfg.learning_rate, {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if cfg.optim == "adamw_torch":
        return torch.optim.AdamW(groups, lr=lr, **adam)
    if cfg.optim == "adamw_torch_fused":
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True, **adam)
        except RuntimeError as e:  # torch refuses fused kernels for a device or dtype it has none for
            log.info("optim adamw_torch_fused: %s; using torch's AdamW without fused kernels (the same update)", e)
            return torch.optim.AdamW(groups, lr=lr, **adam)
    if cfg.optim in EIGHT_BIT:
        return eight_bit_optimizer(cfg.optim, model, groups, lr, adam)
    if cfg.optim == "adafactor":
        from transformers.optimization import Adafactor

        # the HF Trainer's settings: a fixed learning rate (learning_rate, scheduled), not Adafactor's own relative step
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False)
    return torch.optim.SGD(groups, lr=lr)


def param_groups(cfg: SFTConfig, model: torch.nn.Module) -> list[dict]:
    """The trainable parameters of ``model`` in groups of one learning rate and weight decay, in a fixed order.

    Weight decay applies only to matrices (ndim >= 2), not to biases or norm weights. With loraplus_lr_ratio
    (LoRA+), grouped as LLaMA-Factory's ``_create_loraplus_optimizer`` does: lora_embedding_B at loraplus_lr_embedding;
    lora_B and every 1-D parameter at learning_rate × loraplus_lr_ratio; lora_A and the rest at learning_rate.
    Without it the groups are [matrices, the rest], as checkpoints of earlier runs hold them.
    """
    rates = {"rest": cfg.learning_rate}
    if cfg.loraplus_lr_ratio is not None:
        rates |= {"lora_B": cfg.learning_rate * cfg.loraplus_lr_ratio, "embedding": cfg.loraplus_lr_embedding}
    found: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            found.setdefault((loraplus_role(name, p) if len(rates) > 1 else "rest", p.ndim >= 2), []).append(p)
    return [{"params": found[role, decay], "lr": rates[role], "weight_decay": cfg.weight_decay if decay else 0.0}
            for role in rates for decay in (True, False) if found.get((role, decay))]


def loraplus_role(name: str, p: torch.nn.Parameter) -> str:
    """Which LoRA+ learning rate parameter ``name`` gets: "embedding", "lora_B" or "rest" (LLaMA-Factory's rule)."""
    if "lora_embedding_B" in name:
        return "embedding"
    return "lora_B" if "lora_B" in name or p.ndim == 1 else "rest"


def eight_bit_optimizer(optim: str, model: torch.nn.Module, groups: list[dict], lr: float, adam: dict) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (paged: its states can move to CPU memory under GPU memory pressure). As the HF Trainer
    does, trained embedding weights keep 32-bit states (8-bit ones make embeddings unstable)."""
    try:
        import bitsandbytes
    except ImportError:
        raise SftlabError(f"optim: {optim} needs bitsandbytes, which is not installed: pip install bitsandbytes, or use optim: adamw_torch") from None
    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.weight.requires_grad:
            # by the parameter itself: the HF Trainer's register_module_override is also matched by position in the
            # groups, which a later optimizer of the same process (another run) would inherit
            manager.override_config(module.weight, "optim_bits", 32)
    return getattr(bitsandbytes.optim, EIGHT_BIT[optim])(groups, lr=lr, **adam)


def build_scheduler(cfg: SFTConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """transformers' ``get_scheduler(lr_scheduler_type)`` over ``total_steps`` optimizer steps, after warmup_steps (or
    warmup_ratio × total_steps), with lr_scheduler_kwargs. warmup_stable_decay without num_stable_steps / num_decay_steps
    gets LLaMA-Factory's defaults: a third of the steps after warmup stable, the rest decaying.
    Raises SftlabError naming lr_scheduler_kwargs when the schedule function refuses them."""
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * total_steps)
    kwargs = dict(cfg.lr_scheduler_kwargs)
    if cfg.lr_scheduler_type == "warmup_stable_decay":
        rest = total_steps - warmup
        kwargs.setdefault("num_stable_steps", rest // 3)
        kwargs.setdefault("num_decay_steps", rest - rest // 3)
    try:
        return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                             scheduler_specific_kwargs=kwargs)
    except (TypeError, ValueError) as e:
        raise SftlabError(f"lr_scheduler_kwargs: {kwargs} do not fit lr_scheduler_type {cfg.lr_scheduler_type} over {total_steps} steps "
                          f"({str(e).splitlines()[0]}); fix or remove them") from None


@contextmanager
def neftune(model: torch.nn.Module, alpha: float | None) -> Iterator[None]:
    """While inside: NEFTune on ``model`` (a transformers or peft model) when ``alpha`` is set, with transformers' own
    hook: its input embeddings get uniform noise of scale alpha / sqrt(sequence length × hidden size) in forwards
    in training mode only (evaluation and generation run in eval mode). Removed on exit, as the HF Trainer removes it
    after training, so that nothing after training (final evaluation, generation, the saved model) carries it."""
    if alpha is None:
        yield
        return
    try:
        from transformers.integrations.neftune import neftune_post_forward_hook
    except ImportError:  # transformers before 5 keeps it here
        from transformers.trainer_utils import neftune_post_forward_hook
    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = alpha  # the hook reads its scale from the module
    handle = embeddings.register_forward_hook(neftune_post_forward_hook)
    try:
        yield
    finally:
        handle.remove()
        del embeddings.neftune_noise_alpha
