"""Tool use: rendered by the template's own tool support, calls trained, tool results never trained."""

import json

import pytest

from sftlab.config import load_config
from sftlab.data.formats import FormatSpec, RowError, to_messages, to_tools
from sftlab.data.pipeline import build_data
from sftlab.data.render import IGNORE_INDEX, encode_sample, end_of_turn_token, renders_tools
from sftlab.errors import SftlabError

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "18C sunny"},
    {"role": "assistant", "content": "It is 18C and sunny."},
]
# Qwen3 writes a think block before an answer generated last, and drops it once later turns follow:
# the call is trained in its own view, as generated; the full conversation trains the final answer.
QWEN_CALL = '<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
QWEN_ANSWER = "<think>\n\n</think>\n\nIt is 18C and sunny.<|im_end|>"


def trained_text(tok, e):
    return tok.decode([i for i, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX])


def test_tool_support_is_probed(qwen_tokenizer, smol_tokenizer):
    assert renders_tools(qwen_tokenizer) and not renders_tools(smol_tokenizer)


def test_qwen3_trains_the_call_and_the_answer_never_the_tool_result(qwen_tokenizer):
    e, view = encode_sample(qwen_tokenizer, CHAT, eot=end_of_turn_token(qwen_tokenizer), cutoff_len=2048, template_kwargs={"tools": TOOLS})
    assert e.status == "kept" and view.status == "view"
    assert e.input_ids == list(qwen_tokenizer.apply_chat_template(CHAT, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"])
    assert view.input_ids == list(qwen_tokenizer.apply_chat_template(CHAT[:2], tools=TOOLS, tokenize=True, return_dict=True)["input_ids"])
    assert trained_text(qwen_tokenizer, e) == QWEN_ANSWER and trained_text(qwen_tokenizer, view) == QWEN_CALL
    assert "18C sunny<" not in trained_text(qwen_tokenizer, e) + trained_text(qwen_tokenizer, view)
    prompt = qwen_tokenizer.decode(e.input_ids)
    assert "# Tools" in prompt and '"description": "Weather in a city"' in prompt  # definitions rendered, untrained


def test_sharegpt_function_call_and_observation_turns():
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": "18C sunny"},
            {"from": "gpt", "value": "It is 18C and sunny."},
        ],
        "tools": json.dumps(TOOLS),  # LLaMA-Factory stores tools as a JSON string
    }
    spec = FormatSpec("sharegpt")
    assert to_messages(row, spec) == CHAT
    assert to_tools(row, spec) == TOOLS


def test_arrow_null_padding_is_removed_from_arguments_and_tools():
    # Arrow gives every row the union of all rows' keys; the missing ones come back as None
    row = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"city": "Paris", "query": None}}}]}],
           "tools": [{"type": "function", "function": {"name": "f", "description": None, "parameters": {"type": "object"}}}]}
    spec = FormatSpec("openai")
    assert to_messages(row, spec)[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert to_tools(row, spec) == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("value,message", [("{not json", "not valid JSON"), (json.dumps({"arguments": {}}), '"name"')])
def test_bad_function_call_turns(value, message):
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": value}]}
    with pytest.raises(RowError, match=message):
        to_messages(row, FormatSpec("sharegpt"))


def _tool_file(tmp_path):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": CHAT, "tools": json.dumps(TOOLS)}) + "\n")
    return path


def test_tool_data_through_the_pipeline(tmp_path, qwen_tokenizer):
    cfg = load_config(None, [], model_name_or_path="qwen", dataset=str(_tool_file(tmp_path)))
    data = build_data(cfg, qwen_tokenizer)
    assert data.report.counts == {"kept": 1, "view": 1} and data.report.lines()[0] == "1 of 1 samples will be trained"
    decoded = [qwen_tokenizer.decode([t for t, l in zip(r["input_ids"], r["labels"]) if l != IGNORE_INDEX]) for r in data.train]
    assert decoded == [QWEN_ANSWER, QWEN_CALL]


def test_template_without_tool_support_is_an_error_not_a_silent_loss(tmp_path, smol_tokenizer):
    path = _tool_file(tmp_path)
    cfg = load_config(None, [], model_name_or_path="smol", dataset=str(path))
    with pytest.raises(SftlabError, match=f"{path} sample 0: the chat template cannot render tools"):
        build_data(cfg, smol_tokenizer)
