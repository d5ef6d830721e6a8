"""The web UI's Train form comes from the config declaration: defaults, help and choices, and back to the same config."""

import pytest

from sftlab.config import SFTConfig, load_config
from sftlab.errors import SftlabError
from sftlab.webui.app import FORM_KEYS, check_bind, form_field, resolve_config, shown
from sftlab.webui.labels import LABELS

gr = pytest.importorskip("gradio", reason="pip install gradio")


def test_form_widgets_show_the_declared_defaults_and_help():
    from sftlab.webui.app import build_app

    demo = build_app()
    widgets = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    for key in FORM_KEYS:
        field, widget = SFTConfig.model_fields[key], widgets[f"f_{key}"]
        assert widget.info == field.description, key
        assert widget.value == shown(None if field.is_required() else field.get_default(call_default_factory=True)), key
    assert isinstance(widgets["f_finetuning_type"], gr.Dropdown) and [c[0] for c in widgets["f_finetuning_type"].choices] == ["lora", "full", "freeze"]
    assert isinstance(widgets["f_bf16"], gr.Checkbox) and widgets["f_bf16"].value is False
    assert form_field("learning_rate").default == SFTConfig.model_fields["learning_rate"].default


def test_form_values_give_back_the_same_config(tmp_path):
    cfg = load_config(None, [], model_name_or_path="m", dataset="a.json, b.jsonl", learning_rate=2e-4, eval_steps=5, bf16=True,
                      finetuning_type="full", lora_target="q_proj,v_proj")
    values = {k: shown(getattr(cfg, k)) for k in FORM_KEYS}
    assert resolve_config(None, values, lora_target="q_proj,v_proj") == cfg
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("model_name_or_path: m\ndataset: x.json\nlora_target: q_proj\n", encoding="utf-8")
    from_yaml = resolve_config(str(yaml_path), {"learning_rate": "3e-4", "template": ""})
    assert from_yaml.lora_target == ["q_proj"] and from_yaml.learning_rate == 3e-4 and from_yaml.template is None  # empty box: YAML/default stands


def test_a_public_host_needs_auth():
    assert check_bind("127.0.0.1", None) is None
    assert check_bind("0.0.0.0", "ann:secret") == ("ann", "secret")
    with pytest.raises(SftlabError, match="--auth"):
        check_bind("0.0.0.0", None)
    with pytest.raises(SftlabError, match="user:password"):
        check_bind("0.0.0.0", "ann")


def test_every_label_has_both_languages():
    assert LABELS["en"].keys() == LABELS["zh"].keys() and all(LABELS["zh"].values())


def test_a_llamafactory_yaml_fills_the_form(monkeypatch):
    """The Train tab takes LLaMA-Factory's own example YAML as its config file (its foreign keys have no effect)."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).parents[1] / "fixtures" / "llamafactory")
    cfg = resolve_config("examples/train_lora/qwen3_lora_sft.yaml", {"learning_rate": "3e-4"})
    assert (cfg.template, cfg.lora_rank, cfg.dataset, cfg.learning_rate) == ("qwen3_nothink", 8, ["identity", "alpaca_en_demo"], 3e-4)
