"""Write a merged Hugging Face model as one GGUF file (llama.cpp, Ollama, LM Studio), with the ``gguf`` package.

Pure Python: the tensors are renamed through ``gguf.TensorNameMap``, converted or quantized by ``gguf.quants``
(f16, bf16, q8_0) and written with ``gguf.GGUFWriter``; merges, special token ids and the chat template come from
``gguf.SpecialVocab`` over the tokenizer files of the HF export. Other quant types (``q4_k_m``, …) go through
llama.cpp's own quantizer when ``llama-cpp-python`` is installed.

What the file says, and why:

* Llama and Mistral (llama.cpp architecture ``llama``): the rows of ``q_proj``/``k_proj`` are permuted from the
  Hugging Face rotary layout (first half of each head, then second half) to llama.cpp's interleaved pairs;
  transformers' GGUF reader undoes this on read. Qwen2/Qwen3 use the half-split rotary layout in llama.cpp too, so
  their weights are written as they are. Gemma 2's norms are stored as ``1 + weight``, as llama.cpp applies them.
* A tied output head is not written (llama.cpp and transformers' reader tie it again when ``output.weight`` is absent).
* Tokenizer: byte-level BPE only (GPT-2 style: Llama 3, Qwen, SmolLM2, Mistral Nemo…); the token list in id order,
  special added tokens as CONTROL, other added tokens as USER_DEFINED, unused ids padded as UNUSED. ``add_bos_token``
  is false: training tokenized rendered chats without special tokens (the template writes BOS where it wants one).
  The end-of-turn token of the chat template is ``eot_token_id``, so llama.cpp stops there.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftlab.errors import SftlabError

# Written by the gguf package itself: no compiler, no download.
NATIVE_QUANTS = ("f16", "bf16", "q8_0")
# Quantized by llama.cpp (llama-cpp-python) from an f16 file: its k-quants choose mixed per-tensor types.
LLAMA_CPP_QUANTS = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                    "q5_k_s", "q5_k_m", "q6_k")
QUANTS = NATIVE_QUANTS + LLAMA_CPP_QUANTS


@dataclass(frozen=True)
class Arch:
    gguf_arch: object  # a gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's interleaved rotary layout (Llama, Mistral)
    norm_plus_one: bool = False  # Gemma: llama.cpp multiplies by the stored norm weight, HF by (1 + weight)


def _archs() -> dict[str, Arch]:
    import gguf

    return {
        "llama": Arch(gguf.MODEL_ARCH.LLAMA, True),
        "mistral": Arch(gguf.MODEL_ARCH.LLAMA, True),
        "qwen2": Arch(gguf.MODEL_ARCH.QWEN2, False),
        "qwen3": Arch(gguf.MODEL_ARCH.QWEN3, False),
        "gemma2": Arch(gguf.MODEL_ARCH.GEMMA2, False, norm_plus_one=True),
    }


SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2")


def gguf_name(quant: str) -> str:
    return f"model-{quant}.gguf"


def check_gguf_request(config: dict, quant: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """Every refusal that needs no weights: an unknown quant type, a llama.cpp one without llama-cpp-python, an
    architecture, rotary scaling or tokenizer kind this writer does not handle. ``config``: the model's config.json."""
    if quant not in QUANTS:
        raise SftlabError(f"export_quant: {quant!r} — use one of {', '.join(NATIVE_QUANTS)} (written here), or "
                          f"{', '.join(LLAMA_CPP_QUANTS)} (with llama-cpp-python installed)")
    if quant in LLAMA_CPP_QUANTS and importlib.util.find_spec("llama_cpp") is None:
        raise SftlabError(f"export_quant {quant} needs llama.cpp's quantizer: `pip install llama-cpp-python` (compiles llama.cpp, "
                          f"several minutes), or export with export_quant=f16 and run `llama-quantize model-f16.gguf "
                          f"model-{quant}.gguf {quant.upper()}`")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise SftlabError(f"GGUF export of a {model_type!r} model is not supported (supported: {', '.join(SUPPORTED)}); export "
                          "with export_format=hf and convert with llama.cpp's convert_hf_to_gguf.py")
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // max(1, config.get("num_attention_heads", 1))
    if model_type == "gemma2" and config.get("query_pre_attn_scalar", head_dim) != head_dim:
        raise SftlabError(f"GGUF export of a Gemma 2 model whose query_pre_attn_scalar ({config.get('query_pre_attn_scalar')}) is not its "
                          f"head_dim ({head_dim}) is not supported (the GGUF has no key for it); export with export_format=hf")
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or (config.get("rope_parameters") or {}).get("rope_type") or "default"
    if rope_type != "default":
        raise SftlabError(f"GGUF export of a model with {rope_type!r} rotary scaling is not supported; export with "
                          "export_format=hf and convert with llama.cpp's convert_hf_to_gguf.py")
    _byte_level(tokenizer)


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path, path: Path, quant: str,
               name: str) -> list[str]:
    """Write ``model`` (merged, any float dtype) and ``tokenizer`` as the GGUF file ``path``; return warnings.

    ``tokenizer_dir``: where ``tokenizer`` was saved (``gguf.SpecialVocab`` reads merges and special tokens from its
    files). ``quant``: one of ``QUANTS``; a llama.cpp type is written as f16 beside ``path`` first, then quantized.
    Raises SftlabError for a tokenizer that is not byte-level BPE.
    """
    if quant in LLAMA_CPP_QUANTS:
        f16 = path.with_name(f".{path.name}.f16")
        try:
            warnings = write_gguf(model, tokenizer, tokenizer_dir, f16, "f16", name)
            _llama_cpp_quantize(f16, path, quant)
        finally:
            f16.unlink(missing_ok=True)
        return warnings

    import gguf

    config = model.config.get_text_config()
    arch = _archs()[config.model_type]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    n_vocab = model.get_input_embeddings().weight.shape[0]
    try:
        _write_hparams(writer, config, name, quant)
        warnings = _write_tokenizer(writer, tokenizer, tokenizer_dir, n_vocab)
        _write_tensors(writer, model, config, arch, quant)
    finally:
        writer.close()
    return warnings


_FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _write_hparams(writer, config, name: str, quant: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # transformers' GGUF reader takes a file named exactly "mistral" for its Mistral path, which cannot load a "llama" file
    writer.add_name(name if name.lower() != "mistral" else f"{name}-export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping or 0.0)
        writer.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)
        writer.add_sliding_window(config.sliding_window)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[quant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _byte_level(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The fast tokenizer's JSON, when it is byte-level BPE; else SftlabError."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise SftlabError(f"the tokenizer is not byte-level BPE ({model.get('type')}, byte_fallback={model.get('byte_fallback')}): "
                          "GGUF export writes GPT-2-style vocabularies only; export with export_format=hf and convert with "
                          "llama.cpp's convert_hf_to_gguf.py")
    return spec


def _pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer (the regex that splits text before BPE), or None when it has none."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # the ByteLevel pre-tokenizer's own regex is GPT-2's
    parts = pre.get("pretokenizers") or []
    regexes = [p["pattern"]["Regex"] for p in parts if p.get("type") == "Split" and "Regex" in (p.get("pattern") or {})]
    if len(regexes) != 1:
        return None
    try:  # the names transformers' GGUF reader maps back to a regex: a file written with one reads back the same
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return None
    return next((name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == regexes[0]), None)


def _write_tokenizer(writer, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path, n_vocab: int) -> list[str]:
    import gguf

    from sftlab.data.render import end_of_turn_token

    spec = _byte_level(tokenizer)
    warnings = []
    pre = _pre_tokenizer_name(spec)
    if pre is None:
        warnings.append("the tokenizer's pre-tokenizer has no llama.cpp name; the GGUF says 'default', so llama.cpp may split "
                        "text differently from training (transformers reads it back as training tokenizes: checked)")
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if len(tokenizer) > n_vocab:
        raise SftlabError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in vocab:
            tokens.append(vocab[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (padded for speed): never produced by the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab)
    special.add_special_token = {"bos": False, "eos": False}  # the template writes BOS; see the module docstring
    special.chat_template = tokenizer.chat_template  # the template training used (it is also in tokenizer_dir)
    if tokenizer.pad_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    special.add_to_gguf(writer, quiet=True)
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(eot))
    return warnings


def _interleave_rotary_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from the half-split rotary layout (per head: the first halves of all pairs, then the
    second halves) to interleaved pairs (x0, y0, x1, y1…), the layout llama.cpp's ``llama`` rotary expects."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _write_tensors(writer, model: PreTrainedModel, config, arch: Arch, quant: str) -> None:
    """Header, metadata, then the tensors one at a time: each is converted and quantized just before it is written, so
    at most one converted tensor is in memory beside the model."""
    import gguf

    names = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    state = model.state_dict()
    plan = []
    for hf_name, tensor in state.items():
        if (tied and hf_name == "lm_head.weight") or "rotary_emb" in hf_name:  # tied again on load; computed, not a weight
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SftlabError(f"no GGUF name for the tensor {hf_name} of this {config.model_type} model; export with export_format=hf")
        qtype = _tensor_type(tuple(tensor.shape), quant)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(tuple(tensor.shape), qtype)))
        writer.add_tensor_info(name, tuple(tensor.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
        plan.append((hf_name, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for hf_name, qtype in plan:
        data = state[hf_name].detach().to(torch.float32)
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _interleave_rotary_rows(data, config.num_attention_heads)
        elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _interleave_rotary_rows(data, n_kv)
        if arch.norm_plus_one and hf_name.endswith("norm.weight"):
            data = data + 1
        writer.write_tensor_data(gguf.quants.quantize(data.numpy(), qtype))


def _tensor_type(shape: tuple[int, ...], quant: str):
    """Vectors (norms, biases) stay f32, as llama.cpp keeps them; matrices take ``quant``, or f16 when a row is not a
    whole number of q8_0 blocks (32 values)."""
    import gguf

    t = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return t.F32
    if quant == "bf16":
        return t.BF16
    if quant == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[t.Q8_0][0] == 0:
        return t.Q8_0
    return t.F16


def _llama_cpp_quantize(src: Path, dst: Path, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise SftlabError(f"llama.cpp could not quantize the GGUF to {quant} (return code {rc}); export with export_quant=f16 "
                          "and quantize with llama-quantize")
