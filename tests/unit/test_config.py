"""The config declaration: LLaMA-Factory YAML loads, unknown keys get hints, docs are generated from it."""

from pathlib import Path

import pytest

from sftlab.config import ConfigError, SFTConfig, config_reference, dump_config, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_llamafactory_guide_yaml_loads():
    cfg = load_config(ROOT / "tests/fixtures/llamafactory_my_sft.yaml")
    assert cfg.model_name_or_path == "Qwen/Qwen2.5-7B" and cfg.trust_remote_code
    assert cfg.dataset == ["my_custom_sft"] and cfg.template == "qwen" and cfg.lora_target == "all"
    assert cfg.learning_rate == 1e-4 and cfg.gradient_accumulation_steps == 8 and cfg.report_to == "tensorboard"
    assert cfg.alpha == 128


def test_seed_document_yaml_is_the_fixture():
    seed = ROOT.parent / "shared/seeds/sft-llamafactory-guide.zh.md"
    if not seed.is_file():
        pytest.skip("shared/ seeds not beside the checkout")
    text = seed.read_text(encoding="utf-8", errors="replace")
    block = text.split("```yaml", 2)[1].split("```")[0]
    fixture = (ROOT / "tests/fixtures/llamafactory_my_sft.yaml").read_text(encoding="utf-8")
    keys = [line.split(":")[0] for line in block.splitlines() if line and not line.startswith("#")]
    assert keys and all(f"\n{k}:" in "\n" + fixture for k in keys)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="unknown key 'learning_rat' — did you mean 'learning_rate'"):
        load_config(None, ["learning_rat=1e-4"], model_name_or_path="m", dataset="d")


def test_overrides_are_typed_from_yaml():
    cfg = load_config(None, ["learning_rate=1e-4", "bf16=true", "dataset=a,b", "lora_target=q_proj,v_proj", "val_size=10"],
                      model_name_or_path="m")
    assert cfg.learning_rate == 1e-4 and cfg.bf16 is True
    assert cfg.dataset == ["a", "b"] and cfg.lora_target == ["q_proj", "v_proj"] and cfg.val_size == 10


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"learning_rate: .*'fast'"):
        load_config(None, ["learning_rate=fast"], model_name_or_path="m", dataset="d")


def test_packing_with_group_by_length_says_which_to_drop():
    with pytest.raises(ConfigError, match="packing and group_by_length are both true: .*drop group_by_length"):
        load_config(None, ["packing=true", "group_by_length=true"], model_name_or_path="m", dataset="d")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["lora_rank=4"], model_name_or_path="m", dataset="d")
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("keys,masking", [
    ({}, "assistant"), ({"train_on_prompt": True}, "all"), ({"mask_history": True}, "last"),
    ({"train_on_prompt": False, "mask_history": False}, "assistant"), ({"masking": "last", "mask_history": True}, "last"),
    ({"masking": "all", "train_on_prompt": True, "mask_history": False}, "all"), ({"masking": "last"}, "last"),
])
def test_masking_aliases_resolve_and_the_dump_loads_again(keys, masking, tmp_path):
    cfg = load_config(None, [], model_name_or_path="m", dataset="d", **keys)
    assert cfg.masking == masking
    assert (cfg.train_on_prompt, cfg.mask_history) == (keys.get("train_on_prompt"), keys.get("mask_history"))  # as written
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_train_on_prompt_with_mask_history_is_refused_naming_both(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\ntrain_on_prompt: true\nmask_history: true\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert "train_on_prompt and mask_history contradict each other" in message
    assert "masking: all" in message and "masking: last" in message


@pytest.mark.parametrize("masking,alias", [("last", "train_on_prompt=true"), ("all", "mask_history=true"),
                                           ("assistant", "train_on_prompt=true"), ("all", "train_on_prompt=false")])
def test_an_alias_that_contradicts_masking_is_refused(masking, alias):
    key, _, value = alias.partition("=")
    with pytest.raises(ConfigError, match=f"{key}: {value} contradicts masking: {masking}; remove {key}"):
        load_config(None, [f"masking={masking}", alias], model_name_or_path="m", dataset="d")


def test_cli_refuses_contradicting_masking_keys_in_one_error_line(tmp_path):
    from conftest import write_config
    from test_bad_input import assert_names, error_line, run_cli

    cfg = write_config(tmp_path / "cfg.yaml", model_name_or_path="m", dataset="a.json", train_on_prompt=True, mask_history=True)
    result = run_cli("data", "preview", cfg, cwd=tmp_path)
    assert_names(error_line(result), str(cfg), "train_on_prompt", "mask_history", "masking: all or masking: last")
    assert result.returncode == 2  # SftlabError.exit_code


def test_every_key_has_help_and_docs_are_current():
    assert all(f.description for f in SFTConfig.model_fields.values())
    assert (ROOT / "docs/config.md").read_text(encoding="utf-8") == config_reference(), "run: sftlab config-docs"


def test_every_example_config_loads():
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# sftlab "), f"{path} must start with the command that runs it"
        load_config(path)
