"""Golden label tests on real tokenizers: exactly the answers and their end-of-turn tokens are trained."""

import pytest

from conftest import MULTI, SINGLE
from sftlab.data.render import (
    IGNORE_INDEX, KEPT, NOT_PREFIX_STABLE, TOO_LONG, TURNS_DROPPED, encode_conversation, end_of_turn_token,
)

# token ids of the real tokenizers (SmolLM2 ChatML; Qwen3 with its <think> template)
SMOL_HELLO, SMOL_4, SMOL_IM_END = [19556, 17], [36], [2]
QWEN_HELLO, QWEN_4, QWEN_IM_END = [9707, 0], [19], [151645]
QWEN_EMPTY_THINK = [151667, 271, 151668, 271]  # "<think>\n\n</think>\n\n": what Qwen3 writes before its last answer


def encode(tokenizer, messages, **kw):
    kw.setdefault("cutoff_len", 512)
    return encode_conversation(tokenizer, messages, eot=end_of_turn_token(tokenizer), **kw)


def trained(e):
    return [i for i, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX]


def test_end_of_turn_tokens(smol_tokenizer, qwen_tokenizer):
    assert end_of_turn_token(smol_tokenizer) == "<|im_end|>"
    assert end_of_turn_token(qwen_tokenizer) == "<|im_end|>"


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
@pytest.mark.parametrize("name", ["smol", "qwen"])
def test_input_ids_equal_the_templates_own_rendering(name, messages, smol_tokenizer, qwen_tokenizer):
    tok = smol_tokenizer if name == "smol" else qwen_tokenizer
    expected = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    e = encode(tok, messages)
    assert e.status == KEPT
    assert e.input_ids == list(expected)
    assert len(e.labels) == len(e.input_ids)


def test_smol_single_turn(smol_tokenizer):
    e = encode(smol_tokenizer, SINGLE)
    assert trained(e) == SMOL_4 + SMOL_IM_END
    # the trained tokens are the last ones but the template's trailing newline
    assert e.labels[-3:] == SMOL_4 + SMOL_IM_END + [IGNORE_INDEX]


def test_smol_multi_turn_trains_every_answer(smol_tokenizer):
    assert trained(encode(smol_tokenizer, MULTI)) == SMOL_HELLO + SMOL_IM_END + SMOL_4 + SMOL_IM_END


def test_smol_masking_last_trains_only_the_last_answer(smol_tokenizer):
    assert trained(encode(smol_tokenizer, MULTI, masking="last")) == SMOL_4 + SMOL_IM_END


def test_masking_all_trains_everything(smol_tokenizer):
    e = encode(smol_tokenizer, MULTI, masking="all")
    assert e.labels == e.input_ids


SMOL_EVERY_ANSWER = SMOL_HELLO + SMOL_IM_END + SMOL_4 + SMOL_IM_END


@pytest.mark.parametrize("keys,expected", [
    ({}, SMOL_EVERY_ANSWER),
    ({"masking": "assistant"}, SMOL_EVERY_ANSWER),
    ({"train_on_prompt": False, "mask_history": False}, SMOL_EVERY_ANSWER),
    ({"masking": "last"}, SMOL_4 + SMOL_IM_END),
    ({"mask_history": True}, SMOL_4 + SMOL_IM_END),  # LLaMA-Factory's key for masking: last
    ({"masking": "all"}, "every token"),
    ({"train_on_prompt": True}, "every token"),  # LLaMA-Factory's key for masking: all
], ids=["default", "assistant", "aliases-false", "last", "mask_history", "all", "train_on_prompt"])
def test_masking_from_the_config_and_its_aliases(keys, expected, smol_tokenizer):
    """The config's masking (or the alias that sets it) reaches the labels through training's own encode_row."""
    from sftlab.config import load_config
    from sftlab.data.formats import detect_format
    from sftlab.data.pipeline import encode_options, encode_row

    cfg = load_config(None, [], model_name_or_path="m", dataset="x", **keys)
    row = {"messages": MULTI}
    (e,) = encode_row(row, detect_format(["messages"], row), smol_tokenizer, encode_options(cfg, smol_tokenizer))
    assert trained(e) == (e.input_ids if expected == "every token" else expected)


def test_system_prompt_is_never_trained(smol_tokenizer):
    e = encode(smol_tokenizer, MULTI)
    system_ids = smol_tokenizer("Be brief.", add_special_tokens=False)["input_ids"]
    start = e.input_ids.index(system_ids[0])
    assert all(label == IGNORE_INDEX for label in e.labels[: start + len(system_ids) + 1])


def test_qwen_single_turn_trains_the_think_block_it_will_generate(qwen_tokenizer):
    assert trained(encode(qwen_tokenizer, SINGLE)) == QWEN_EMPTY_THINK + QWEN_4 + QWEN_IM_END


