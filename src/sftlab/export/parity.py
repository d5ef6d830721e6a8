"""The export parity gate: what is exported prompts and answers like the model that was trained.

(a) Token ids. On each verification conversation, the ids of training's encoding (``render`` + the tokenizer,
    ``encode_conversation``) must equal those of the exported tokenizer's own ``apply_chat_template`` (reloaded from
    the written directory), of the server's ``prompt_ids`` over that tokenizer and, for a GGUF, of the tokenizer and
    chat template transformers rebuilds from the file alone — both for the whole conversation and for the prompt
    with the generation prompt.
(b) Greedy answers. The reference model (the adapter model, or the full model as given) generates ``n`` tokens
    greedily after each prompt; the candidate (the reloaded HF export, the GGUF read back by transformers) is run on
    the same tokens, teacher-forced, so position ``k`` compares the two models' next-token choice after the same
    history. Its logits must stay within ``bound`` of the reference's (max |difference| relative to the largest
    reference logit, floor 1), and its greedy token must be the reference's wherever the reference's top-2 margin is
    above twice the bound (two logits each off by at most the bound cannot swap a wider margin). Positions with a
    narrower margin are near ties: a different token there is reported, not failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftlab.data.render import encode_conversation, end_of_turn_token, render
from sftlab.errors import SftlabError
from sftlab.infer.generate import prompt_ids
from sftlab.model.assets import load_gguf

# Logit bounds of the gate: max |logit difference| over the vocabulary at each compared position, relative to the
# largest reference logit there (floor 1), per storage type. Measured (docs/gguf.md) on the tiny test models and on
# SmolLM2-135M-Instruct (the larger): f16 6e-4 / 1.3e-3, bf16 4e-3 / 1.1e-2, q8_0 1.4e-2 / 5.4e-2; each bound is about
# 3-4 times the larger, and below what a broken conversion does (a layer's sign flipped: > 0.5 on the tiny model).
# The llama.cpp types are scaled from q8_0's by the bits they drop, and are loose; only q4_k_m is measured (by hand,
# llama-cpp-python is not in the test environment): 8e-2 on a tiny 256-wide Llama, 1.7e-1 on SmolLM2-135M.
BOUNDS = {"float32": 1e-3, "float16": 5e-3, "f16": 5e-3, "bfloat16": 4e-2, "bf16": 4e-2, "q8_0": 0.15,
          "q6_k": 0.25, "q5_0": 0.3, "q5_1": 0.3, "q5_k_s": 0.3, "q5_k_m": 0.3, "q4_0": 0.5, "q4_1": 0.5, "q4_k_s": 0.5,
          "q4_k_m": 0.5, "q3_k_s": 0.8, "q3_k_m": 0.8, "q3_k_l": 0.8, "q2_k": 1.5}
GEN_TOKENS = 8


@dataclass(frozen=True)
class Reference:
    """The reference model's greedy continuation of each prompt: ``tokens[i]`` (``n`` ids) and the logits
    ``logits[i]`` [n, vocab] (fp32) that chose them."""

    prompts: list[list[int]]
    tokens: list[list[int]]
    logits: list[torch.Tensor]


def prompts_of(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
    """Each conversation without its last answer, as the server prompts with it."""
    return [prompt_ids(tokenizer, messages[:-1]) for messages in conversations]


@torch.inference_mode()
def greedy_reference(model: PreTrainedModel, prompts: list[list[int]], n: int = GEN_TOKENS) -> Reference:
    tokens, logits = [], []
    for prompt in prompts:
        ids, steps = list(prompt), []
        for _ in range(n):  # no cache and no stop token: the same n positions for every model
            step = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            steps.append(step)
            ids.append(int(step.argmax()))
        tokens.append(ids[len(prompt):])
        logits.append(torch.stack(steps))
    return Reference(prompts, tokens, logits)


@torch.inference_mode()
def compare_generations(model: PreTrainedModel, ref: Reference, bound: float, what: str,
                        tokenizer: PreTrainedTokenizerBase) -> dict:
    """Check ``model`` against ``ref`` (see the module docstring); returns the record, raises SftlabError on a failure."""
    worst, identical, near_ties = 0.0, 0, []
    for i, (prompt, want, ref_logits) in enumerate(zip(ref.prompts, ref.tokens, ref.logits, strict=True)):
        ids = torch.tensor([prompt + want[:-1]])
        got_logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:].float()
        scale = max(1.0, ref_logits.abs().max().item())
        diffs = (got_logits - ref_logits).abs().amax(dim=-1) / scale
        top2 = ref_logits.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]) / scale
        got = got_logits.argmax(dim=-1).tolist()
        for k, (a, b) in enumerate(zip(want, got)):
            if a == b:
                continue
            if margins[k] > 2 * bound:
                raise SftlabError(
                    f"parity: {what} chooses {tokenizer.decode([b])!r} (id {b}) where the reference chooses {tokenizer.decode([a])!r} "
                    f"(id {a}) at answer token {k} of verification conversation {i} (margin {margins[k]:.2e} > 2 × bound {bound:.1e}); "
                    "nothing was written")
            near_ties.append({"conversation": i, "position": k, "reference": a, "got": b, "margin": margins[k].item()})
        identical += got == want
        if not diffs.max() <= bound:  # `not <=` so that NaN fails too
            k = int(diffs.argmax())
            raise SftlabError(f"parity: {what}'s logits differ from the reference's by {diffs[k]:.2e} (relative; bound {bound:.1e}) "
                              f"at answer token {k} of verification conversation {i}; nothing was written")
        worst = max(worst, diffs.max().item())
    return {"max_rel_logit_diff": worst, "bound": bound, "identical_greedy": identical, "conversations": len(ref.prompts),
            "tokens": len(ref.tokens[0]) if ref.tokens else 0, "near_ties": near_ties, "read_as": type(model.config).__name__}


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if not isinstance(encoded, list) else encoded)


def check_tokens(training: PreTrainedTokenizerBase, others: dict[str, PreTrainedTokenizerBase],
                 conversations: list[list[dict[str, str]]]) -> dict:
    """Part (a): every tokenizer in ``others`` (by name) gives training's ids; returns the record, raises SftlabError."""
    eot = end_of_turn_token(training)
    for i, messages in enumerate(conversations):
        prompt = messages[:-1]
        want_full = encode_conversation(training, messages, eot=eot, cutoff_len=1 << 30).input_ids
        want_prompt = training(render(training, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for name, tok in others.items():
            checks = {"conversation": (want_full, _ids(tok.apply_chat_template(messages, tokenize=True))),
                      "prompt": (want_prompt, _ids(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)))}
            if name == "export":  # the server loads the export's tokenizer
                checks["server prompt"] = (want_prompt, prompt_ids(tok, prompt))
            for part, (want, got) in checks.items():
                if want != got:
                    k = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
                    a = repr(training.decode(want[k:k + 1])) if k < len(want) else "(end)"
                    b = repr(tok.decode(got[k:k + 1])) if k < len(got) else "(end)"
                    raise SftlabError(f"parity: the {name} tokenizer's {part} ids differ from training's on verification conversation {i} "
                                      f"at token {k}: training has {a}, the {name} has {b} (template or tokenizer differ); nothing was written")
    return {"conversations": len(conversations), "sources": ["training", *others, *(["server"] if "export" in others else [])]}


def read_gguf(path: Path, what: str = "model") -> PreTrainedModel | PreTrainedTokenizerBase:
    """The model (``what="model"``, fp32) or tokenizer (``"tokenizer"``) transformers rebuilds from the GGUF file alone
    (``model.assets.load_gguf``: no tokenizer or config file beside it can stand in for what the file says)."""
    try:
        return load_gguf(path, what)
    except Exception as e:  # transformers raises many types for a file it cannot read
        raise SftlabError(f"parity: transformers cannot read the written GGUF back ({type(e).__name__}: {e}); nothing was written") from e
