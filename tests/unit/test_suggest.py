"""sftlab suggest: its config is valid and loads as written, its choices follow the data size, the length
distribution and the memory, and the written YAML trains as-is."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from sftlab.cli import app
from sftlab.config import load_config
from sftlab.data.stats import Stats
from sftlab.errors import SftlabError
from sftlab.plan.estimate import GB, Target, memory, model_shape
from sftlab.plan.suggest import suggest


def llama(**over):
    from transformers import LlamaConfig

    values = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                  head_dim=64, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192)
    return LlamaConfig(**{**values, **over})


@pytest.fixture(scope="module")
def small_model():  # SmolLM2-135M's shape
    return model_shape(llama(), "small")


@pytest.fixture(scope="module")
def big_model():  # Qwen2.5-7B's shape (a Llama-style config of the same sizes)
    return model_shape(llama(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, head_dim=128, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768), "big")


def stats(n: int, median: int = 300, tail: int = 0, turns: int = 1, spread: float = 0.35, seed: int = 0) -> Stats:
    """``n`` samples with log-normal lengths around ``median`` tokens (a third prompt), ``tail`` of them 10× longer."""
    rng = np.random.default_rng(seed)
    length = np.maximum(8, rng.lognormal(np.log(median), spread, n)).astype(np.int32)
    length[:tail] *= 10
    prompt = (length // 3).astype(np.int32)
    return Stats(["data.json"], 2048, prompt=prompt, answer=(length - prompt).astype(np.int32), turns=np.full(n, turns, np.int32))


def run(data: Stats, shape, memory_gb: float, devices: int = 1):
    base = load_config(None, [], model_name_or_path="org/model", dataset="data.json")
    return suggest(data, shape, base, Target(device="cuda", memory=memory_gb * GB, devices=devices))


def values(s) -> dict:
    return {c.key: c.value for c in s.choices}


def test_small_data_gets_lora_and_seed_rules(small_model):
    s = run(stats(600), small_model, 24)
    v = values(s)
    assert v["finetuning_type"] == "lora" and v["lora_rank"] == 8 and v["lora_alpha"] == 16
    assert v["num_train_epochs"] == 5 and v["val_size"] == pytest.approx(100 / 600, abs=0.01)  # ≥ 100 held out
    assert v["learning_rate"] == 1e-4  # the common 5e-5, doubled for a < 1B model
    n_train = 600 - 100
    assert v["per_device_train_batch_size"] * v["gradient_accumulation_steps"] == 16 <= n_train / 8
    assert v["bf16"] is True and v["gradient_checkpointing"] is False and v["packing"] is False
    assert all(c.reason for c in s.choices if c.key not in ("model_name_or_path", "stage", "dataset", "output_dir", "overwrite_output_dir"))


def test_more_data_means_fewer_epochs_bigger_batches_and_full_tuning(small_model):
    few, many = values(run(stats(3_000), small_model, 80)), values(run(stats(200_000), small_model, 80))
    assert few["finetuning_type"] == "lora" and many["finetuning_type"] == "full"
    assert (few["num_train_epochs"], many["num_train_epochs"]) == (3, 1)
    assert few["per_device_train_batch_size"] * few["gradient_accumulation_steps"] == 32
    assert many["per_device_train_batch_size"] * many["gradient_accumulation_steps"] == 128
    assert many["learning_rate"] == 2e-5 and many["val_size"] == 2000  # full: the common 1e-5 doubled for a small model
    assert "lora_rank" not in many


def test_memory_decides_method_checkpointing_and_batch(big_model):
    roomy = values(run(stats(50_000, median=1500), big_model, 80))
    # 7B full tuning needs 16 B per parameter before activations: not on one 80 GB GPU
    assert roomy["finetuning_type"] == "lora" and roomy["lora_rank"] == 16
    tight = run(stats(50_000, median=1500), big_model, 24)
    t = values(tight)
    assert t["finetuning_type"] == "lora" and t["gradient_checkpointing"] is True
    assert t["per_device_train_batch_size"] <= roomy["per_device_train_batch_size"]
    assert tight.estimate.memory.total <= 24 * GB
    reason = next(c.reason for c in tight.choices if c.key == "gradient_checkpointing")
    assert "without it only" in reason
    # eight 80 GB GPUs with ZeRO-3 would hold it; a 12 GB card cannot even hold LoRA at batch 1
    with pytest.raises(SftlabError, match="even QLoRA with gradient checkpointing at batch 1"):
        run(stats(1_000, median=4000), big_model, 12)


def test_cutoff_covers_the_data(small_model):
    data = stats(2_000, median=300, spread=0.1)
    short_tail = values(run(data, small_model, 24))
    assert short_tail["cutoff_len"] >= data.cutoff_for(100) and short_tail["cutoff_len"] % 64 == 0
    long_tail = stats(2_000, median=300, tail=10)  # 0.5 % ten times longer
    v = values(run(long_tail, small_model, 24))
    assert long_tail.cutoff_for(99) <= v["cutoff_len"] < long_tail.cutoff_for(100)


def test_packing_only_for_many_short_single_turn_samples(small_model):
    short = stats(5_000, median=60, tail=60)  # a long tail keeps cutoff_len well above the median
    assert values(run(short, small_model, 24))["packing"] is True
    multi = run(stats(5_000, median=60, tail=60, turns=3), small_model, 24)
    assert values(multi)["packing"] is False
    assert "100% multi-turn" in next(c.reason for c in multi.choices if c.key == "packing")
    s = run(short, small_model, 24)
    v = values(s)
    per_row = v["cutoff_len"] * 0.95 / float(np.mean(short.length))
    assert 0.5 * 64 <= v["per_device_train_batch_size"] * v["gradient_accumulation_steps"] * per_row <= 2 * 64
    assert "in sftlab's rows they do not" in next(c.reason for c in s.choices if c.key == "packing")


def test_written_yaml_loads_as_suggested(small_model, tmp_path):
    s = run(stats(800), small_model, 24)
    path = tmp_path / "s.yaml"
    path.write_text(s.yaml("s.yaml"), encoding="utf-8")
    text = path.read_text()
    assert text.startswith("# sftlab train s.yaml\n") and "# rule of thumb: 3-10 epochs" in text
    assert load_config(path) == s.cfg
    assert yaml.safe_load(text)["cutoff_len"] == s.cfg.cutoff_len
    assert memory(small_model, s.cfg, Target(device="cuda", memory=24 * GB)).total <= 24 * GB


def test_suggest_cli_writes_a_config_that_trains(tmp_path, tiny_model_dir, alpaca_file):
    from sftlab.train.run import run_training

    out = tmp_path / "suggested.yaml"
    result = CliRunner().invoke(app, ["suggest", str(alpaca_file), "--model", str(tiny_model_dir), "--device", "cpu",
                                      "--gpu-memory", "8GB", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    cfg = load_config(out, [f"output_dir={tmp_path / 'run'}", "max_steps=1", "plot_loss=false"])
    assert cfg.finetuning_type == "lora" and cfg.val_size > 0
    assert (run_training(cfg) / "adapter_model.safetensors").is_file()


def test_qlora_is_suggested_when_lora_does_not_fit(big_model):
    """7B on a 14 GB card: LoRA's frozen bf16 base alone is ~14 GB; in 4 bits ~7 GB (embeddings and head stay fp32)."""
    data = stats(2_000, median=300)
    base = load_config(None, [], model_name_or_path="org/model", dataset="data.json", bf16=True)
    lora = base.model_copy(update={"per_device_train_batch_size": 1, "gradient_checkpointing": True})
    assert memory(big_model, lora, Target(device="cuda", memory=14 * GB)).total > 14 * GB
    s = run(data, big_model, 14)
    v = values(s)
    assert v["finetuning_type"] == "lora" and v["quantization_bit"] == 4
    assert "QLoRA (quantization_bit: 4) does" in next(c.reason for c in s.choices if c.key == "finetuning_type")
    assert s.estimate.memory.total <= 14 * GB
    assert "quantization_bit" not in values(run(data, big_model, 80))  # where LoRA fits, the base stays full precision