def test_qwen_multi_turn_trains_each_answer_as_generated(qwen_tokenizer):
    # Qwen3 drops <think> from earlier answers once later turns follow. The model generated "Hello!"
    # with a think block, so it is trained in its own view, and left untrained in the full conversation.
    from sftlab.data.render import VIEW, encode_sample

    main, view = encode_sample(qwen_tokenizer, MULTI, eot=end_of_turn_token(qwen_tokenizer), cutoff_len=512)
    assert main.status == KEPT and main.rewritten == (2,)
    assert trained(main) == QWEN_EMPTY_THINK + QWEN_4 + QWEN_IM_END
    assert view.status == VIEW and "turn 2" in view.detail
    assert view.input_ids == list(qwen_tokenizer.apply_chat_template(MULTI[:3], tokenize=True, return_dict=True)["input_ids"])
    assert trained(view) == QWEN_EMPTY_THINK + QWEN_HELLO + QWEN_IM_END


def test_templates_that_keep_history_get_no_extra_views(smol_tokenizer):
    from sftlab.data.render import encode_sample

    assert len(encode_sample(smol_tokenizer, MULTI, eot=end_of_turn_token(smol_tokenizer), cutoff_len=512)) == 1


def test_qwen_masking_last(qwen_tokenizer):
    e = encode(qwen_tokenizer, MULTI, masking="last")
    assert trained(e) == QWEN_EMPTY_THINK + QWEN_4 + QWEN_IM_END and e.rewritten == ()  # no views needed


def test_cutoff_drops_whole_later_turns(smol_tokenizer):
    full = encode(smol_tokenizer, MULTI)
    cut = encode(smol_tokenizer, MULTI, cutoff_len=len(full.input_ids) - 2)  # cuts into the last answer
    assert cut.status == TURNS_DROPPED and "1 later assistant turn" in cut.detail
    assert trained(cut) == SMOL_HELLO + SMOL_IM_END
    # exactly the template's own rendering of the shorter conversation
    assert cut.input_ids == list(smol_tokenizer.apply_chat_template(MULTI[:3], tokenize=True, return_dict=True)["input_ids"])


def test_cutoff_renders_the_kept_last_answer_as_generated(qwen_tokenizer):
    full = encode(qwen_tokenizer, MULTI)
    cut = encode(qwen_tokenizer, MULTI, cutoff_len=len(full.input_ids) - 2)
    assert cut.status == TURNS_DROPPED and cut.rewritten == ()
    assert trained(cut) == QWEN_EMPTY_THINK + QWEN_HELLO + QWEN_IM_END  # as Qwen3 generates it, think block included


def test_cutoff_that_only_cuts_trailing_template_text_keeps_every_turn(smol_tokenizer):
    full = encode(smol_tokenizer, MULTI)
    e = encode(smol_tokenizer, MULTI, cutoff_len=len(full.input_ids) - 1)  # only the final newline is over
    assert e.status == KEPT and e.input_ids == full.input_ids[:-1] and trained(e) == trained(full)


def test_cutoff_drops_a_sample_whose_first_answer_does_not_fit(smol_tokenizer):
    e = encode(smol_tokenizer, SINGLE, cutoff_len=20)
    assert e.status == TOO_LONG and e.input_ids == [] and "cutoff_len 20" in e.detail


def test_no_doubled_bos(smol_tokenizer):
    # default.jinja writes BOS itself; tokenizing must not add a second one
    from sftlab.data.templates import builtin_template

    tok = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tok.chat_template = builtin_template("default")
    e = encode(tok, SINGLE)
    assert e.input_ids[0] == tok.bos_token_id and e.input_ids[1] != tok.bos_token_id
    assert e.input_ids.count(tok.bos_token_id) == 1


