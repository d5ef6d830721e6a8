"""The DeepSpeed JSON: "auto" filled from the YAML, contradictions and unsupported sections refused in one line."""

import json
from pathlib import Path

import pytest

from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.train.deepspeed import check_deepspeed, fill_deepspeed_config, read_deepspeed_config, size_buckets, zero_stage

EXAMPLES = Path(__file__).parents[2] / "examples" / "deepspeed"


def _fill(ds, **over):
    values = dict(micro_batch=2, accumulation=4, world_size=8, max_grad_norm=1.0, precision="bf16") | over
    return fill_deepspeed_config(ds, "ds.json", **values)


@pytest.mark.parametrize("name", ["ds_z2_config", "ds_z2_offload_config", "ds_z3_config", "ds_z3_offload_config"])
def test_shipped_configs_fill_completely_from_the_yaml(name):
    ds = read_deepspeed_config(EXAMPLES / f"{name}.json")
    filled = _fill(ds)
    size_buckets(filled, name, hidden_size=576)
    assert filled["train_micro_batch_size_per_gpu"] == 2 and filled["gradient_accumulation_steps"] == 4
    assert filled["train_batch_size"] == 2 * 4 * 8
    assert filled["gradient_clipping"] == 1.0
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(filled)
    assert zero_stage(filled) == int(name[4])
    assert ("offload_optimizer" in filled["zero_optimization"]) == ("offload" in name)
    if zero_stage(filled) == 3:
        assert filled["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 576 * 576)
        assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["train_batch_size"] == "auto"  # the file's own dict is left as read


def test_a_pinned_value_that_contradicts_the_yaml_is_an_error():
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}}
    with pytest.raises(SftlabError, match=r"ds.json: train_micro_batch_size_per_gpu is 4 but the YAML's per_device_train_batch_size gives 2"):
        _fill(ds)
    assert _fill(ds, micro_batch=4)["train_batch_size"] == 4 * 4 * 8  # agreeing is fine
    with pytest.raises(SftlabError, match=r"bf16.enabled is true but the YAML's bf16 gives false"):
        _fill({"bf16": {"enabled": True}}, precision="no")


def test_unfillable_auto_and_bad_files_are_named(tmp_path):
    ds = _fill({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}})
    with pytest.raises(SftlabError, match=r"cannot fill zero_optimization.allgather_bucket_size"):
        size_buckets(ds, "ds.json", 64)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(SftlabError, match=r"bad.json line 2: not valid JSON"):
        read_deepspeed_config(bad)
    with pytest.raises(SftlabError, match=r"does not exist; use one of examples/deepspeed"):
        read_deepspeed_config(tmp_path / "missing.json")
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(SftlabError, match=r"has a \"optimizer\" section; sftlab builds the optimizer"):
        read_deepspeed_config(bad)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(SftlabError, match=r"stage is 4"):
        read_deepspeed_config(bad)


def test_config_checks_deepspeed_against_the_rest():
    z3 = str(EXAMPLES / "ds_z3_config.json")
    with pytest.raises(SftlabError, match="deepspeed and fsdp are both set"):
        load_config(None, [], model_name_or_path="m", dataset="d", deepspeed=z3, fsdp=True)
    best = load_config(None, [], model_name_or_path="m", dataset="d", deepspeed=z3, val_size=0.1, eval_steps=5, load_best_model_at_end=True,
                       do_eval_baseline=True)
    assert zero_stage(check_deepspeed(best)) == 3  # the best checkpoint holds gathered weights: its files become the result
    z2 = load_config(None, [], model_name_or_path="m", dataset="d", deepspeed=str(EXAMPLES / "ds_z2_config.json"), val_size=0.1, do_eval_baseline=True)
    assert zero_stage(check_deepspeed(z2)) == 2  # ZeRO-2 keeps whole weights on every rank: the baseline runs


def test_deepspeed_without_the_package_names_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    cfg = load_config(None, [], model_name_or_path="m", dataset="d", deepspeed=str(EXAMPLES / "ds_z2_config.json"))
    with pytest.raises(SftlabError, match=r"DeepSpeed is not installed: pip install 'sftlab\[deepspeed\]'"):
        check_deepspeed(cfg)

