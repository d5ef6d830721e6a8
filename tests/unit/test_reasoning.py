"""Reasoning (CoT) data: trained, masked or dropped; native reasoning_content or folded <think> blocks."""

import pytest

from sftlab.data.formats import FormatSpec, detect_format, to_messages
from sftlab.data.render import IGNORE_INDEX, apply_thinking, encode_conversation, end_of_turn_token, renders_reasoning_content

COT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2 makes 4"}]


def trained_text(tokenizer, messages, thinking="train", **kw):
    messages = apply_thinking(messages, thinking, renders_reasoning_content(tokenizer))
    e = encode_conversation(tokenizer, messages, eot=end_of_turn_token(tokenizer), cutoff_len=512,
                            mask_thinking=thinking == "mask", **kw)
    assert e.status == "kept", e.detail
    return tokenizer.decode([i for i, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX]), e


def test_which_templates_render_reasoning_content(qwen_tokenizer, smol_tokenizer):
    assert renders_reasoning_content(qwen_tokenizer) and not renders_reasoning_content(smol_tokenizer)


@pytest.mark.parametrize("thinking,expected", [
    ("train", "<think>\n2 plus 2 makes 4\n</think>\n\n4<|im_end|>"),
    ("mask", "4<|im_end|>"),
    ("drop", "<think>\n\n</think>\n\n4<|im_end|>"),  # Qwen3 still writes its empty think block
])
def test_qwen3_native_reasoning(qwen_tokenizer, thinking, expected):
    text, e = trained_text(qwen_tokenizer, COT, thinking)
    assert text == expected
    full = qwen_tokenizer.decode(e.input_ids)
    assert ("2 plus 2 makes 4" in full) == (thinking != "drop")


@pytest.mark.parametrize("thinking,expected", [
    ("train", "<think>\n2 plus 2 makes 4\n</think>\n\n4<|im_end|>"),
    ("mask", "4<|im_end|>"),
    ("drop", "4<|im_end|>"),
])
def test_reasoning_is_folded_into_content_for_templates_without_it(smol_tokenizer, thinking, expected):
    text, e = trained_text(smol_tokenizer, COT, thinking)
    assert text == expected
    assert ("2 plus 2 makes 4" in smol_tokenizer.decode(e.input_ids)) == (thinking != "drop")


def test_inline_think_block_is_the_same_as_reasoning_content(qwen_tokenizer):
    inline = [COT[0], {"role": "assistant", "content": "<think>\n2 plus 2 makes 4\n</think>\n\n4"}]
    assert trained_text(qwen_tokenizer, inline, "mask")[1].input_ids == trained_text(qwen_tokenizer, COT, "mask")[1].input_ids


def test_answer_that_also_appears_in_the_reasoning_is_located_after_it(qwen_tokenizer):
    messages = [COT[0], {"role": "assistant", "content": "4", "reasoning_content": "so it is 4"}]
    assert trained_text(qwen_tokenizer, messages, "mask")[0] == "4<|im_end|>"


def test_enable_thinking_false_reaches_the_template(qwen_tokenizer):
    plain = [COT[0], {"role": "assistant", "content": "4"}]
    text, e = trained_text(qwen_tokenizer, plain, template_kwargs={"enable_thinking": False})
    assert text == "4<|im_end|>"  # the empty think block is part of the prompt now
    expected = qwen_tokenizer.apply_chat_template(plain, tokenize=True, return_dict=True, enable_thinking=False)["input_ids"]
    assert e.input_ids == list(expected)


def test_cot_format_with_mapped_columns():
    row = {"q": "2+2?", "why": "2 plus 2 makes 4", "a": "4"}
    spec = FormatSpec("cot", {"question": "q", "thinking": "why", "answer": "a"})
    assert to_messages(row, spec) == COT
    detected = detect_format(["question", "thinking", "answer"], {})
    assert detected.formatting == "cot"
    assert to_messages({"question": "2+2?", "answer": "4"}, detected) == [COT[0], {"role": "assistant", "content": "4"}]


def test_earlier_reasoning_that_qwen3_drops_from_history_is_still_trained(qwen_tokenizer):
    from sftlab.data.render import encode_sample

    chat = [*COT, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "3 plus 3 makes 6"}]
    main, view = encode_sample(qwen_tokenizer, apply_thinking(chat, "train", True), eot=end_of_turn_token(qwen_tokenizer), cutoff_len=512)
    decode = lambda e: qwen_tokenizer.decode([i for i, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX])  # noqa: E731
    assert "2 plus 2 makes 4" not in qwen_tokenizer.decode(main.input_ids)  # the history view drops it...
    assert decode(main) == "<think>\n3 plus 3 makes 6\n</think>\n\n6<|im_end|>"
    assert decode(view) == "<think>\n2 plus 2 makes 4\n</think>\n\n4<|im_end|>"  # ...its own view trains it
