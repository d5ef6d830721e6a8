"""QLoRA: LoRA on a base quantized to 4 or 8 bits by bitsandbytes (on this CPU), recorded with the run so that
evaluation and resume load the same base, and exported by merging into the full-precision weights."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import metrics_of, run_and_resume, train_tiny
from sftlab.config import ConfigError, load_config
from sftlab.errors import SftlabError
from sftlab.evaluate.results import EvalResults
from sftlab.evaluate.runs import evaluate_runs
from sftlab.export.merge import export_model
from sftlab.model.assets import tiny_llama
from sftlab.model.load import Trained, load_for_inference, load_model, locate_trained, trained_from_config
from sftlab.model.quantize import Quantization

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[1, 17, 230, 4021, 9, 77, 310, 2]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_dir) -> Path:
    """The tiny Llama 64 wide: bitsandbytes' CPU 4-bit kernels quantize rows in blocks of 64."""
    return tiny_llama(smol_dir, tmp_path_factory.mktemp("qlora") / "tiny-64", hidden=64)


def _train(path: Path, model_dir: Path, data: Path, **over):
    values = dict(model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(path / "out"), max_steps=6,
                  per_device_train_batch_size=2, logging_steps=1, learning_rate=1e-2, save_steps=3, lora_rank=4,
                  cutoff_len=128, val_size=2, eval_steps=6, plot_loss=False, quantization_bit=4)
    return train_tiny(path, **{**values, **over})


@pytest.fixture(scope="module", params=[4, 8])
def qlora(request, tmp_path_factory, model_dir, alpaca_rows_file):
    return _train(tmp_path_factory.mktemp(f"q{request.param}"), model_dir, alpaca_rows_file, quantization_bit=request.param)


def test_the_base_is_quantized_frozen_and_lora_trains_in_fp32(model_dir):
    cfg = load_config(None, model_name_or_path=str(model_dir), dataset="d", quantization_bit=4, lora_rank=4)
    model = load_model(cfg, model_dir, torch.device("cpu"))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.base_layer.weight.dtype == torch.uint8
    assert layer.base_layer.weight.quant_state.quant_type == "nf4"
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and p.dtype == torch.float32 for n, p in trained.items())
    norm = model.base_model.model.model.norm.weight
    assert norm.dtype == torch.float32 and not norm.requires_grad


def _in_mapped_file(path: Path, model) -> list[str]:
    """The parameters of ``model`` whose memory lies in a mapping of the file ``path`` (this process's /proc/self/maps)."""
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in Path("/proc/self/maps").read_text().splitlines()
              if line.endswith(str(path))]
    return [n for n, p in model.named_parameters() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]


def test_a_quantized_base_keeps_no_full_precision_weights_mapped(model_dir):
    """The weights left unquantized are copied out of the safetensors file, so its full-precision pages are let go."""
    weights = (model_dir / "model.safetensors").resolve()
    plain = load_model(load_config(None, model_name_or_path=str(model_dir), dataset="d", lora_rank=4), model_dir, torch.device("cpu"))
    assert _in_mapped_file(weights, plain)  # a plain load reads the weights in place
    del plain
    cfg = load_config(None, model_name_or_path=str(model_dir), dataset="d", quantization_bit=4, lora_rank=4)
    assert _in_mapped_file(weights, load_model(cfg, model_dir, torch.device("cpu"))) == []
    model, _ = load_for_inference(Trained(model_dir, None, model_dir, quantization=Quantization(4)))
    assert _in_mapped_file(weights, model) == []


def test_qlora_trains_and_reloads_on_the_same_quantized_base(qlora):
    records = metrics_of(qlora)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert "quantization_bit" in (Path(qlora.output_dir) / "config.yaml").read_text()
    trained = trained_from_config(qlora)
    assert trained.quantization is not None and trained.quantization.bits == qlora.quantization_bit
    assert locate_trained(qlora.output_dir).quantization == trained.quantization  # --model OUTPUT_DIR finds it too
    out = Path(tempfile.mkdtemp(dir=Path(qlora.output_dir).parent)) / "eval"
    evaluate_runs(qlora, trained, out, from_config=True, validation=True)
    final_eval = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    assert EvalResults.read(out).metrics["eval_loss"] == pytest.approx(final_eval, rel=1e-4)


