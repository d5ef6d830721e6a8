"""`sftlab export` on a tiny model: the merged export answers like the adapter, loads with plain transformers,
is sharded and written atomically, and is refused where a merge would be wrong or destroy an input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftlab.errors import SftlabError
from sftlab.export.merge import CONVERSATIONS, EXPORT_JSON, export_model
from sftlab.model.load import locate_trained

PROMPTS = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "你好，请介绍一下你自己。"}]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, adapter_dir):
    return export_model(locate_trained(str(tiny_model_dir), str(adapter_dir)), tmp_path_factory.mktemp("export") / "merged")


def _adapter_model(tiny_model_dir: Path, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter_dir).eval()


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_merged_export_gives_the_adapter_models_logits(exported, tiny_model_dir, adapter_dir):
    assert exported.merged and exported.dtype == "float32" and exported.n_shards == 1
    # the adapter changes the model a lot, so equal logits mean a real merge, not a dropped adapter
    assert exported.adapter_effect > 100 * exported.tolerance
    assert 0 < exported.max_abs_diff < 1e-5

    # recomputed independently: plain transformers on the export vs peft on base + adapter
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(exported.export_dir, dtype=torch.float32).eval()
    adapter = _adapter_model(tiny_model_dir, adapter_dir)
    diff = 0.0
    with torch.inference_mode():
        for messages in CONVERSATIONS[: exported.n_conversations]:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            diff = max(diff, (merged(**ids).logits - adapter(**ids).logits).abs().max().item())
    assert diff == pytest.approx(exported.max_abs_diff, rel=1e-3)

    record = json.loads((exported.export_dir / EXPORT_JSON).read_text())
    assert record["base_model"] == str(tiny_model_dir) and record["adapter"] == str(adapter_dir)
    assert record["max_abs_diff"] == exported.max_abs_diff and record["dtype"] == "float32" and record["created"]
    assert "wrote" in "\n".join(exported.lines())


def test_export_answers_like_the_adapter_in_chat(exported, tiny_model_dir, adapter_dir):
    """Loaded with plain transformers and its own saved chat template, the export generates the adapter's tokens."""
    assert not (exported.export_dir / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(exported.export_dir)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(adapter_dir).chat_template
    merged = AutoModelForCausalLM.from_pretrained(exported.export_dir)
    adapter = _adapter_model(tiny_model_dir, adapter_dir)
    for messages in PROMPTS:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        want = adapter.generate(**ids, max_new_tokens=12, do_sample=False)
        got = merged.generate(**ids, max_new_tokens=12, do_sample=False)
        assert got.tolist() == want.tolist()


def test_generation_config_stops_at_the_templates_end_of_turn(exported):
    tokenizer = AutoTokenizer.from_pretrained(exported.export_dir)
    eos = json.loads((exported.export_dir / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ([eos] if isinstance(eos, int) else eos)


def test_full_model_is_resaved_in_shards_and_replaces_a_previous_export(tmp_path, tiny_model_dir):
    # a full fine-tuned model whose generation config stops at <|endoftext|> only (as many base models do)
    model_dir = tmp_path / "full"
    shutil.copytree(tiny_model_dir, model_dir)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 0}))
    trained = locate_trained(str(model_dir))
    target = tmp_path / "export"
    target.mkdir()  # an empty directory is a fine target

    result = export_model(trained, target, shard_gb=0.001)
    assert not result.merged and result.adapter_effect is None and "nothing to merge" in result.lines()[0]
    shards = sorted(target.glob("*.safetensors"))
    assert result.n_shards == len(shards) >= 2 and (target / "model.safetensors.index.json").is_file()
    assert result.max_abs_diff < 1e-6
    assert json.loads((target / "generation_config.json").read_text())["eos_token_id"] == [0, 2]  # + <|im_end|>
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    for (name, a), b in zip(original.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # exported again over it, in bfloat16 and one shard: replaced whole, no stale shard or index left
    result = export_model(trained, target, dtype="bfloat16")
    assert result.n_shards == 1 and sorted(p.name for p in target.glob("model*")) == ["model.safetensors"]
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((target / EXPORT_JSON).read_text())["dtype"] == "bfloat16"
    assert 0 < result.max_abs_diff < 0.1  # bf16 rounding of the weights, reported (not checked)
    assert _leftovers(tmp_path) == []


def test_refuses_a_quantized_base_without_loading_weights(tmp_path, tiny_model_dir, adapter_dir):
    quant = tmp_path / "quant"
    shutil.copytree(tiny_model_dir, quant)
    config = json.loads((quant / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quant / "config.json").write_text(json.dumps(config))
    (quant / "model.safetensors").write_bytes(b"not weights: loading them would fail with another error")

    with pytest.raises(SftlabError, match=r"quantized model \(bitsandbytes\).*merge into the unquantized base.*--model"):
        export_model(locate_trained(str(quant), str(adapter_dir)), tmp_path / "out")
    with pytest.raises(SftlabError, match="quantized model"):
        export_model(locate_trained(str(quant)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_an_export_dir_that_is_an_input_or_holds_other_files(tmp_path, tiny_model_dir, adapter_dir):
    trained = locate_trained(str(tiny_model_dir), str(adapter_dir))
    before = sorted(p.name for p in adapter_dir.iterdir())
    with pytest.raises(SftlabError, match="is the adapter directory itself"):
        export_model(trained, adapter_dir)
    with pytest.raises(SftlabError, match="is the base model directory itself"):
        export_model(trained, tiny_model_dir)
    with pytest.raises(SftlabError, match="contains the adapter"):
        export_model(trained, adapter_dir.parent)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(SftlabError, match="not a previous export"):
        export_model(trained, other)
    assert sorted(p.name for p in adapter_dir.iterdir()) == before and (other / "todo.txt").read_text() == "keep me"
    with pytest.raises(SftlabError, match="export writes one of"):
        export_model(trained, tmp_path / "out", dtype="int8")


def test_a_failed_check_writes_nothing(tmp_path, tiny_model_dir, adapter_dir):
    trained = locate_trained(str(tiny_model_dir), str(adapter_dir))
    target = tmp_path / "merged"
    with pytest.raises(SftlabError, match="changed the model's logits.*nothing was written"):
        export_model(trained, target, rtol=0.0)  # the fp32 merge differs by ~1e-7, above a zero tolerance
    assert not target.exists() and _leftovers(tmp_path) == []


class _Stop(Exception):
    pass


def test_an_interrupted_export_leaves_the_previous_one_intact(exported, tiny_model_dir, adapter_dir):
    """Stopped after the weights are written but before the checks pass: the old export stays, no temp dir is left."""
    target = exported.export_dir
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def stop_when_reloading(message: str) -> None:
        if message.startswith("reloading"):
            raise _Stop

    with pytest.raises(_Stop):
        export_model(locate_trained(str(tiny_model_dir), str(adapter_dir)), target, on_progress=stop_when_reloading)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert _leftovers(target.parent) == []