def test_template_that_is_not_prefix_stable_is_reported(smol_tokenizer):
    tok = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    # numbers turns from the end: rendering a prefix gives different text than the whole conversation
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }} {{ messages|length - loop.index0 }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    e = encode(tok, SINGLE)
    assert e.status == NOT_PREFIX_STABLE and "turn 1" in e.detail and e.input_ids == []


@pytest.mark.parametrize("name", ["chatml", "qwen", "default"])  # the others need their family's tokens: test_templates.py
def test_builtin_templates_train_answer_and_end_of_turn(name, smol_tokenizer):
    from sftlab.data.templates import builtin_template

    tok = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tok.chat_template = builtin_template(name)
    e = encode(tok, MULTI)
    assert e.status == KEPT
    text = tok.decode(trained(e))
    assert "Hello!" in text and "4" in text and "Be brief" not in text and "2+2" not in text


def test_default_system_applies_only_where_a_sample_has_none():
    from sftlab.data.render import with_default_system

    own = [{"role": "system", "content": "Own."}, *SINGLE]
    assert with_default_system(own, "Default.") == own
    assert with_default_system(SINGLE, "Default.") == [{"role": "system", "content": "Default."}, *SINGLE]
    assert with_default_system(SINGLE, None) == SINGLE


def test_default_system_replaces_the_templates_own_default(smol_tokenizer):
    from sftlab.data.render import with_default_system

    e = encode(smol_tokenizer, with_default_system(SINGLE, "You extract JSON."))
    text = smol_tokenizer.decode(e.input_ids)
    assert text.startswith("<|im_start|>system\nYou extract JSON.<|im_end|>") and "SmolLM" not in text
    assert trained(e) == SMOL_4 + SMOL_IM_END


def test_template_without_end_of_turn_token_is_warned_about(smol_tokenizer):
    from sftlab.data.render import template_warnings

    assert template_warnings(smol_tokenizer, end_of_turn_token(smol_tokenizer)) == []
    tok = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    eot = end_of_turn_token(tok)
    assert eot is None
    assert any("no end-of-turn special token" in w for w in template_warnings(tok, eot))
    e = encode(tok, SINGLE)  # still exact: the span is the whole rendered turn
    assert e.status == KEPT and tok.decode(trained(e)) == "4\n"


# --- a sample far over cutoff_len is settled without tokenizing it (a 10 MB line once took minutes and gigabytes)

HUGE = "lorem ipsum dolor " * 600_000  # 10.8 MB


def test_a_huge_sample_is_dropped_without_being_tokenized(smol_tokenizer):
    import time

    start = time.perf_counter()
    e = encode(smol_tokenizer, [{"role": "user", "content": HUGE}, {"role": "assistant", "content": "4"}])
    assert time.perf_counter() - start < 5  # tokenizing it takes tens of seconds and gigabytes
    assert e.status == TOO_LONG and e.input_ids == [] and "surely over 512 tokens" in e.detail and "cutoff_len 512" in e.detail


@pytest.mark.parametrize("name", ["smol", "qwen"])
def test_a_huge_later_turn_is_dropped_exactly_as_tokenizing_would(name, smol_tokenizer, qwen_tokenizer):
    tokenizer = {"smol": smol_tokenizer, "qwen": qwen_tokenizer}[name]
    messages = [*MULTI[:3], {"role": "user", "content": HUGE}, {"role": "assistant", "content": "4"}]
    e = encode(tokenizer, messages)
    shorter = encode(tokenizer, messages[:3])
    assert e.status == TURNS_DROPPED and "1 later assistant turn" in e.detail
    assert (e.input_ids, e.labels, e.rewritten) == (shorter.input_ids, shorter.labels, shorter.rewritten)


def test_a_batch_with_a_huge_row_tokenizes_only_the_others(qwen_tokenizer):
    from sftlab.config import load_config
    from sftlab.data.formats import detect_format
    from sftlab.data.pipeline import encode_options, encode_rows
    from sftlab.data.render import tokenize_rendered

    options = encode_options(load_config(None, [], model_name_or_path="qwen", dataset="x", cutoff_len=64), qwen_tokenizer)
    spec = detect_format(["messages"], {"messages": [{"role": "user", "content": "q"}]})
    rows = [{"messages": MULTI}, {"messages": [{"role": "user", "content": HUGE}, {"role": "assistant", "content": "x"}]},
            {"messages": SINGLE}]
    batch = encode_rows(rows, spec, qwen_tokenizer, options)
    assert batch[1][0].status == TOO_LONG and "surely over 64 tokens" in batch[1][0].detail
    for k in (0, 2):  # byte-identical to the plain encoding
        assert [(x.input_ids, x.labels, x.status) for x in batch[k]] == \
            [(x.input_ids, x.labels, x.status) for x in encode_rows([rows[k]], spec, qwen_tokenizer, options)[0]]
    text, ids, offsets = tokenize_rendered(qwen_tokenizer, ["short", HUGE], cutoff_len=64)[1]
    assert text is HUGE and ids is None and offsets is None


@pytest.mark.parametrize("name", ["smol", "qwen", "llama3"])
def test_the_characters_per_token_bound_holds_on_texts_that_tokenize_densest(name, smol_tokenizer, qwen_tokenizer, llama3_tokenizer):
    """Runs of spaces or punctuation make the longest tokens; decomposed Greek/Hangul shrink under NFC (4 and 3 to 1)."""
    import unicodedata

    from sftlab.data.render import max_chars_per_token

    tokenizer = {"smol": smol_tokenizer, "qwen": qwen_tokenizer, "llama3": llama3_tokenizer}[name]
    most = max_chars_per_token(tokenizer)
    assert most is not None
    for text in (" " * 4000, "=" * 4000, "\n" * 4000, "    " * 1000 + "}", unicodedata.normalize("NFD", "ᾄ각") * 1000):
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) * most >= len(text)