def test_export_merges_into_the_full_precision_base(qlora, tmp_path):
    trained = trained_from_config(qlora)
    result = export_model(trained, tmp_path / "merged")  # its own check: merged logits = full-precision base + adapter
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and result.export_dir == tmp_path / "merged"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    quantized, _ = load_for_inference(trained)
    with torch.no_grad():
        drift = (merged(IDS).logits - quantized(IDS).logits).abs().max().item()
    assert drift > 1e-4  # the merge used the full-precision weights, not the quantized ones the adapter was trained on
    # export measures that drift itself on its verification conversations, says it and records it
    recorded = json.loads((tmp_path / "merged" / "export.json").read_text())["quantized_drift"]
    assert recorded == result.quantized_drift and 1e-4 < recorded < 100
    assert any("QLoRA merge drift" in line and f"{recorded:.2e}" in line for line in result.lines())


def test_a_qlora_run_resumes_exactly(tmp_path, model_dir, alpaca_rows_file):
    full, again = run_and_resume(lambda path, **values: _train(path, model_dir, alpaca_rows_file, **values), tmp_path, 3,
                                 gradient_checkpointing=True)
    a, b = metrics_of(full), metrics_of(again)
    assert [r["step"] for r in b if "loss" in r] == [4, 5, 6]
    for ra, rb in zip([r for r in a if r["step"] > 3], b):
        assert ra.get("loss") == pytest.approx(rb.get("loss"), rel=1e-5), ra["step"]


def test_padded_padding_free_and_packed_qlora_runs_train_the_same_step(tmp_path, model_dir, alpaca_rows_file):
    """One optimizer step over all 8 samples on the 4-bit base: the same loss, grad norm and tokens whatever the batch
    layout (the 4-bit matmul sees rows of another shape, and packed rows hold several samples)."""
    records = {}
    for name, over in {"padded": {"padding_free": False}, "padding_free": {}, "packing": {"packing": True}}.items():
        cfg = _train(tmp_path / name, model_dir, alpaca_rows_file, max_steps=-1, num_train_epochs=1, val_size=0, eval_steps=None,
                     per_device_train_batch_size=8, **over)
        [records[name]] = [r for r in metrics_of(cfg) if "loss" in r]
    padded = records["padded"]
    for name in ("padding_free", "packing"):
        r = records[name]
        assert r["loss"] == pytest.approx(padded["loss"], rel=1e-5), name
        assert r["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4), name
        assert (r["tokens"], r["trained_tokens"]) == (padded["tokens"], padded["trained_tokens"]), name


@pytest.mark.parametrize("over, message", [
    (dict(finetuning_type="full"), "quantization_bit: 4 trains LoRA on a frozen quantized base, and finetuning_type is full"),
    (dict(fsdp=True), "quantization_bit with fsdp: sharding a quantized base is not in sftlab"),
    (dict(pissa_init=True, pissa_convert=True), "pissa_init with quantization_bit"),
    (dict(quantization_bit=3), "quantization_bit: Input should be 4 or 8"),
])
def test_impossible_qlora_settings_are_one_line_errors(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, model_name_or_path="m", dataset="d", **{"quantization_bit": 4, **over})


def test_a_prequantized_checkpoint_names_what_it_needs(tmp_path, model_dir):
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    cfg = load_config(None, model_name_or_path=str(gptq), dataset="d")
    with pytest.raises(SftlabError, match=r"is a gptq checkpoint: .*quantization_bit: 4"):
        load_model(cfg, gptq, torch.device("cpu"))
