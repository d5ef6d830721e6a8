"""Every key LLaMA-Factory accepts is understood: declared with the same meaning, accepted with no effect (said once),
or refused in one line naming what to use; its own example YAMLs load; GPU YAMLs run on a CPU without bf16."""

import json
import logging
from pathlib import Path

import pytest
import yaml

from sftlab.compat import EARLIER_TRAINER_KEYS, FOREIGN
from sftlab.config import OWN_KEYS, ConfigError, SFTConfig, config_reference, load_config

LF = Path(__file__).parents[1] / "fixtures" / "llamafactory"
HPARAMS = json.loads((LF / "hparams_keys.json").read_text(encoding="utf-8"))
TRAINER = json.loads((LF / "hf_training_args.json").read_text(encoding="utf-8"))
LF_KEYS = {f["name"] for f in HPARAMS["fields"]}
HF_KEYS = {f["name"] for f in TRAINER["fields"]}
THEIRS = LF_KEYS | HF_KEYS | EARLIER_TRAINER_KEYS
EXAMPLES = [e for e in json.loads((LF / "examples_index.json").read_text(encoding="utf-8"))
            if e["path"] != "examples/extras/multi_tokens/tokens_cfg.yaml"]  # a token → description map, not a run config


def test_the_key_lists_say_where_they_come_from():
    assert HPARAMS["source"] and TRAINER["source"]
    assert len(LF_KEYS) > 250 and len(HF_KEYS) > 100  # the whole lists, not a sample


def test_every_llamafactory_and_trainer_key_has_one_category():
    fields = set(SFTConfig.model_fields)
    assert not (fields & set(FOREIGN)), "a key is both declared and foreign"
    assert sorted(THEIRS - fields - set(FOREIGN)) == []  # none is unknown
    assert not (OWN_KEYS & THEIRS), "a key sftlab calls its own is one of theirs"
    assert sorted(fields - OWN_KEYS - THEIRS) == []  # every other declared key is one of theirs, same name
    assert set(FOREIGN) - THEIRS == {"fsdp_transformer_layer_cls_to_wrap", "ulysses_context_parallel_size"}  # keys their YAMLs set


def test_docs_table_lists_every_key_with_its_category():
    text = config_reference()
    table = text[text.index("## LLaMA-Factory keys"):]
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip() for line in table.splitlines() if line.startswith("| `")}
    assert THEIRS <= set(rows)
    assert {rows[k] for k in THEIRS} == {"same", "no effect", "refused"}
    assert rows["use_unsloth"] == "refused" and rows["ddp_timeout"] == "no effect" and rows["lora_rank"] == "same"
    assert Path("docs/config.md").read_text(encoding="utf-8") == text  # regenerated: sftlab config-docs


def _yaml(tmp_path, **values) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset": "d", **values}), encoding="utf-8")
    return path


def test_a_refused_key_is_one_line_naming_the_file_the_key_and_what_to_use(tmp_path):
    path = _yaml(tmp_path, use_unsloth=True)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: use_unsloth: True is not supported: ") and "drop the key" in msg
    with pytest.raises(ConfigError, match=r"^override infer_backend=vllm: infer_backend: 'vllm' is not supported: .*huggingface"):
        load_config(_yaml(tmp_path), ["infer_backend=vllm"])


@pytest.mark.parametrize("values", [{"use_unsloth": False}, {"infer_backend": "huggingface"}, {"quantization_bit": None},
                                    {"image_max_pixels": 589824}, {"eval_strategy": "steps"}, {"num_beams": 1},
                                    {"average_tokens_across_devices": True}, {"metric_for_best_model": "eval_loss"}])
def test_a_foreign_key_left_off_loads_silently(tmp_path, values, caplog):
    with caplog.at_level(logging.INFO, logger="sftlab"):
        cfg = load_config(_yaml(tmp_path, **values))
    assert cfg._notes == [] and not caplog.records


@pytest.mark.parametrize("values", [{"num_beams": 4}, {"average_tokens_across_devices": False}, {"label_smoothing_factor": 0.1},
                                    {"eval_strategy": "epoch"}, {"image_max_pixels": 1}, {"streaming": True}, {"pure_bf16": True}])
def test_a_foreign_key_that_would_change_the_result_is_refused(tmp_path, values):
    (key, value), = values.items()
    with pytest.raises(ConfigError, match=rf": {key}: {value!r} is not supported: "):
        load_config(_yaml(tmp_path, **values))


def test_an_accepted_key_is_said_once_with_its_reason(tmp_path, caplog, monkeypatch):
    path = _yaml(tmp_path, ddp_timeout=180000000, dataloader_num_workers=4, overwrite_cache=True)
    with caplog.at_level(logging.INFO, logger="sftlab"):
        cfg = load_config(path)
    lines = [r.getMessage() for r in caplog.records]
    assert cfg._notes == lines and len(lines) == 3
    (ddp,) = [line for line in lines if line.startswith("ddp_timeout: 180000000 has no effect here: ")]
    assert "--nproc" in ddp
    assert cfg.model_dump() == load_config(_yaml(tmp_path)).model_dump()  # nothing of them reaches the run
    caplog.clear()
    monkeypatch.setenv("LOCAL_RANK", "1")  # each process of a launch: the command already said it
    with caplog.at_level(logging.INFO, logger="sftlab"):
        load_config(path)
    assert not caplog.records


