"""LLaMA-Factory's own example YAMLs (tests/fixtures/llamafactory/examples, unchanged) run through sftlab on data the
project wrote in the formats of LLaMA-Factory's data/ files, with only the model, paths and a step limit changed:
train (LoRA, full, pt, LoRA+, PiSSA, a saved tokenized set), predict, chat and merge, in the order a user runs them.

Each command runs from a copy of the fixture folder, as LLaMA-Factory's commands run from its repository root:
``dataset_dir`` defaults to ``data`` and ``output_dir``/``adapter_name_or_path`` are its ``saves/`` paths."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sftlab.cli import app

LF = Path(__file__).parents[1] / "fixtures" / "llamafactory"
SMALL = ["max_steps=2", "max_samples=8", "cutoff_len=256", "logging_steps=1"]  # the step limit (and small data)


@pytest.fixture(scope="module")
def lf_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamafactory")
    shutil.copytree(LF / "examples", root / "examples")
    shutil.copytree(LF / "data", root / "data")
    return root


def _run(root: Path, monkeypatch, *args: str, stdin: str | None = None) -> str:
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, list(args), input=stdin)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def lora_sft(lf_root, tiny_model_dir):
    """examples/train_lora/qwen3_lora_sft.yaml: identity + alpaca_en_demo, qwen3_nothink, bf16, LoRA rank 8."""
    with pytest.MonkeyPatch.context() as mp:
        _run(lf_root, mp, "train", "examples/train_lora/qwen3_lora_sft.yaml", f"model_name_or_path={tiny_model_dir}", *SMALL)
    return lf_root / "saves/qwen3-4b/lora/sft"


def test_lora_sft_example_trains_an_adapter_where_llamafactory_puts_it(lora_sft):
    assert (lora_sft / "adapter_model.safetensors").is_file() and (lora_sft / "checkpoint-2").is_dir()
    config = (lora_sft / "config.yaml").read_text(encoding="utf-8")
    assert "template: qwen3_nothink" in config and "lora_rank: 8" in config
    records = [json.loads(line) for line in (lora_sft / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert (lora_sft / "report.html").is_file()  # plot_loss: true


def test_merge_example_exports_the_trained_adapter(lora_sft, lf_root, tiny_model_dir, monkeypatch):
    """examples/merge_lora/qwen3_lora_sft.yaml: adapter saves/qwen3-4b/lora/sft → saves/qwen3_sft_merged."""
    _run(lf_root, monkeypatch, "export", "examples/merge_lora/qwen3_lora_sft.yaml", f"model_name_or_path={tiny_model_dir}")
    merged = lf_root / "saves/qwen3_sft_merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    assert not (merged / "adapter_config.json").exists()


def test_inference_example_chats_with_the_trained_adapter(lora_sft, lf_root, tiny_model_dir, monkeypatch):
    """examples/inference/qwen3_lora_sft.yaml (infer_backend: huggingface), a line on stdin, then end of input."""
    out = _run(lf_root, monkeypatch, "chat", "examples/inference/qwen3_lora_sft.yaml", f"model_name_or_path={tiny_model_dir}",
               "max_new_tokens=4", stdin="Who are you?\n")
    assert out.strip()


def test_predict_example_writes_llamafactory_prediction_files(lora_sft, lf_root, tiny_model_dir, monkeypatch):
    """examples/extras/nlg_eval/llama3_lora_predict.yaml: do_predict on identity + alpaca_en_demo with an adapter."""
    _run(lf_root, monkeypatch, "train", "examples/extras/nlg_eval/llama3_lora_predict.yaml", f"model_name_or_path={tiny_model_dir}",
         f"adapter_name_or_path={lora_sft}", "max_samples=3", "max_new_tokens=4", "template=llama3")
    out = lf_root / "saves/llama3-8b/lora/predict"
    lines = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 6 and all(set(r) == {"prompt", "predict", "label"} for r in lines)
    results = json.loads((out / "predict_results.json").read_text(encoding="utf-8"))
    assert {"predict_bleu-4", "predict_rouge-l", "predict_runtime"} <= set(results)
    assert not (out / "adapter_model.safetensors").exists()  # nothing trained


@pytest.mark.parametrize("example, extra, result", [
    ("train_full/qwen3_full_sft.yaml", [], "saves/qwen3-4b/full/sft/model.safetensors"),
    ("train_lora/qwen3_lora_pretrain.yaml", [], "saves/qwen3-4b/lora/pretrain/adapter_model.safetensors"),
    ("train_lora/qwen3_lora_pretrain.yaml", ["dataset=wiki_demo", "output_dir=saves/wiki"], "saves/wiki/adapter_model.safetensors"),
    ("extras/loraplus/llama3_lora_sft.yaml", [], "saves/llama3-8b/lora/sft/adapter_model.safetensors"),
    ("extras/pissa/llama3_lora_sft.yaml", ["pissa_iter=2"], "saves/llama3-8b/lora/sft/adapter_model.safetensors"),
])
def test_more_training_examples_run(lf_root, tiny_model_dir, monkeypatch, example, extra, result):
    _run(lf_root, monkeypatch, "train", f"examples/{example}", f"model_name_or_path={tiny_model_dir}", *SMALL, *extra,
         "overwrite_output_dir=true")
    assert (lf_root / result).is_file()


def test_preprocess_example_saves_the_tokenized_set_and_a_second_run_loads_it(lf_root, tiny_model_dir, monkeypatch):
    """examples/train_lora/qwen3_preprocess.yaml sets tokenized_path; run twice, the second reads no dataset."""
    args = ["train", "examples/train_lora/qwen3_preprocess.yaml", f"model_name_or_path={tiny_model_dir}", *SMALL,
            "output_dir=saves/preprocess-run"]
    _run(lf_root, monkeypatch, *args)
    saved = lf_root / "saves/qwen3-4b/dataset/sft"
    assert (saved / "sftlab_tokenized.json").is_file()
    (lf_root / "data" / "identity.json").rename(lf_root / "data" / "identity.moved")  # the second run must not read it
    try:
        _run(lf_root, monkeypatch, *args[:-1], "output_dir=saves/preprocess-run-2")
    finally:
        (lf_root / "data" / "identity.moved").rename(lf_root / "data" / "identity.json")
    assert (lf_root / "saves/preprocess-run-2/adapter_model.safetensors").is_file()


def test_deepspeed_example_finds_its_config_relative_to_the_working_directory(lf_root, monkeypatch):
    """examples/train_lora/qwen3_lora_sft_ds3.yaml names examples/deepspeed/ds_z3_config.json, as run from the root."""
    from sftlab.config import load_config
    from sftlab.train.deepspeed import check_deepspeed

    monkeypatch.chdir(lf_root)
    cfg = load_config("examples/train_lora/qwen3_lora_sft_ds3.yaml")
    assert cfg.deepspeed == "examples/deepspeed/ds_z3_config.json"
    assert check_deepspeed(cfg)["zero_optimization"]["stage"] == 3


@pytest.fixture(scope="module")
def tiny_64(tmp_path_factory, smol_dir):
    """The tiny Llama 64 wide: bitsandbytes' CPU 4-bit kernels quantize rows in blocks of 64."""
    from sftlab.model.assets import tiny_llama

    return tiny_llama(smol_dir, tmp_path_factory.mktemp("tiny-64") / "tiny-64", hidden=64)


