"""``sftlab export``: merge a LoRA adapter into its base model and write a plain Hugging Face model directory.

The export is checked before it is moved into place, on a few fixed chat conversations rendered with the
chat template training used:

* merge check (adapters): the merged fp32 model's logits match the adapter model's;
* write check (always): the written directory, reloaded with plain transformers, reproduces the logits of
  the model it was written from (after rounding to the export dtype);
* parity gate (unless ``verify=False``, ``export.parity``): training's, the export's, the server's and the GGUF's
  token ids agree, and the export and the GGUF answer greedily as the reference model does.

``export_format="gguf"`` writes, beside the Hugging Face files, ``model-<quant>.gguf`` (``export.gguf``) and an
Ollama ``Modelfile`` (``export.modelfile``): one merge, one directory holding every form of the model and the
``export.json`` that records how each was checked (Unsloth's ``save_pretrained_gguf`` leaves the merged model beside
the GGUF the same way, and llama.cpp's own converter can still make other quantizations from the HF files).

Everything is written to a temporary directory beside ``export_dir`` and renamed into place only when both
checks pass, so a failed or interrupted export never leaves a directory that looks like a valid model.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from sftlab import __version__
from sftlab.data.render import end_of_turn_token, render
from sftlab.errors import SftlabError
from sftlab.export import parity
from sftlab.export.gguf import check_gguf_request, gguf_name, write_gguf
from sftlab.export.modelfile import modelfile
from sftlab.files import fsync_tree, replace_dir
from sftlab.model.load import ADAPTER_CONFIG, Trained, inference_tokenizer, load_for_inference, untie_diverged
from sftlab.model.quantize import quant_method

EXPORT_JSON = "export.json"

# Tolerance on max |logit difference|, relative to the largest reference logit (floor 1): a merge only
# reorders fp32 arithmetic (x·(W + s·BA) instead of x·W + s·(x·A)·B), which moves logits by ~1e-7 of their
# scale per layer and ~1e-6 through a deep model. 1e-3 is far above that noise, below where a greedy answer
# could change, and far below what a real merge error does (a dropped, doubled or mis-scaled delta moves the
# logits by the adapter's whole effect, which the result reports beside it).
RTOL = 1e-3

# Verification conversations, English and Chinese alternating, so the first few cover both scripts. No system
# turns: some templates refuse them, and the template adds its own default system prompt where it has one.
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "请用一句话介绍一下长城。"},
     {"role": "assistant", "content": "长城是中国古代修建的防御工程，绵延两万多公里。"}],
    [{"role": "user", "content": "Give me a synonym for 'happy'."},
     {"role": "assistant", "content": "Joyful."},
     {"role": "user", "content": "And an antonym?"},
     {"role": "assistant", "content": "Sad."}],
    [{"role": "user", "content": "把这句话翻译成英文：我今天很开心。"},
     {"role": "assistant", "content": "I am very happy today."}],
    [{"role": "user", "content": "How do I reverse a list in Python?"},
     {"role": "assistant", "content": "Use `items[::-1]` for a reversed copy, or `items.reverse()` to reverse it in place."}],
    [{"role": "user", "content": "1加1等于几？"},
     {"role": "assistant", "content": "1加1等于2。"}],
    [{"role": "user", "content": "Write a haiku about autumn."},
     {"role": "assistant", "content": "Crisp leaves drift and fall,\nthe maple burns red and gold,\nwind hums a soft song."}],
    [{"role": "user", "content": "推荐一本好书。"},
     {"role": "assistant", "content": "《三体》是一部很受欢迎的科幻小说，讲述了人类与外星文明的接触。"}],
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ExportResult:
    """What was written. ``max_abs_diff``: max |logit difference| between the export (reloaded, computed in fp32)
    and the model it replaces (adapter model or original full model), over the verification conversations; it
    includes the rounding to ``dtype``. ``adapter_effect``: max |logit difference| the adapter makes to its base.
    ``quantized_drift`` (QLoRA): max |logit difference| between the model as it trained (the quantized base + adapter)
    and the full-precision base + adapter that is exported: what users see as "QLoRA merge drift"."""

    export_dir: Path
    n_shards: int
    size_bytes: int
    max_abs_diff: float
    merged: bool
    dtype: str
    tolerance: float
    adapter_effect: float | None
    source: str
    n_conversations: int
    quantized_drift: float | None = None
    gguf_file: Path | None = None
    gguf_bytes: int = 0
    quant: str | None = None
    parity: dict | None = None
    warnings: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        what = f"merged {self.source}" if self.merged else f"re-saved {self.source} (no adapter: nothing to merge)"
        out = [
            what,
            f"wrote {self.export_dir}: {self.n_shards} safetensors shard{'s' * (self.n_shards != 1)}, "
            f"{_size(self.size_bytes)}, {self.dtype}",
            f"logits vs the {'adapter model' if self.merged else 'original'} on {self.n_conversations} chat conversations: "
            f"max |diff| {self.max_abs_diff:.2e} (tolerance {self.tolerance:.1e}"
            + (f", rounding to {self.dtype} included" if self.dtype != "float32" else "") + ")",
        ]
        if self.adapter_effect is not None:
            out.append(f"the adapter itself moves the logits by up to {self.adapter_effect:.2e}")
            if self.adapter_effect <= self.tolerance:
                out.append("warning: the adapter barely changes the base model (its effect is within the tolerance), "
                           "so the check cannot tell a merged adapter from a missing one")
        if self.quantized_drift is not None:
            out.append(f"the model as trained, on the quantized base, differs from this full-precision merge by up to "
                       f"{self.quantized_drift:.2e} (QLoRA merge drift: the base's quantization error, not a merge error)")
        if self.gguf_file is not None:
            out.append(f"wrote {self.gguf_file.name} ({self.quant}, {_size(self.gguf_bytes)}) and Modelfile: "
                       f"ollama create NAME -f {self.export_dir / 'Modelfile'}")
        out.extend(parity_lines(self.parity))
        out.extend(f"warning: {w}" for w in self.warnings)
        return out


def parity_lines(record: dict | None) -> list[str]:
    """The parity gate's results, one line per check (a warning when it was skipped)."""
    if record is None:
        return ["warning: --no-verify: the parity gate was skipped; the export's tokens and answers were not compared with training's"]
    tokens = record["tokens"]
    out = [f"parity: token ids identical across {', '.join(tokens['sources'])} on {tokens['conversations']} conversations"]
    for name, r in record["generation"].items():
        ties = f", {len(r['near_ties'])} near ties" if r["near_ties"] else ""
        out.append(f"parity: {name}: first {r['tokens']} greedy tokens identical on {r['identical_greedy']}/{r['conversations']} "
                   f"conversations{ties}; logits within {r['max_rel_logit_diff']:.1e} of the reference (bound {r['bound']:.0e})")
    return out


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def export_model(trained: Trained, export_dir: Path, shard_gb: float = 5.0, verify_samples: int = 4,
                 dtype: torch.dtype | str | None = None, on_progress: Callable[[str], None] | None = None, *,
                 rtol: float = RTOL, trust_remote_code: bool = False, export_format: str = "hf", quant: str = "q8_0",
                 verify: bool = True) -> ExportResult:
    """Merge ``trained``'s adapter into its base (or re-save a full model) as ``export_dir``, checked and atomic.

    ``dtype``: of the written weights; None keeps the base model's (its config.json dtype, else float32). Merging
    and the checks run in fp32 on CPU. ``shard_gb``: largest safetensors shard, in GB (10^9 bytes). An existing
    ``export_dir`` that holds a previous export is replaced, only once the new one has passed its checks.

    ``export_format``: "hf", or "gguf" (the HF files plus ``model-<quant>.gguf`` and a ``Modelfile``); ``quant``: the
    GGUF's type (``gguf.QUANTS``). ``verify``: run the parity gate (``parity``).

    Raises SftlabError, before loading any weights, for a quantized base model, a non-LoRA adapter, an
    ``export_dir`` that is (or contains) an input or is a non-empty directory that is not an export, a GGUF the
    writer cannot make, and bad arguments; and, with nothing written, when a check fails.
    """
    say = on_progress or (lambda _msg: None)
    as_trained = trained
    if trained.quantization is not None:  # QLoRA: never merge into quantized weights, which would round the adapter away
        say(f"the adapter was trained on the {trained.quantization.describe()} quantized base; merging it into the full-precision "
            f"{trained.model_dir}")
        trained = replace(trained, quantization=None)
    export_dir = Path(export_dir).expanduser()
    out_dtype = _check_request(trained, export_dir, shard_gb, verify_samples, dtype)
    if export_format not in ("hf", "gguf"):
        raise SftlabError(f"export_format: {export_format!r} — use hf (safetensors) or gguf (safetensors + GGUF + Modelfile)")
    if export_format == "gguf":
        check_gguf_request(json.loads((trained.model_dir / "config.json").read_text(encoding="utf-8")), quant,
                           inference_tokenizer(trained, trust_remote_code))
    merged = trained.adapter_dir is not None

    trained_logits = None
    if as_trained.quantization is not None:  # loaded first and dropped: the two models are never in memory together
        say(f"computing the logits of {as_trained.describe()}, the model as it trained")
        model, tokenizer = load_for_inference(as_trained, "cpu", torch.float32, trust_remote_code)
        trained_logits = _logits(model, _verification_inputs(tokenizer, verify_samples))
        del model
        gc.collect()
    say(f"loading {trained.describe()} (float32, CPU)")
    model, tokenizer = load_for_inference(trained, "cpu", torch.float32, trust_remote_code)
    inputs = _verification_inputs(tokenizer, verify_samples)
    say(f"computing reference logits on {len(inputs)} chat conversations")
    reference = _logits(model, inputs)
    quantized_drift = None if trained_logits is None else _max_diff(trained_logits, reference)
    tolerance = rtol * max(1.0, max(r.abs().max().item() for r in reference))
    adapter_effect = None
    current = reference  # logits of the model in memory, computed in fp32
    conversations = CONVERSATIONS[:verify_samples]
    greedy = None
    if verify:
        say(f"generating {parity.GEN_TOKENS} greedy tokens per conversation with {trained.describe()} (the parity reference)")
        greedy = parity.greedy_reference(model, parity.prompts_of(tokenizer, conversations))
    if merged:
        with model.disable_adapter():
            adapter_effect = _max_diff(_logits(model, inputs), reference)
        say("merging the adapter into the base weights")
        model = model.merge_and_unload()
        untie_diverged(model)  # a trained embedding (modules_to_save) is no longer the tied head
        current = _logits(model, inputs)
        merge_diff = _max_diff(current, reference)
        if not merge_diff <= tolerance:  # `not <=` so that NaN fails too
            raise SftlabError(
                f"merging {trained.adapter_dir} changed the model's logits by up to {merge_diff:.2e} (tolerance {tolerance:.1e}) "
                "on the verification conversations; nothing was written — load the adapter unmerged (--adapter) instead")

    _set_stop_tokens(model, tokenizer)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.tmp-", dir=export_dir.parent))
    try:
        say(f"writing {_dtype_name(out_dtype)} safetensors shards of at most {shard_gb:g} GB beside {export_dir}")
        model.to(out_dtype)
        model.save_pretrained(tmp, max_shard_size=int(shard_gb * 1e9))
        saved_tokenizer = inference_tokenizer(trained, trust_remote_code)
        saved_tokenizer.save_pretrained(tmp)
        warnings: list[str] = []
        gguf_path = tmp / gguf_name(quant) if export_format == "gguf" else None
        if gguf_path is not None:  # from the weights just written, in the export's dtype
            say(f"writing {gguf_path.name}")
            warnings += write_gguf(model, saved_tokenizer, tmp, gguf_path, quant, export_dir.name)
            text, more, _ = modelfile(gguf_path.name, saved_tokenizer)
            (tmp / "Modelfile").write_text(text, encoding="utf-8")
            warnings += more
        if out_dtype != torch.float32:  # what was written, in fp32 like the reference (the cast back up is exact)
            model.float()
            current = _logits(model, inputs)
            if not all(torch.isfinite(c).all() for c in current):
                raise SftlabError(f"in {_dtype_name(out_dtype)} the model's logits are not finite (weights out of range); "
                                  "export with dtype bfloat16 or float32")
        del model
        gc.collect()  # the reloaded copy should not share memory with the merged one

        say("reloading the written export with plain transformers to check it")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
        exported = _logits(reloaded, inputs)
        write_diff = _max_diff(exported, current)
        if not write_diff <= tolerance:
            raise SftlabError(
                f"the written export does not reproduce the model it was written from (logits differ by up to {write_diff:.2e}, "
                f"tolerance {tolerance:.1e}); nothing was written — use the model{' with --adapter' if merged else ''} as it is")
        record_parity = None
        if greedy is not None:
            say("parity gate: token ids and greedy answers of the export")
            record_parity = {"generation": {"export": parity.compare_generations(reloaded, greedy, parity.BOUNDS[_dtype_name(out_dtype)],
                                                                                   "the exported model", tokenizer)}}
        del reloaded
        max_abs_diff = _max_diff(exported, reference)
        if record_parity is not None:
            record_parity = _parity_gate(tmp, tokenizer, gguf_path, quant, greedy, conversations, record_parity, say)
        if gguf_path is not None and adapter_effect is not None and adapter_effect / (tolerance / rtol if rtol else 1.0) <= parity.BOUNDS[quant]:
            warnings.append(f"the adapter moves the logits less than the {quant} bound of the parity gate, so the GGUF's check alone "
                            "could not tell it from the base model (the merge check above does)")

        shards = sorted(tmp.glob("*.safetensors"))
        record = {
            "base_model": str(trained.model_dir),
            "adapter": str(trained.adapter_dir) if merged else None,
            "merged_before": [str(m) for m in trained.merged],
            "merged": merged,
            "template": trained.template,
            "dtype": _dtype_name(out_dtype),
            "max_abs_diff": max_abs_diff,
            "tolerance": tolerance,
            "adapter_effect": adapter_effect,
            "quantized_drift": quantized_drift,
            "verified_on": len(inputs),
            "shards": len(shards),
            "format": export_format,
            "gguf": None if gguf_path is None else {"file": gguf_path.name, "quant": quant, "bytes": gguf_path.stat().st_size},
            "parity": record_parity,
            "warnings": warnings,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sftlab_version": __version__,
        }
        (tmp / EXPORT_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file() and p != gguf_path)  # the HF files
        say(f"moving the export into place at {export_dir}")
        fsync_tree(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        replace_dir(tmp, export_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(export_dir, len(shards), size, max_abs_diff, merged, _dtype_name(out_dtype), tolerance,
                        adapter_effect, trained.describe(), len(inputs), quantized_drift,
                        None if gguf_path is None else export_dir / gguf_path.name, record["gguf"]["bytes"] if gguf_path else 0,
                        quant if gguf_path else None, record_parity, tuple(warnings))


def _parity_gate(tmp: Path, tokenizer: PreTrainedTokenizerBase, gguf_path: Path | None, quant: str, greedy: parity.Reference,
                 conversations: list, record: dict, say: Callable[[str], None]) -> dict:
    """Parts (a) and the GGUF's (b) of the parity gate, over the files in ``tmp``; ``record`` holds the export's (b)."""
    from transformers import AutoTokenizer

    others = {"export": AutoTokenizer.from_pretrained(tmp)}
    if gguf_path is not None:  # tokens first: cheaper, and a tokenizer that differs makes every other number moot
        say(f"parity gate: reading {gguf_path.name} back with transformers")
        others["GGUF"] = parity.read_gguf(gguf_path, "tokenizer")
    record["tokens"] = parity.check_tokens(tokenizer, others, conversations)
    if gguf_path is not None:
        gguf_model = parity.read_gguf(gguf_path)
        record["generation"]["GGUF"] = parity.compare_generations(gguf_model, greedy, parity.BOUNDS[quant], f"the GGUF ({quant})", tokenizer)
        del gguf_model
        gc.collect()
    return record


def _check_request(trained: Trained, export_dir: Path, shard_gb: float, verify_samples: int,
                   dtype: torch.dtype | str | None) -> torch.dtype:
    """Every refusal that needs no weights; returns the dtype to write."""
    if not shard_gb > 0:
        raise SftlabError(f"export_size: {shard_gb} — the largest shard must be a positive size in GB (e.g. 5)")
    if not 1 <= verify_samples <= len(CONVERSATIONS):
        raise SftlabError(f"verify_samples: {verify_samples} — use 1..{len(CONVERSATIONS)} verification conversations")
    config = json.loads((trained.model_dir / "config.json").read_text(encoding="utf-8"))
    method = quant_method(config)
    if method is not None:
        if trained.adapter_dir is not None:
            raise SftlabError(
                f"{trained.model_dir} is a quantized model ({method}): merging into quantized weights rounds the adapter away "
                f"or fails; merge into the unquantized base instead: --model <the original full-precision model> --adapter {trained.adapter_dir}")
        raise SftlabError(f"{trained.model_dir} is a quantized model ({method}); export writes full-precision models — "
                          "this directory already loads with transformers as it is")
    for adapter in [*trained.merged, *([trained.adapter_dir] if trained.adapter_dir is not None else [])]:
        peft_type = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("peft_type")
        if peft_type != "LORA":
            raise SftlabError(f"{adapter}: a {peft_type} adapter; export merges LoRA adapters only — load it unmerged with --adapter")

    target = export_dir.resolve()
    inputs = {"base model": trained.model_dir, "adapter": trained.adapter_dir, "tokenizer": trained.tokenizer_dir,
              **{f"merged adapter {m}": m for m in trained.merged}}
    for name, path in inputs.items():
        if path is None:
            continue
        path = path.resolve()
        if path == target:
            raise SftlabError(f"export_dir {export_dir} is the {name} directory itself; export to a new directory (e.g. {export_dir}-merged)")
        if path.is_relative_to(target):  # replacing export_dir would delete the input
            raise SftlabError(f"export_dir {export_dir} contains the {name} ({path}); export to a new directory")
    if target.exists():
        if not target.is_dir():
            raise SftlabError(f"export_dir {export_dir} exists and is not a directory; choose another path")
        if any(target.iterdir()) and not (target / EXPORT_JSON).is_file():
            raise SftlabError(f"export_dir {export_dir} is a non-empty directory that is not a previous export (no {EXPORT_JSON}); "
                              "choose a new or empty directory, or remove it first")

    if dtype is None:  # the base's own precision: a bf16 base exports as bf16, the same size as it came
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        dtype = dtype if dtype in _DTYPES else "float32"
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise SftlabError(f"dtype: {dtype} — export writes one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise SftlabError(f"dtype: {dtype} — export writes one of {', '.join(_DTYPES)}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _verification_inputs(tokenizer: PreTrainedTokenizerBase, n: int) -> list[torch.Tensor]:
    """The first ``n`` conversations rendered with the chat template and tokenized as training does (the template
    writes BOS itself, so no special tokens are added)."""
    out = []
    for messages in CONVERSATIONS[:n]:
        try:
            text = render(tokenizer, messages)
        except Exception as e:  # jinja2 errors and template-raised exceptions alike
            raise SftlabError(f"the chat template cannot render a plain user/assistant conversation ({type(e).__name__}: {e})") from e
        out.append(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def _logits(model: PreTrainedModel, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 logits [seq, vocab] of each input, run one at a time so that no padding is involved."""
    with torch.inference_mode():
        return [model(input_ids=ids[None], use_cache=False).logits[0].float() for ids in inputs]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _set_stop_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make generation stop where the chat template ends an answer: add its end-of-turn token (``<|im_end|>``,
    ``<|eot_id|>``…) to the generation config's eos ids when the base does not stop there already."""
    eot = end_of_turn_token(tokenizer)
    if eot is None:
        return
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    eos = model.generation_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if eot_id not in ids:
        ids.append(eot_id)
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