@pytest.mark.parametrize("typo, meant", [("ddp_timout", "ddp_timeout"), ("learnig_rate", "learning_rate"), ("use_unslot", "use_unsloth")])
def test_typos_still_get_did_you_mean(tmp_path, typo, meant):
    with pytest.raises(ConfigError, match=f"unknown key '{typo}' — did you mean '{meant}'"):
        load_config(_yaml(tmp_path, **{typo: 1}))


def test_llamafactory_aliases_mean_what_they_mean_there(tmp_path):
    from sftlab.infer.generate import GenerationSettings

    assert load_config(_yaml(tmp_path, neat_packing=True)).packing is True
    with pytest.raises(ConfigError, match="neat_packing: true contradicts packing: false"):
        load_config(_yaml(tmp_path, neat_packing=True, packing=False))
    greedy = GenerationSettings.from_config(load_config(_yaml(tmp_path, do_sample=False, temperature=0.95, top_k=50)))
    assert greedy.kwargs()["do_sample"] is False and greedy.kwargs()["top_k"] is None
    sampled = GenerationSettings.from_config(load_config(_yaml(tmp_path, temperature=0.95, top_k=50)))
    assert sampled.kwargs()["do_sample"] is True and sampled.kwargs()["top_k"] == 50
    with pytest.raises(ConfigError, match="do_sample: true needs temperature > 0"):
        load_config(_yaml(tmp_path, do_sample=True))
    for stage in ("dpo", "kto", "rm", "ppo"):
        with pytest.raises(ConfigError, match=f"stage: '{stage}' .* sftlab does not have: sftlab trains stage: sft"):
            load_config(_yaml(tmp_path, stage=stage))
    with pytest.raises(ConfigError, match="'oft' .* is not in sftlab: finetuning_type: lora"):
        load_config(_yaml(tmp_path, finetuning_type="oft"))


# What each of LLaMA-Factory's example YAMLs needs that sftlab does not have: the key its one-line error names.
REFUSED_EXAMPLES = {
    "examples/extras/adam_mini/qwen2_full_sft.yaml": "use_adam_mini", "examples/extras/apollo/llama3_full_sft.yaml": "use_apollo",
    "examples/extras/asft/llama2_full_asft.yaml": "use_asft_loss", "examples/extras/asft/qwen2_full_asft.yaml": "use_asft_loss",
    "examples/extras/badam/llama3_full_sft.yaml": "use_badam", "examples/extras/dft/qwen2_full_sft.yaml": "use_dft_loss",
    "examples/extras/eaft/qwen25_05b_eaft_full.yaml": "use_eaft_loss", "examples/extras/fp8/llama3_fp8_deepspeed_sft.yaml": "fp8",
    "examples/extras/fp8/llama3_fp8_fsdp_sft.yaml": "fp8",     "examples/extras/galore/llama3_full_sft.yaml": "use_galore", "examples/extras/llama_pro/llama3_freeze_sft.yaml": "use_llama_pro",
    "examples/extras/mod/llama3_full_sft.yaml": "mixture_of_depths", "examples/extras/muon/qwen2_full_sft.yaml": "use_muon",
    "examples/extras/oft/llama3_oft_sft.yaml": "finetuning_type", "examples/extras/oft/qwen2_5vl_oft_sft.yaml": "image_max_pixels",
    "examples/extras/qoft/llama3_oft_sft_awq.yaml": "finetuning_type", "examples/extras/qoft/llama3_oft_sft_bnb_npu.yaml": "finetuning_type",
    "examples/extras/qoft/llama3_oft_sft_gptq.yaml": "finetuning_type", "examples/merge_lora/qwen3_gptq.yaml": "export_quantization_bit", "examples/train_full/qwen3vl_full_sft.yaml": "image_max_pixels",
    "examples/train_lora/gemma4_lora_sft_cp.yaml": "ulysses_context_parallel_size",
    "examples/train_lora/qwen25vl_3b_lora_sft_8gb.yaml": "image_max_pixels", "examples/train_lora/qwen3_lora_dpo.yaml": "stage",
    "examples/train_lora/qwen3_lora_kto.yaml": "stage", "examples/train_lora/qwen3_lora_reward.yaml": "stage",
    "examples/train_lora/qwen3_lora_sft_ray.yaml": "ray_num_workers", "examples/train_lora/qwen3vl_lora_dpo.yaml": "image_max_pixels",
    "examples/train_lora/qwen3vl_lora_sft.yaml": "image_max_pixels",
}


@pytest.mark.parametrize("example", EXAMPLES, ids=[e["path"] for e in EXAMPLES])
def test_each_llamafactory_example_loads_or_names_the_feature_it_needs(example, monkeypatch):
    monkeypatch.chdir(LF)
    refused = REFUSED_EXAMPLES.get(example["path"])
    if refused is None:
        cfg = load_config(example["path"])
        assert cfg.model_name_or_path == example["keys"]["model_name_or_path"]
        return
    with pytest.raises(ConfigError) as e:
        load_config(example["path"])
    assert str(e.value).startswith(f"{example['path']}: {refused}: ") and "\n" not in str(e.value)


def test_a_gpu_yaml_runs_in_bf16_on_a_cpu_without_bf16_and_says_it_is_slower(monkeypatch, caplog):
    import torch

    from sftlab.model import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: False)
    cfg = SFTConfig(model_name_or_path="m", dataset="d", bf16=True)
    with caplog.at_level(logging.WARNING, logger="sftlab"):
        assert device.mixed_precision(cfg) == "bf16"
    (record,) = caplog.records
    assert "slower than with bf16: false" in record.getMessage()
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sftlab"):
        assert device.mixed_precision(cfg) == "bf16"
    assert not caplog.records