def test_qlora_example_trains_on_a_4_bit_base(lf_root, tiny_64, monkeypatch):
    """examples/extras/fsdp_qlora/llama3_lora_sft.yaml (quantization_bit: 4), in one process: LLaMA-Factory shards
    it through an accelerate config, not the YAML."""
    _run(lf_root, monkeypatch, "train", "examples/extras/fsdp_qlora/llama3_lora_sft.yaml", f"model_name_or_path={tiny_64}", *SMALL,
         "overwrite_output_dir=true")
    out = lf_root / "saves/llama3-8b/lora/sft"
    assert (out / "adapter_model.safetensors").is_file() and "quantization_bit: 4" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("example, double", [("qwen3_lora_sft_otfq.yaml", True), ("qwen3_lora_sft_bnb_npu.yaml", False)])
def test_qlora_examples_train_on_a_4bit_base_that_chat_loads_again(lf_root, tiny_64, monkeypatch, example, double):
    """examples/train_qlora/*: quantization_bit 4 with bnb, on the fly; the run records the quantization, so chat
    loads the same 4-bit base from the adapter's config alone."""
    out = f"saves/qlora-{example.removesuffix('.yaml')}"
    _run(lf_root, monkeypatch, "train", f"examples/train_qlora/{example}", f"model_name_or_path={tiny_64}", *SMALL,
         f"output_dir={out}")
    run = yaml.safe_load((lf_root / out / "config.yaml").read_text(encoding="utf-8"))
    assert (run["quantization_bit"], run["quantization_method"], run["double_quantization"]) == (4, "bnb", double)
    assert (lf_root / out / "adapter_model.safetensors").is_file()
    reply = _run(lf_root, monkeypatch, "chat", f"{out}/config.yaml", "--max-new-tokens", "4", stdin="Who are you?\n")
    assert reply.strip()
    assert f"(4-bit (nf4{', double' if double else ''}))" in reply, reply
