"""Keys that LLaMA-Factory and the Hugging Face Trainer accept but sftlab does not declare (``config.SFTConfig``
declares the rest, with the same meaning): what each one does here.

Each is either *accepted* — it cannot change what is trained or what the run writes that users read, so setting
it is named once in the log with the reason it has no effect — or *refused* — it asks for a feature sftlab does
not have, and the one-line error names the nearest thing sftlab has. A key set to a value that leaves its
feature off (LLaMA-Factory's default, ``false``, ``null``, …) is accepted silently either way, so YAMLs that
spell out defaults load unchanged.

The categories are listed in ``docs/config.md`` ("LLaMA-Factory keys"), generated from this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml


# Keys of the Hugging Face TrainingArguments before transformers 5 that LLaMA-Factory's YAMLs still set and sftlab
# declares with their old meaning (transformers 5 dropped them: warmup_ratio for warmup_steps as a fraction,
# group_by_length for train_sampling_strategy, overwrite_output_dir).
EARLIER_TRAINER_KEYS = frozenset({"warmup_ratio", "group_by_length", "overwrite_output_dir"})


@dataclass(frozen=True)
class Foreign:
    """How a foreign key is handled: ``refused`` or accepted with no effect; ``reason`` says why (and, refused,
    what to use instead); ``off`` are the values that leave its feature off, accepted silently."""

    refused: bool
    reason: str
    off: tuple[Any, ...] = (None, False)

    def leaves_off(self, value: Any) -> bool:
        """Whether ``value`` is one of ``off`` (compared with its type: 0 is not false, "1" is not 1)."""
        return any(type(value) is type(v) and value == v for v in self.off)


def _keys(names: str, refused: bool, reason: str, off: tuple[Any, ...] = (None, False)) -> dict[str, Foreign]:
    """``names``: space-separated keys; ``key=value`` adds that value (LLaMA-Factory's default, read as YAML) to the
    values that leave the key off, so that a YAML spelling out the default loads silently."""
    out = {}
    for item in names.split():
        name, eq, default = item.partition("=")
        known = out[name].off if name in out else off  # a key named twice: each value leaves it off
        out[name] = Foreign(refused, reason, known + ((yaml.safe_load(default),) if eq else ()))
    return out


def _accepted(names: str, reason: str, off: tuple[Any, ...] = (None, False)) -> dict[str, Foreign]:
    return _keys(names, False, reason, off)


def _refused(names: str, reason: str, off: tuple[Any, ...] = (None, False)) -> dict[str, Foreign]:
    return _keys(names, True, reason, off)


_NO_HUB = "nothing is downloaded from or uploaded to a hub: point model_name_or_path at a local directory and upload export_dir yourself"
_LOGGING = "logging and progress display only; sftlab logs every logging_steps to the console, metrics.jsonl and report_to"
_LOADER = "how batches are loaded, not which: sftlab tokenizes once and feeds batches from memory"
_DIST = "process-group tuning of the Hugging Face Trainer; sftlab's launch (sftlab train --nproc) sets its own, and it does not change the result"
_EVAL_IO = "how the Hugging Face Trainer gathers evaluation outputs; sftlab evaluates every eval_steps and after training"
_SPEED = ("a kernel choice that computes the same result; sftlab picks its own (FlashAttention-2 on a GPU where installed, else "
          "PyTorch SDPA; a chunked fp32 cross-entropy)")
_MEMORY = "trades memory for speed, not the result; sftlab's gradient_checkpointing key decides"
_MULTIMODAL = ("images, videos and audio are not in sftlab, which trains text-only models: train a text model "
               "(or a vision/audio model with LLaMA-Factory)")
_STAGES = "only for stage dpo/kto/ppo/rm, which sftlab does not train (stage: sft or pt)"
_ONLY_WITH = "only used with {}, which sftlab refuses; no effect when that is off"


def _sub(switch: str) -> str:
    return _ONLY_WITH.format(switch)


FOREIGN: dict[str, Foreign] = {
    # ---- model loading (LLaMA-Factory's ModelArguments)
    **_accepted("cache_dir hf_hub_token ms_hub_token om_hub_token", _NO_HUB),
    **_refused("model_revision=main", _NO_HUB),
    **_refused("use_fast_tokenizer=true", "sftlab loads the fast tokenizer (tokenizer.json); a slow one can split text differently", off=(None,)),
    **_accepted("low_cpu_mem_usage=true offload_folder=offload", "how weights are loaded into memory, not what they are"),
    **_refused("resize_vocab add_tokens add_special_tokens new_special_tokens_config",
               "adding tokens to the vocabulary is not in sftlab: train with the tokenizer's own tokens"),
    **_accepted("init_special_tokens=vocab_mean_noise freeze_original_embeddings", _sub("add_special_tokens")),
    **_refused("split_special_tokens", "sftlab tokenizes special tokens as the tokenizer does (never split); splitting changes the trained ids"),
    **_refused("adapter_folder", "set adapter_name_or_path to the adapter directory"),
    **_refused("rope_scaling", "sftlab keeps the model config's RoPE; extend the context in the model's config.json instead"),
    **_accepted("flash_attn=auto", _SPEED),
    **_refused("shift_attn", "LongLoRA's shift short attention is not in sftlab: train with full attention (cutoff_len)"),
    **_refused("mixture_of_depths", "mixture-of-depths conversion is not in sftlab: train the model as it is"),
    **_refused("use_unsloth", "Unsloth's patched kernels are not used: sftlab's own loop trains LoRA with PyTorch kernels (chunked fp32 loss, SDPA); drop the key"),
    **_accepted("use_unsloth_gc use_reentrant_gc=true disable_gradient_checkpointing gradient_checkpointing_kwargs activation_checkpointing "
                "activation_checkpointing_kwargs torch_empty_cache_steps", _MEMORY),
    **_accepted("enable_liger_kernel use_liger_kernel liger_kernel_config use_v1_kernels torch_compile_backend torch_compile_mode", _SPEED),
    **_accepted("tf32", "TF32 matmuls on NVIDIA GPUs trade precision for speed; sftlab keeps PyTorch's default (full fp32 matmuls)"),
    **_accepted("upcast_layernorm", "under mixed precision sftlab keeps every trained weight, norms included, in fp32"),
    **_accepted("upcast_lmhead_output", "sftlab computes the loss from the output head in fp32"),
    **_refused("moe_aux_loss_coef", "sftlab trains with the model config's own router loss coefficient: set router_aux_loss_coef in its config.json"),
    **_refused("train_from_scratch", "point model_name_or_path at a directory with a config.json and a tokenizer but no weights (see examples/sft_from_scratch.py)"),
    **_refused("infer_backend=huggingface infer_backend=hf", "sftlab generates with transformers (infer_backend: huggingface); vLLM, SGLang and KTransformers engines are not in sftlab"),
    **_accepted("vllm_maxlen=4096 vllm_gpu_util=0.7 vllm_enforce_eager vllm_max_lora_rank=32 vllm_config "
                "sglang_maxlen=4096 sglang_mem_fraction=0.7 sglang_tp_size=-1 sglang_config sglang_lora_backend=triton", _sub("infer_backend: vllm/sglang")),
    **_accepted("use_kv_cache=true", "the KV cache changes generation speed, not the answer"),
    **_refused("infer_dtype=auto", "sftlab generates in the dtype the model was trained in (bf16/fp16 when set, else the weights' own)"),
    **_accepted("print_param_status", "sftlab logs the trainable parameter count; the list of parameters is a debugging aid"),
    **_accepted("quantization_device_map", "sftlab places the quantized model on the device each process trains or generates on"),
    **_refused("use_kt", "KTransformers' CPU MoE backend is not in sftlab: train on the model as transformers loads it"),
    **_accepted("kt_cpu_activation kt_weight_path kt_non_expert_weight_path kt_expert_checkpoint_path kt_use_lora_experts "
                "kt_lora_expert_num kt_lora_expert_intermediate_size kt_config", _sub("use_kt")),
    # ---- multimodal processing
    **_refused("image_max_pixels=589824 image_min_pixels=1024 image_do_pan_and_scan crop_to_patches video_max_pixels=65536 "
               "video_min_pixels=256 video_fps=2.0 video_maxlen=128 use_audio_in_video audio_sampling_rate=16000 media_dir", _MULTIMODAL),
    **_accepted("freeze_vision_tower=true freeze_multi_modal_projector=true freeze_language_model", "only for vision/audio models, which sftlab does not train"),
    # ---- export
    **_accepted("export_device=cpu", "the device export merges on: the merged weights are the same (sftlab merges in fp32 and checks the logits)"),
    **_refused("export_quantization_bit", "quantized export (GPTQ) is not in sftlab: use sftlab export --format gguf --quant q8_0 (or q4_k_m with llama-cpp-python)"),
    **_accepted("export_quantization_dataset export_quantization_nsamples=128 export_quantization_maxlen=1024", _sub("export_quantization_bit")),
    **_refused("export_legacy_format", "sftlab writes safetensors, which every current loader reads"),
    **_refused("export_hub_model_id", _NO_HUB),
    # ---- data
    **_refused("streaming", "sftlab reads datasets from local files, memory-mapped by datasets, so large ones need no streaming; limit them with max_samples"),
    **_accepted("buffer_size=16384", _sub("streaming")),
    **_accepted("overwrite_cache preprocessing_batch_size=1000 data_shared_file_system",
                "sftlab's tokenization cache is keyed by the data, tokenizer and options, so it is never stale"),
    **_refused("eval_num_beams generation_num_beams", "beam search is not in sftlab: evaluation generates greedily, or samples with temperature/top_p"),
    **_refused("ignore_pad_token_for_loss=true", "sftlab never trains on padding tokens", off=(None,)),
    **_refused("eval_on_each_dataset", "sftlab evaluates eval_dataset as one set: run sftlab eval per dataset for separate scores"),
    **_refused("packing_strategy=length", "sftlab packs by length (best-fit decreasing)", off=(None,)),
    **_accepted("packing_similarity_threshold=0.7 packing_embedding_model", _sub("packing_strategy: semantic_aware")),
    **_refused("tool_format", "the model's chat template renders tools (from the dataset's tools column); a separate tool format is not in sftlab"),
    **_refused("reasoning_effort=xhigh", "sftlab passes enable_thinking to the chat template; other template variables are not in sftlab"),
    **_refused("preserve_thinking", "set thinking (how reasoning in earlier turns is kept) instead"),
    # ---- fine-tuning methods
    **_refused("freeze_trainable_modules=all", "freeze training trains every module of the last freeze_trainable_layers layers", off=(None,)),
    **_refused("freeze_extra_modules", "freeze training trains the last freeze_trainable_layers layers only; with LoRA, additional_target trains extra modules fully"),
    **_accepted("module_dropout=0.0 oft_rank=0 oft_block_size=32 oft_target=all", "only for finetuning_type: oft, which sftlab does not have (use lora)"),
    **_accepted("pref_beta=0.1 pref_ftx=0.0 pref_bco_weight=0.0 pref_loss=sigmoid dpo_label_smoothing=0.0 kto_chosen_weight=1.0 "
                "kto_rejected_weight=1.0 simpo_gamma=0.5 ppo_buffer_size=1 ppo_epochs=4 ppo_score_norm ppo_target=6.0 "
                "ppo_whiten_rewards ref_model ref_model_adapters ref_model_quantization_bit reward_model reward_model_adapters "
                "reward_model_quantization_bit reward_model_type=lora ld_alpha", _STAGES),
    **_refused("use_galore use_apollo use_badam use_adam_mini use_muon",
               "that optimizer is not in sftlab: use optim (adamw_torch, adamw_8bit for less memory, adafactor, sgd)"),
    **_accepted("galore_target=all galore_rank=16 galore_update_interval=200 galore_scale=2.0 galore_proj_type=std galore_layerwise "
                "optim_target_modules", _sub("use_galore")),
    **_accepted("apollo_target=all apollo_rank=16 apollo_update_interval=200 apollo_scale=32.0 apollo_proj=random apollo_proj_type=std "
                "apollo_scale_type=channel apollo_layerwise apollo_scale_front", _sub("use_apollo")),
    **_accepted("badam_mode=layer badam_start_block badam_switch_mode=ascending badam_switch_interval=50 badam_update_ratio=0.05 "
                "badam_mask_mode=adjacent badam_verbose=0", _sub("use_badam")),
    **_accepted("use_swanlab swanlab_project=llamafactory swanlab_workspace swanlab_run_name swanlab_mode=cloud swanlab_api_key "
                "swanlab_logdir swanlab_lark_webhook_url swanlab_lark_secret", "SwanLab tracking: " + _LOGGING),
    **_refused("pure_bf16", "training with bf16 weights and no fp32 master copy is not in sftlab: bf16: true trains in autocast with fp32 weights (more memory, more exact)"),
    **_refused("use_llama_pro", "LLaMA Pro block expansion is not in sftlab: use finetuning_type freeze (freeze_trainable_layers) or lora"),
    **_refused("use_mca use_megatron_bridge use_hyper_parallel",
               "Megatron and HyperParallel backends are not in sftlab: shard with fsdp: true or deepspeed: ds_config.json"),
    **_accepted("hyper_parallel_args hyper_parallel_cp_size=1", _sub("use_hyper_parallel")),
    **_refused("use_dft_loss use_asft_loss use_eaft_loss", "sftlab trains with token cross-entropy; DFT/ASFT/EAFT losses are not in sftlab"),
    **_accepted("asft_alpha=0.1 eaft_alpha=1.0", _sub("use_asft_loss / use_eaft_loss")),
    **_refused("num_mtp_layers=0", "multi-token prediction layers are not in sftlab", off=(None,)),
    **_accepted("mtp_loss_weight=0.0", _sub("num_mtp_layers")),
    **_accepted("compute_accuracy include_effective_tokens_per_second include_num_input_tokens_seen=no",
                "sftlab always logs token accuracy, tokens per second and tokens seen"),
    **_refused("disable_shuffling", "sftlab shuffles the training set every epoch with seed"),
    **_refused("early_stopping_steps", "set early_stopping_patience (evaluations without improvement of eval_loss) with eval_steps"),
    **_refused("ray_num_workers=1", "Ray is not in sftlab: sftlab train CONFIG --nproc N (and --nnodes) launches the processes", off=(None,)),
    **_accepted("ray_num_cpus_per_worker ray_init_kwargs master_addr master_port", _sub("ray_num_workers")),
    **_accepted("enable_torch_profiler profiler_output_dir profiler_wait_steps=1 profiler_warmup_steps=1 profiler_active_steps=1 "
                "profiler_repeat=1 profiler_record_shapes=true profiler_profile_memory=true profiler_with_stack=true profile_modules",
                "profiling only; sftlab logs step time, MFU and memory to metrics.jsonl"),
    **_refused("fp8", "FP8 training is not in sftlab: bf16: true"),
    **_accepted("fp8_backend=auto fp8_enable_fsdp_float8_all_gather", _sub("fp8")),
    **_refused("task", "LLaMA-Factory's benchmark evaluation (MMLU, CMMLU, C-Eval) is not in sftlab: sftlab eval scores a model on your datasets"),
    **_accepted("task_dir=evaluation batch_size=4 lang=en n_shot=5 save_dir download_mode", _sub("task")),
    **_accepted("tensor_model_parallel_size=1 pipeline_model_parallel_size=1 expert_model_parallel_size=1 context_parallel_size=1 "
                "virtual_pipeline_model_parallel_size sequence_parallel recompute_granularity recompute_method recompute_num_layers "
                "account_for_embedding_in_pipeline_split account_for_loss_in_pipeline_split bias_activation_fusion apply_rope_fusion "
                "masked_softmax_fusion cross_entropy_loss_fusion moe_grouped_gemm moe_token_dispatcher_type calculate_per_token_loss "
                "use_distributed_optimizer=true overlap_param_gather=true overlap_grad_reduce=true use_packed_sequences "
                "mixed_precision=bf16_mixed megatron_pretrained_checkpoint export_hf_on_finish extra_config", _sub("use_megatron_bridge")),
    **_refused("ulysses_context_parallel_size=1", "sequence (context) parallelism is not in sftlab: shard with fsdp: true and gradient_checkpointing", off=(None,)),
    # ---- generation (LLaMA-Factory's GeneratingArguments)
    **_refused("num_beams=1", "beam search is not in sftlab: generation is greedy (temperature: 0) or sampled (temperature, top_p)", off=(None,)),
    **_accepted("length_penalty=1.0", "only beam search uses it, and sftlab generates without beams"),
    **_accepted("max_length=1024", "max_new_tokens bounds the answer"),
    **_refused("skip_special_tokens=true", "sftlab decodes answers without special tokens", off=(None,)),
    **_refused("generation_max_length", "set max_new_tokens"),
    **_refused("generation_config", "set max_new_tokens, temperature, top_p, repetition_penalty"),
    # ---- the Hugging Face Trainer (Seq2SeqTrainingArguments)
    **_refused("optim_args", "optimizer arguments beyond adam_beta1/2, adam_epsilon and weight_decay are not in sftlab"),
    **_refused("average_tokens_across_devices=true", "sftlab always averages the loss over every trained token of the step, across devices", off=(None,)),
    **_refused("label_smoothing_factor=0.0 label_smoothing_factor=0", "label smoothing is not in sftlab: the loss is plain cross-entropy"),
    **_accepted("bf16_full_eval fp16_full_eval", "evaluation runs under the training precision (bf16/fp16 autocast)"),
    **_accepted("use_cache", "the model's cache is off in training and on in generation, as each needs"),
    **_refused("auto_find_batch_size", "the batch size decides the result: set per_device_train_batch_size (sftlab plan suggests one that fits)"),
    **_accepted("logging_strategy=steps logging_first_step log_on_each_node=true logging_nan_inf_filter=true log_level=passive "
                "log_level_replica=warning disable_tqdm run_name project=huggingface trackio_space_id trackio_bucket_id "
                "trackio_static_space_id skip_memory_metrics=true debug=''", _LOGGING),
    **_refused("eval_strategy=no eval_strategy=steps", "sftlab evaluates every eval_steps (with val_size or eval_dataset): set eval_steps"),
    **_accepted("eval_delay=0 prediction_loss_only eval_on_start eval_do_concat_batches=true eval_use_gather_object eval_accumulation_steps "
                "include_for_metrics batch_eval_metrics do_eval", _EVAL_IO),
    **_accepted("save_only_model", "sftlab's checkpoints always keep the optimizer state, so any of them can be resumed (they take more disk)"),
    **_accepted("save_strategy=steps save_on_each_node enable_jit_checkpoint restore_callback_states_from_checkpoint",
                "which checkpoints are written, not what is trained; sftlab saves every save_steps and at the end"),
    **_refused("push_to_hub", _NO_HUB),
    **_accepted("hub_token hub_private_repo hub_model_id hub_strategy=every_save hub_always_push hub_revision", _sub("push_to_hub")),
    **_refused("metric_for_best_model=eval_loss metric_for_best_model=loss", "load_best_model_at_end keeps the checkpoint with the lowest eval_loss"),
    **_refused("greater_is_better", "load_best_model_at_end keeps the checkpoint with the lowest eval_loss"),
    **_refused("ignore_data_skip", "a resumed run always continues the data where the checkpoint stopped"),
    **_accepted("full_determinism", "sftlab seeds every generator with seed; bitwise determinism on GPUs is not promised"),
    **_refused("data_seed", "sftlab shuffles the data with seed"),
    **_accepted("use_cpu", "sftlab trains on the accelerator when there is one, else on the CPU: the same result"),
    **_refused("accelerator_config parallelism_config fsdp_config",
               "sftlab configures accelerate itself: fsdp: true (with fsdp_state_dict_type) or deepspeed: ds_config.json"),
    **_accepted("fsdp_transformer_layer_cls_to_wrap", "sftlab's FSDP wraps each decoder layer of any model"),
    **_refused("dataloader_drop_last", "sftlab trains every sample of each epoch (the last batch may be smaller)"),
    **_accepted("dataloader_num_workers=0 dataloader_pin_memory=true dataloader_persistent_workers dataloader_prefetch_factor "
                "dataloader_multiprocessing_context dataloader_in_order=true remove_unused_columns=true label_names length_column_name=length",
                _LOADER),
    **_refused("train_sampling_strategy=random", "sftlab samples randomly each epoch (group_by_length for similar lengths together)", off=(None,)),
    **_refused("sortish_sampler", "set group_by_length: true"),
    **_accepted("ddp_timeout=1800 ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph ddp_backend "
                "local_rank=-1", _DIST),
}
