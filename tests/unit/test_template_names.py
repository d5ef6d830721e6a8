"""LLaMA-Factory template names in ``template:``: the tokenizer's own template, a built-in equivalent, or a clear error."""

import copy
import json
import logging
from importlib import resources

import pytest

from conftest import MULTI, SINGLE
from sftlab.data.templates import (
    BUILTIN_PREFIX, builtin_names, builtin_template, first_difference, llamafactory_templates, resolve_template,
)
from sftlab.errors import SftlabError

NAMES = sorted(llamafactory_templates())
CHATML = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"


def ids(tok, messages, template=None, **kw):
    return list(tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True, **kw)["input_ids"])


def with_own(tokenizer, name):
    """A copy of ``tokenizer`` whose own chat template is the built-in ``name``."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = builtin_template(name)
    return tok


def test_the_registry_is_package_data_naming_its_source():
    data = json.loads(resources.files("sftlab.data.templates").joinpath("llamafactory.json").read_text(encoding="utf-8"))
    assert "hiyouga/LlamaFactory" in data["source"] and "src/llamafactory/data/template.py" in data["source"]
    assert len(data["templates"]) >= 120
    for name, entry in data["templates"].items():
        assert entry["builtin"] is None or entry["builtin"] in builtin_names(), name
        assert entry.get("thinking", False) is False and (("thinking" in entry) == name.endswith("_nothink")), name
    assert set(builtin_names()) <= set(data["templates"])  # every built-in name is also a LLaMA-Factory name


@pytest.mark.parametrize("name", NAMES)
def test_every_name_without_a_tokenizer_template_is_a_builtin_or_a_clear_error(name, gpt2_tokenizer):
    entry = llamafactory_templates()[name]
    try:
        text = resolve_template(name, gpt2_tokenizer.chat_template, gpt2_tokenizer)
    except SftlabError as e:
        assert entry["builtin"] is None and name not in builtin_names()
        line = str(e)
        assert "\n" not in line and f"template: {name} " in line and "no built-in equivalent" in line
        assert "ships a chat template" in line and all(b in line for b in builtin_names())
        return
    assert text == builtin_template(entry["builtin"] or name)


@pytest.mark.parametrize("name", NAMES)
def test_every_name_with_a_tokenizer_template_means_the_tokenizers_own(name, qwen_tokenizer):
    own = qwen_tokenizer.chat_template
    text = resolve_template(name, own, qwen_tokenizer)
    nothink = llamafactory_templates()[name].get("thinking") is False
    assert text.endswith(own) and (text == own) != nothink  # the own template, with thinking off in front for *_nothink


def test_qwen3_nothink_renders_exactly_as_enable_thinking_false(qwen_tokenizer, caplog):
    with caplog.at_level(logging.INFO):
        text = resolve_template("qwen3_nothink", qwen_tokenizer.chat_template, qwen_tokenizer)
    assert "means the tokenizer's own chat template, with enable_thinking: false" in caplog.text
    for messages, gen in ((SINGLE, False), (MULTI, False), (MULTI[:4], True)):
        kw = dict(add_generation_prompt=gen)
        assert ids(qwen_tokenizer, messages, text, **kw) == ids(qwen_tokenizer, messages, enable_thinking=False, **kw)
    prompt = qwen_tokenizer.apply_chat_template(MULTI[:4], chat_template=text, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the empty think block: no thinking
    # an explicit enable_thinking at inference still wins over the default
    assert ids(qwen_tokenizer, MULTI[:4], text, add_generation_prompt=True, enable_thinking=True) == \
        ids(qwen_tokenizer, MULTI[:4], add_generation_prompt=True)
    assert resolve_template("qwen3_nothink", text, qwen_tokenizer) == text  # the saved template is not prefixed twice


def test_qwen3_nothink_reports_that_the_own_template_differs_from_llamafactorys(qwen_tokenizer, caplog):
    # LLaMA-Factory's qwen3_nothink (= chatml) writes no empty think block; Qwen3's own template with thinking off does
    with caplog.at_level(logging.WARNING):
        resolve_template("qwen3_nothink", qwen_tokenizer.chat_template, qwen_tokenizer)
    line = caplog.text.strip()
    assert "template: qwen3_nothink: the tokenizer's own chat template (used)" in line and "built-in chatml" in line
    assert "<think>" in line and f"template: {BUILTIN_PREFIX}chatml" in line
    assert len([r for r in caplog.records if r.name.startswith("sftlab")]) == 1


def test_nothink_name_and_enable_thinking_true_is_an_error(qwen_tokenizer, gpt2_tokenizer):
    for tok in (qwen_tokenizer, gpt2_tokenizer):
        with pytest.raises(SftlabError, match=r"^template: qwen3_nothink means enable_thinking: false .* enable_thinking: true is set"):
            resolve_template("qwen3_nothink", tok.chat_template, tok, enable_thinking=True)
    assert resolve_template("qwen3_nothink", qwen_tokenizer.chat_template, qwen_tokenizer, enable_thinking=False)


def test_nothink_name_on_a_template_without_a_thinking_switch_is_the_own_template(smol_tokenizer, caplog):
    with caplog.at_level(logging.INFO):
        assert resolve_template("qwen3_nothink", smol_tokenizer.chat_template) == smol_tokenizer.chat_template
    assert "no thinking switch" in caplog.text


def test_glm4_without_a_tokenizer_template_names_close_names(gpt2_tokenizer):
    with pytest.raises(SftlabError) as e:
        resolve_template("glm4", None, gpt2_tokenizer)
    line = str(e.value)
    assert line.startswith("template: glm4 is a LLaMA-Factory template sftlab has no built-in equivalent for")
    assert "close names that work here: chatglm3" in line and "ships a chat template" in line


def test_llama3_without_a_tokenizer_template_is_the_builtin(llama3_tokenizer, gpt2_tokenizer):
    for tok in (llama3_tokenizer, gpt2_tokenizer):
        assert resolve_template("llama3", tok.chat_template, tok) == builtin_template("llama3")
    assert resolve_template("gemma3", None) == builtin_template("gemma")
    assert resolve_template("qwen3_nothink", None) == builtin_template("chatml")
    assert resolve_template("qwen", None) == builtin_template("qwen")  # with Qwen's default system prompt, as LLaMA-Factory's


def test_a_same_named_builtin_of_another_format_is_used_with_a_warning(gpt2_tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_template("default", None, gpt2_tokenizer) == builtin_template("default")
    assert "not LLaMA-Factory's format" in caplog.text and "System: " in caplog.text


@pytest.mark.parametrize("name", ["chatml", "default"])
def test_builtin_that_differs_from_the_own_template_is_reported_and_the_own_one_used(name, llama3_tokenizer, caplog):
    tok = with_own(llama3_tokenizer, "llama3")
    with caplog.at_level(logging.WARNING):
        assert resolve_template(name, tok.chat_template, tok) == tok.chat_template
    ours = [r for r in caplog.records if r.name.startswith("sftlab")]
    assert len(ours) == 1
    line = ours[0].getMessage()
    assert line.startswith(f"template: {name}: the tokenizer's own chat template (used) renders other tokens than the built-in {name}")
    assert "probe 1, token " in line and "<|start_header_id|>user<|end_header_id|>" in line and f"set template: {BUILTIN_PREFIX}{name}" in line


def test_no_warning_when_the_builtin_renders_the_same_tokens(llama3_tokenizer, smol_tokenizer, caplog):
    tok = with_own(llama3_tokenizer, "llama3")
    with caplog.at_level(logging.WARNING):
        assert resolve_template("llama3", tok.chat_template, tok) == tok.chat_template
        assert resolve_template("mllama", tok.chat_template, tok) == tok.chat_template
    assert not [r for r in caplog.records if r.name.startswith("sftlab")]
    assert first_difference(tok, tok.chat_template, builtin_template("llama3")) is None
    assert first_difference(smol_tokenizer, builtin_template("chatml"), builtin_template("chatml")) is None


def test_builtin_prefix_forces_the_builtin_over_the_own_template(smol_tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_template("builtin:default", smol_tokenizer.chat_template, smol_tokenizer) == builtin_template("default")
    assert "template: default replaces the tokenizer's own chat template" in caplog.text
    assert resolve_template("builtin:chatml", None) == builtin_template("chatml")
    with pytest.raises(SftlabError, match=r"^template: builtin:chatm: no built-in template 'chatm' \(close: chatml"):
        resolve_template("builtin:chatm", None)


def test_unknown_name_lists_close_names_of_both_registries(smol_tokenizer):
    with pytest.raises(SftlabError) as e:
        resolve_template("qwen3_nothinking", smol_tokenizer.chat_template)
    line = str(e.value)
    assert "\n" not in line and "unknown template 'qwen3_nothinking'" in line and "close names: qwen3_nothink" in line
    assert all(b in line for b in builtin_names()) and "builtin:NAME" in line
    with pytest.raises(SftlabError, match="close names: chatml"):
        resolve_template("chatmll", None)


def test_chatml_probe_matches_the_documented_format(smol_tokenizer):
    assert smol_tokenizer.apply_chat_template(SINGLE, chat_template=builtin_template("chatml"), tokenize=False) == CHATML
