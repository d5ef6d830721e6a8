"""The one declaration of every configuration key.

Each key is declared once below (type, default, one-line help). The YAML reader, the
``key=value`` overrides, the error messages and ``docs/config.md`` all come from it.
Key names follow LLaMA-Factory's where the meaning is the same, so existing YAML runs.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator, model_validator

from sftlab.compat import EARLIER_TRAINER_KEYS, FOREIGN
from sftlab.errors import SftlabError

log = logging.getLogger(__name__)


class ConfigError(SftlabError):
    pass


Masking = Literal["assistant", "last", "all"]  # which tokens are trained; render.encode_conversation applies it
_MASKING_ALIASES = {"train_on_prompt": "all", "mask_history": "last"}  # LLaMA-Factory's keys: true means this masking
_FLAG = TypeAdapter(bool | None)
_FOREIGN_STAGES = {"dpo": "direct preference optimisation", "kto": "Kahneman-Tversky optimisation", "rm": "reward modelling",
                   "ppo": "PPO reinforcement learning"}  # LLaMA-Factory's other stages


class SFTConfig(BaseModel):
    """A training run, as written in YAML. Every field is a key the user may set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    _notes: list[str] = PrivateAttr(default_factory=list)  # what load_config said about keys that have no effect here

    # --- model
    model_name_or_path: str = Field(
        description="Local model directory, a .gguf file, or a Hub id (offline: resolved from installed asset packages)."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model's repository to run.")

    # --- method
    stage: Literal["sft", "pt"] = Field("sft", description="sft: chat/instruction tuning; pt: continued pre-training on plain text.")
    do_train: bool = Field(True, description="Run training (false: only check the data, or with do_predict only predict; a do_predict YAML that leaves do_train out and names no dataset does not train, as LLaMA-Factory's do_train defaults to false).")
    finetuning_type: Literal["lora", "full", "freeze"] = Field("lora", description="lora: low-rank adapters; full: all weights; freeze: only the last layers.")
    quantization_bit: Literal[4, 8] | None = Field(None, description="QLoRA: load the base model quantized to 4 or 8 bits by bitsandbytes (frozen; LoRA weights, norms, embeddings and the head stay fp32); needs finetuning_type: lora. Recorded with the run, so eval, chat and resume load the same base; export merges into the full-precision one.")
    quantization_method: Literal["bnb"] = Field("bnb", description="How quantization_bit quantizes: bnb (bitsandbytes, on CPU and GPU).")
    quantization_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (NormalFloat, QLoRA's) or fp4.")
    double_quantization: bool = Field(True, description="4-bit: quantize the quantization constants too (~0.4 bit per weight less).")
    freeze_trainable_layers: int = Field(2, description="freeze: number of last decoder layers to train (negative: first layers).")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r: more capacity and memory as it grows.")
    lora_alpha: float | None = Field(None, description="LoRA scaling alpha (default: 2 × lora_rank).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target: str | list[str] = Field("all", description="Modules that get LoRA: 'all' = every linear layer except the output head, or names (comma-separated or a list).")
    use_dora: bool = Field(False, description="DoRA: LoRA plus a trained magnitude per output feature of each adapted weight (weight-decomposed; slower steps).")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale the update by lora_alpha / sqrt(lora_rank) instead of lora_alpha / lora_rank.")
    pissa_init: bool = Field(False, description="PiSSA: start LoRA from each weight's top singular vectors (the frozen base keeps the residual); needs pissa_convert: true.")
    pissa_iter: int = Field(16, ge=-1, description="PiSSA: iterations of the fast randomised SVD (-1: full SVD, exact and slower).")
    pissa_convert: bool = Field(False, description="PiSSA: save the adapter (final and each checkpoint) converted to a plain LoRA of twice the rank on the ORIGINAL base, so eval, chat and export load it on the unchanged model; required with pissa_init (an unconverted PiSSA adapter needs the residual base, which nothing saves); checkpoint-N/pissa/ keeps the PiSSA form to resume from.")
    additional_target: str | list[str] | None = Field(None, description="Modules trained fully beside LoRA and saved with the adapter (peft modules_to_save), comma-separated or a list, e.g. embed_tokens,lm_head.")
    adapter_name_or_path: str | None = Field(None, description="LoRA adapter directories, comma-separated. Training: one is trained on (its rank, alpha and targets win); of several, all but the last are merged into the base first. Eval/chat/predict/export: the adapters to load, unless this config trained from them, which then load its output_dir (the merged ones applied first). Default: the run's output_dir.")
    create_new_adapter: bool = Field(False, description="Training with adapter_name_or_path: merge all of them into the base and train a new LoRA.")

    # --- data
    dataset: list[str] = Field(default_factory=list, description="Dataset names from dataset_info.json or file paths, comma-separated; several are concatenated (needed by whatever reads data: train, eval, data commands; not by chat or export).")
    dataset_dir: str = Field("data", description="Directory holding dataset_info.json and the data files.")
    template: str | None = Field(None, description="Chat template: empty = the tokenizer's own; a LLaMA-Factory template name (qwen3_nothink, llama3, glm4, …) = the tokenizer's own too (*_nothink: enable_thinking false), or without one its built-in equivalent; builtin:NAME (chatml, qwen, llama3, default, …) replaces the tokenizer's own.")
    default_system: str | None = Field(None, description="System prompt for samples that have none (else the template's own default, if any).")
    cutoff_len: int = Field(2048, ge=8, description="Longest sample in tokens; longer ones lose whole later turns, else are dropped (counted).")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many samples of each dataset (the first ones).")
    val_size: float = Field(0.0, ge=0.0, description="Validation split: a fraction (< 1) or a number of samples (>= 1), drawn with seed.")
    preprocessing_num_workers: int | None = Field(None, ge=1, description="Processes for tokenization (default: 1).")
    thinking: Literal["train", "mask", "drop"] = Field("train", description="Reasoning in answers (cot format, reasoning_content, <think> blocks): train it, show it but do not train it, or drop it.")
    enable_thinking: bool | None = Field(None, description="Passed to templates with a thinking switch (Qwen3); false puts an empty think block in the prompt.")
    masking: Masking = Field("assistant", description="Which tokens are trained: assistant = every assistant turn; last = only the last assistant turn of each conversation; all = every token, prompts included.")
    train_on_prompt: bool | None = Field(None, description="LLaMA-Factory's key: true means masking: all (unset: masking decides; if both are set they must agree).")
    mask_history: bool | None = Field(None, description="LLaMA-Factory's key: true means masking: last (unset: masking decides; if both are set they must agree).")
    eval_dataset: str | list[str] | None = Field(None, description="Evaluation datasets (names or paths, comma-separated, as dataset; max_samples applies): used instead of a val_size split for the evaluation during and after training and for do_predict; then dataset may be empty when nothing is trained.")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over", "interleave_once"] = Field("concat", description="How several datasets are mixed: concat (one after the other, then shuffled by training); interleave_under (a sample from each in turn, or drawn by interleave_probs, until one runs out); interleave_over (until every sample of every dataset was drawn, the shorter ones repeating); interleave_once (in turn until all run out, none repeated). Seeded by seed.")
    interleave_probs: str | list[float] | None = Field(None, description="With an interleave mix_strategy: the probability of drawing from each dataset, one per dataset (comma-separated or a list), summing to 1 (default: in turn).")
    tokenized_path: str | None = Field(None, description="A directory for the encoded train/evaluation sets: when it holds sets a run saved, training loads them instead of reading dataset (refused if the tokenizer, template, cutoff_len or masking differ); else they are saved there and training goes on.")

    # --- optimisation
    per_device_train_batch_size: int = Field(1, ge=1, description="Samples per micro-batch on each device.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Samples per evaluation batch on each device (loss and generation).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step; effective batch = per-device × this × devices.")
    num_train_epochs: float = Field(3.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use num_train_epochs).")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (LoRA ~1e-4, full ~1e-5).")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"] = Field("cosine", description="Learning-rate schedule after warmup (transformers' get_scheduler names).")
    lr_scheduler_kwargs: dict[str, Any] = Field({}, description="Extra arguments of the schedule, a mapping or a JSON string, as the HF Trainer takes them: e.g. num_cycles (cosine_with_restarts), min_lr or min_lr_rate (cosine_with_min_lr), lr_end and power (polynomial), num_stable_steps and num_decay_steps (warmup_stable_decay; default: a third and the rest of the steps after warmup, as LLaMA-Factory sets them).")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of steps spent warming up linearly.")
    warmup_steps: int = Field(0, ge=0, description="Warmup steps (overrides warmup_ratio when > 0).")
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor", "sgd"] = Field("adamw_torch", description="Optimizer, as the HF Trainer names them: adamw_torch (torch AdamW), adamw_torch_fused (the same with fused kernels where torch has them), adamw_8bit / adamw_bnb_8bit / paged_adamw_8bit (bitsandbytes 8-bit states: less memory), adafactor (transformers' Adafactor at learning_rate), sgd.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1 (first-moment decay) of the AdamW optimizers.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam beta2 (second-moment decay) of the AdamW optimizers.")
    adam_epsilon: float = Field(1e-8, ge=0.0, description="Adam epsilon of the AdamW optimizers.")
    weight_decay: float = Field(0.0, ge=0.0, description="Weight decay of the optimizer (not applied to biases and norms).")
    loraplus_lr_ratio: float | None = Field(None, gt=0.0, description="LoRA+: the lora_B matrices (and 1-D trained weights) learn at learning_rate × this (e.g. 16); lora_A and the rest at learning_rate. finetuning_type lora only.")
    loraplus_lr_embedding: float = Field(1e-6, gt=0.0, description="LoRA+: learning rate of the lora_embedding_B of LoRA on embedding layers.")
    neftune_noise_alpha: float | None = Field(None, ge=0.0, description="NEFTune: add uniform noise of scale alpha / sqrt(sequence length × hidden size) to the input embeddings in training steps (never in evaluation or generation), e.g. 5.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Clip the gradient norm to this (0: no clipping).")
    bf16: bool = Field(False, description="bfloat16 mixed precision (GPU with bf16, or a CPU with AVX-512 bf16).")
    fp16: bool = Field(False, description="float16 mixed precision (CUDA GPUs only).")
    group_by_length: bool = Field(False, description="Batch samples of similar length together (less padding, faster); order stays seeded and resumable.")
    padding_free: bool | None = Field(None, description="Lay each micro-batch's samples end to end in one row: no padding computed; attention never crosses samples; same loss. null: on, except with group_by_length or on a GPU without flash-attn (there padded batches run one fused sdpa call).")
    packing: bool = Field(False, description="Pack samples into rows of up to cutoff_len tokens (best-fit decreasing); per_device_train_batch_size then counts rows. Attention never crosses samples, positions restart per sample.")
    neat_packing: bool | None = Field(None, description="LLaMA-Factory's key: true means packing: true (sftlab's packing never attends across samples, which is what LLaMA-Factory calls neat packing).")
    torch_compile: bool = Field(False, description="Compile each decoder layer with torch.compile (slow first steps; pays off on long runs, mostly on GPU).")
    peak_tflops: float | None = Field(None, gt=0, description="Device peak TFLOP/s for the MFU metric (default: a table of GPUs; on CPU a matmul measured at start).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    seed: int = Field(42, description="Seed for data order, splits, initialisation and dropout.")
    fsdp: bool = Field(False, description="Shard weights, gradients and optimizer states across the processes of a launch (PyTorch FSDP2, one unit per decoder layer; with gradient_checkpointing for activations). Runs as a torchrun launch: sftlab train CONFIG --nproc N relaunches itself, also for one process.")
    fsdp_state_dict_type: Literal["full", "sharded"] = Field("full", description="FSDP checkpoints: full (gathered to the main process: normal safetensors that load anywhere) or sharded (each process writes its part with torch.distributed.checkpoint: nothing gathered, for models too big to gather; resumes on any number of processes). The final model is always full.")
    deepspeed: str | None = Field(None, description="A DeepSpeed JSON config to train under ZeRO, as in LLaMA-Factory (examples/deepspeed/: ZeRO-2, ZeRO-3, with CPU offload); its \"auto\" values are filled from this YAML. Always runs as a torchrun launch (sftlab train relaunches itself, also for one process); checkpoints resume on the same number of processes.")
    nan_policy: Literal["stop", "skip_step"] = Field("stop", description="A step whose loss or gradient norm is NaN/inf is never applied. stop: save the last good state as a checkpoint and exit with an error; skip_step: drop that step and go on (stops after 10 in a row).")

    @field_validator("lr_scheduler_kwargs", mode="before")
    @classmethod
    def _scheduler_kwargs_json(cls, v: Any) -> Any:
        """A JSON string is read as the mapping it holds, as the HF Trainer reads one; null or empty means none."""
        import json

        if v is None or (isinstance(v, str) and not v.strip()):
            return {}
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e.msg}); write a mapping such as {{\"num_cycles\": 2}}") from None
            if not isinstance(v, dict):
                raise ValueError("must be a mapping of argument: value, such as {\"num_cycles\": 2}")
        return v

    @model_validator(mode="after")
    def _check_optimisation(self) -> "SFTConfig":
        """LoRA+ needs LoRA; FSDP needs an optim that steps sharded parameters. lr_scheduler_kwargs must be arguments that the schedule function takes, with values it
        accepts: a trial schedule is built on a one-parameter optimizer, so that a mistake stops before the model loads."""
        if self.loraplus_lr_ratio is not None and self.finetuning_type != "lora":
            raise ValueError(f"loraplus_lr_ratio scales the learning rate of LoRA's B matrices; with finetuning_type {self.finetuning_type} "
                             "there are none: remove it or set finetuning_type: lora")
        if self.fsdp and self.optim in ("adafactor", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
            # their state is built as plain tensors, which cannot meet FSDP2's sharded (DTensor) parameters
            raise ValueError(f"optim: {self.optim} does not run on FSDP's sharded parameters; use adamw_torch, adamw_torch_fused or "
                             "sgd with fsdp, or train under deepspeed (ZeRO) instead")
        if not self.lr_scheduler_kwargs and self.lr_scheduler_type in ("cosine", "linear", "constant", "constant_with_warmup"):
            return self  # nothing to check (the others may need arguments: cosine_with_min_lr needs min_lr or min_lr_rate)
        import inspect

        import torch
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType, get_scheduler

        name, kwargs = self.lr_scheduler_type, self.lr_scheduler_kwargs
        set_by_run = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}  # from the run's steps; resuming sets the position
        function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
        # get_scheduler passes no extra arguments to the constant schedules
        takes = [] if name in ("constant", "constant_with_warmup") else [p for p in inspect.signature(function).parameters if p not in set_by_run]
        unknown = sorted(set(kwargs) - set(takes))
        if unknown:
            raise ValueError(f"lr_scheduler_kwargs: lr_scheduler_type {name} takes {', '.join(takes) or 'no arguments'}, not {', '.join(unknown)}")
        trial = {"num_decay_steps": 1} if name == "warmup_stable_decay" else {}  # the run fills it from its steps (train/optim.py)
        try:
            get_scheduler(name, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=self.learning_rate), num_warmup_steps=0,
                          num_training_steps=1000, scheduler_specific_kwargs={**trial, **kwargs})
        except Exception as e:  # whatever the schedule function raises for these values
            raise ValueError(f"lr_scheduler_kwargs: {str(e).splitlines()[0] if str(e) else type(e).__name__} (lr_scheduler_type {name})") from None
        return self

    # --- evaluation, generation and export (sftlab eval / chat / predict / export)
    do_eval_baseline: bool = Field(False, description="Evaluate the base model on the validation split before training and the trained one after (the best one with load_best_model_at_end), and print the comparison.")
    do_predict: bool = Field(False, description="sftlab train also answers the evaluation set (eval_dataset, else the val_size split) after training, or instead of it with do_train: false (the model_name_or_path + adapter_name_or_path), into output_dir/generated_predictions.jsonl and predict_results.json (LLaMA-Factory's files); needs predict_with_generate: true.")
    predict_with_generate: bool = Field(False, description="Evaluation also generates answers and scores them (BLEU-4, chrF, ROUGE, exact match, eval_scorers).")
    eval_scorers: list[str] = Field(default_factory=list, description="Extra per-sample scorers for generated answers: json_valid, json_fields, regex:PATTERN, or module:function.")
    max_new_tokens: int = Field(512, ge=1, description="Longest generated answer in tokens (eval, chat, predict).")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature; 0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens with this much probability (with temperature > 0).")
    repetition_penalty: float = Field(1.0, gt=0.0, description="Penalise tokens already generated (1.0 = off).")
    top_k: int = Field(0, ge=0, description="Sampling (temperature > 0): keep only the k most likely tokens (0 = off; LLaMA-Factory's default is 50).")
    do_sample: bool | None = Field(None, description="LLaMA-Factory's key: false means greedy decoding whatever temperature says; true needs temperature > 0 (unset: temperature decides).")
    export_dir: str | None = Field(None, description="sftlab export: where the merged model goes.")
    export_size: float = Field(5.0, gt=0, description="sftlab export: largest safetensors shard in GB.")
    export_format: Literal["hf", "gguf"] = Field("hf", description="sftlab export: hf writes the merged model as safetensors; gguf also writes model-<export_quant>.gguf and an Ollama Modelfile beside them (docs/gguf.md).")
    export_quant: str = Field("q8_0", description="sftlab export with export_format gguf: the GGUF's type — f16, bf16, q8_0 (written by the gguf package), or q4_k_m, q5_k_m, q6_k… (needs llama-cpp-python).")

    # --- logging and saving
    logging_steps: int = Field(10, ge=1, description="Log train loss, lr, grad norm and speed every N steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate on the validation split every N steps (default: only at the end).")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop when eval_loss has not improved for this many evaluations in a row (needs val_size or eval_dataset, and eval_steps).")
    early_stopping_threshold: float = Field(0.0, ge=0.0, description="Smallest drop of eval_loss that counts as an improvement for early_stopping_patience.")
    load_best_model_at_end: bool = Field(False, description="Checkpoint each new best eval_loss and make the best one the final model (needs val_size or eval_dataset, and eval_steps; kept beyond save_total_limit).")
    save_steps: int = Field(500, ge=1, description="Write a checkpoint every N steps (and always at the end).")
    save_total_limit: int | None = Field(None, ge=1, description="Keep at most this many checkpoints (oldest removed first).")
    output_dir: str = Field("saves/run", description="Where checkpoints, the final model, config.yaml and metrics.jsonl go.")
    overwrite_output_dir: bool = Field(False, description="Allow starting over in an output_dir that already holds a run: every file of the previous run is removed first (never a folder that is not a run, nor one a run still holds).")
    plot_loss: bool = Field(True, description="At the end of training, write report.html (curves, diagnosis, before/after) and training_loss.png into output_dir, and print the diagnosis.")
    report_to: Literal["none", "tensorboard", "wandb"] = Field("none", description="Also log to TensorBoard (output_dir/runs) or Weights & Biases.")
    resume_from_checkpoint: str | bool | None = Field(None, description="Continue from a checkpoint directory, or true for the newest in output_dir that verifies against its manifest (damaged ones are skipped, with the reason).")

    @field_validator("dataset", mode="before")
    @classmethod
    def _split_names(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("lora_target", mode="before")
    @classmethod
    def _split_targets(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip() != "all":
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("eval_scorers", mode="before")
    @classmethod
    def _split_scorers(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            return [v.strip()] if v.strip().startswith("regex:") else [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("stage", mode="before")
    @classmethod
    def _stage_here(cls, v: Any) -> Any:
        if isinstance(v, str) and v in _FOREIGN_STAGES:
            raise ValueError(f"{v!r} ({_FOREIGN_STAGES[v]}) is LLaMA-Factory training sftlab does not have: sftlab trains stage: sft "
                             "(chat/instruction data) and stage: pt (plain text)")
        return v

    @field_validator("finetuning_type", mode="before")
    @classmethod
    def _method_here(cls, v: Any) -> Any:
        if v == "oft":
            raise ValueError("'oft' (orthogonal fine-tuning) is not in sftlab: finetuning_type: lora (with use_dora: true for DoRA) "
                             "trains a small adapter instead")
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_none(cls, v: Any) -> Any:
        return "none" if v in (None, False, "", [], ["none"]) else (v[0] if isinstance(v, list) and len(v) == 1 else v)

    @model_validator(mode="before")
    @classmethod
    def _resolve_masking(cls, data: Any) -> Any:
        """train_on_prompt / mask_history set masking when it is not set; one that contradicts the other or masking
        is an error. The aliases keep their values, so the resolved config is consistent and loads again."""
        if not isinstance(data, dict):
            return data
        if _flag(data.get("neat_packing")):  # LLaMA-Factory's packing without cross-sample attention is sftlab's packing
            if _flag(data.get("packing")) is False:
                raise ValueError("neat_packing: true contradicts packing: false; remove neat_packing (packing alone decides)")
            data = {**data, "packing": True}
        flags = {key: _flag(data.get(key)) for key in _MASKING_ALIASES}
        if flags["train_on_prompt"] and flags["mask_history"]:
            raise ValueError("train_on_prompt and mask_history contradict each other: the first trains every token, the second "
                             "only the last answer; remove both and set masking: all or masking: last")
        if "masking" not in data:
            implied = [_MASKING_ALIASES[key] for key, on in flags.items() if on]
            return {**data, "masking": implied[0]} if implied else data
        if data["masking"] not in get_args(Masking):  # the key's own check names the allowed values
            return data
        for key, on in flags.items():
            if on is not None and on != (data["masking"] == _MASKING_ALIASES[key]):
                raise ValueError(f"{key}: {str(on).lower()} contradicts masking: {data['masking']}; remove {key} "
                                 "(masking alone says which tokens are trained)")
        return data

    @model_validator(mode="after")
    def _check(self) -> "SFTConfig":
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true: choose one")
        if self.quantization_bit is not None:  # QLoRA: only adapters train on a quantized base, as in LLaMA-Factory
            if self.finetuning_type != "lora":
                raise ValueError(f"quantization_bit: {self.quantization_bit} trains LoRA on a frozen quantized base, and finetuning_type "
                                 f"is {self.finetuning_type}; set finetuning_type: lora or remove quantization_bit")
            if self.fsdp or self.deepspeed:
                raise ValueError(f"quantization_bit with {'fsdp' if self.fsdp else 'deepspeed'}: sharding a quantized base is not in "
                                 "sftlab; train QLoRA in one process or with --nproc (DDP), or remove quantization_bit")
            if self.pissa_init:
                raise ValueError("pissa_init with quantization_bit: PiSSA's SVD needs the full-precision weights; remove one of them")
        if self.do_sample and self.temperature == 0:
            raise ValueError("do_sample: true needs temperature > 0 (temperature 0 is greedy decoding); set temperature, e.g. 0.95 as LLaMA-Factory does")
        if self.packing and self.group_by_length:
            raise ValueError("packing and group_by_length are both true: packing already fills rows without padding; drop group_by_length")
        if self.do_eval_baseline and self.val_size <= 0 and not self.eval_dataset:
            raise ValueError("do_eval_baseline: true needs an evaluation set; set val_size (e.g. 0.1) or eval_dataset")
        if self.fsdp and self.fp16:
            raise ValueError("fsdp with fp16 is not supported (it needs a sharded loss scaler); use bf16: true")
        if self.fsdp_state_dict_type == "sharded" and self.load_best_model_at_end:
            raise ValueError("load_best_model_at_end needs checkpoints that hold the weights; with fsdp_state_dict_type: sharded "
                             "they do not: use full, or pick a checkpoint by its eval_loss")
        if self.fsdp_state_dict_type == "sharded" and not self.fsdp:
            raise ValueError("fsdp_state_dict_type: sharded applies to FSDP runs; set fsdp: true or remove it")
        if self.deepspeed and self.fsdp:
            raise ValueError("deepspeed and fsdp are both set: choose one sharding engine")
        for key in ("early_stopping_patience", "load_best_model_at_end"):
            if getattr(self, key) and ((self.val_size <= 0 and not self.eval_dataset) or not self.eval_steps):
                raise ValueError(f"{key} needs evaluations during training to act on; set val_size (e.g. 0.1) or eval_dataset, and eval_steps (e.g. 50)")
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise ValueError(f"val_size {self.val_size}: use a fraction below 1 or a whole number of samples")
        return self

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank


# Keys sftlab declares that neither LLaMA-Factory nor the Hugging Face Trainer has (tests/unit/test_llamafactory_keys.py
# checks this set against their lists, so that every other key above is one of theirs with the same meaning).
OWN_KEYS = frozenset({"do_eval_baseline", "early_stopping_patience", "early_stopping_threshold", "eval_scorers", "export_format", "export_quant", "fsdp_state_dict_type",
                      "masking", "nan_policy", "padding_free", "peak_tflops", "thinking"})


def _flag(value: Any) -> bool | None:
    """A boolean key's value as validation reads it; None when unset, or when it is no boolean (the key's own check says so)."""
    try:
        return _FLAG.validate_python(value)
    except ValidationError:
        return None


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, [*SFTConfig.model_fields, *FOREIGN], n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else " — see docs/config.md for the keys"


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` → (key, value), the value read as YAML (so 1e-4, true, [a, b] work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (e.g. learning_rate=1e-4)")
    key, _, raw = text.partition("=")
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] = (), **values: Any) -> SFTConfig:
    """Read a YAML file, apply ``key=value`` overrides, validate.

    Raises ConfigError (one line, naming the file and key) for a missing or malformed file,
    an unknown key (with a "did you mean" hint) or a value of the wrong type.
    """
    source = str(path) if path else "overrides"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found; check the path")
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8-sig")  # a BOM, as some Windows editors write, is not part of the YAML
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ConfigError(f"{p}:{line}: not UTF-8 (byte {e.start + 1} of the file); re-save the file as UTF-8") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            problem = " ".join(str(getattr(e, "problem", None) or e).split())  # PyYAML's messages span lines
            raise ConfigError(f"{p}{where}: not valid YAML ({problem}); fix that line") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of key: value at the top level")
        data.update(loaded or {})
    origin = {key: source for key in data}
    for item in overrides:
        key, value = parse_override(item)
        data[key], origin[key] = value, f"override {item}"
    data.update(values)
    notes = []
    for key in data:
        if not isinstance(key, str):  # YAML allows any key (`? x`, `1: 2`); a setting's is a name
            raise ConfigError(f"{origin.get(key, source)}: {key!r} is not a key name; write each setting as name: value")
    for key in [k for k in data if k not in SFTConfig.model_fields]:
        foreign = FOREIGN.get(key)
        if foreign is None:
            raise ConfigError(f"{origin.get(key, source)}: unknown key '{key}'{_suggest(key)}")
        value = data.pop(key)
        if foreign.leaves_off(value):
            continue
        if foreign.refused:
            raise ConfigError(f"{origin.get(key, source)}: {key}: {value!r} is not supported: {foreign.reason}")
        notes.append(f"{key}: {value!r} has no effect here: {foreign.reason}")
    if "LOCAL_RANK" not in os.environ:  # said by the command, not again by each process of a launch
        for note in notes:
            log.info(note)
    try:
        cfg = SFTConfig(**data)
        cfg._notes = notes
        return cfg
    except (TypeError, ArithmeticError) as e:  # a check meeting a value no type check stopped (an infinite float, …)
        raise ConfigError(f"{source}: a value is out of range ({e}); check the numbers in the config") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if loc:
            key = str(err["loc"][0])
            raise ConfigError(f"{origin.get(key, source)}: {loc}: {msg} (got {data.get(key)!r})") from None
        raise ConfigError(f"{source}: {msg}") from None


def dump_config(cfg: SFTConfig) -> str:
    """The resolved config as YAML (every key, defaults included), loadable by load_config."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False, allow_unicode=True)


def config_reference() -> str:
    """docs/config.md, generated from the declaration above."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/sftlab/config.py` by `sftlab config-docs`; do not edit by hand.",
        "Names follow LLaMA-Factory where the meaning is the same.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    def cell(text: str) -> str:  # a bare | would end the table cell (GFM)
        return text.replace("|", "\\|")

    for name, field in SFTConfig.model_fields.items():
        ann = str(field.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
        default = "required" if field.is_required() else "[]" if field.default_factory is list else repr(field.default)
        lines.append(f"| `{name}` | `{cell(ann)}` | `{cell(default)}` | {cell(field.description)} |")
    lines += [
        "",
        "## LLaMA-Factory keys",
        "",
        "Every key of LLaMA-Factory's argument dataclasses and of the Hugging Face `Seq2SeqTrainingArguments` it",
        "extends, and what sftlab does with it: **same** (a key above, same meaning), **no effect** (accepted: it",
        "cannot change what is trained; setting it is named once in the log) or **refused** (a feature sftlab does",
        "not have: a one-line error naming the nearest one). A key set to the value that leaves its feature off",
        "(e.g. `use_unsloth: false`) is always accepted. " + ", ".join(f"`{k}`" for k in sorted(EARLIER_TRAINER_KEYS)),
        "are Trainer keys of transformers 4 (dropped in 5), kept with their meaning. A key's default is sftlab's (above)",
        "where the two differ (e.g. generation is greedy unless temperature > 0). Keys sftlab adds: "
        + ", ".join(f"`{k}`" for k in sorted(OWN_KEYS)) + ".",
        "",
        "| key | here | why |",
        "| --- | --- | --- |",
    ]
    rows = {name: ("same", "see above") for name in SFTConfig.model_fields if name not in OWN_KEYS}
    rows |= {name: ("refused" if f.refused else "no effect", f.reason) for name, f in FOREIGN.items()}
    lines += [f"| `{name}` | {here} | {cell(why)} |" for name, (here, why) in sorted(rows.items())]
    return "\n".join(lines) + "\n"
