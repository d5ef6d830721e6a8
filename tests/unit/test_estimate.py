"""sftlab estimate: the formulas against hand-computed values, the activation count against what autograd
really saves, a real CPU run's peak RSS within the documented tolerance, and the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_config
from sftlab.cli import app
from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.plan.estimate import (GB, Target, estimate, load_model_config, max_batch, memory, method, model_shape, parse_size,
                                  rule_of_thumb, training_time)

ROOT = Path(__file__).resolve().parents[2]
H, I, LAYERS, HEADS, KV, D, V = 576, 1536, 30, 9, 3, 64, 49152  # SmolLM2-135M
CPU = Target(device="cpu", memory=64 * GB)


def llama_config(**over):
    from transformers import LlamaConfig

    values = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                  head_dim=D, vocab_size=V, tie_word_embeddings=True, max_position_embeddings=8192)
    return LlamaConfig(**{**values, **over})


@pytest.fixture(scope="module")
def smol_shape():
    return model_shape(llama_config(), "smollm2-shape")


def cfg(**values):
    return load_config(None, [], **{"model_name_or_path": "m", "dataset": "d", **values})


def part(mem, name):
    return next(p for p in mem.parts if p.name == name)


def test_shape_counts_parameters_without_weights(smol_shape):
    s = smol_shape
    layer = H * H * 2 + 2 * H * KV * D + 3 * H * I + 2 * H  # q, o; k, v; gate, up, down; two norms
    assert s.layer_params == layer == 3_540_096
    assert s.params == V * H + LAYERS * layer + H == 134_515_008  # tied head counted once
    assert (s.layers, s.kv_heads, s.head_dim, s.tied, s.selective_loss, s.gated_mlp) == (30, 3, 64, True, True, True)
    assert s.flops.matmul_params == LAYERS * (layer - 2 * H) and s.flops.head_params == V * H


def test_memory_formulas_by_hand(smol_shape):
    c = cfg(finetuning_type="full", per_device_train_batch_size=4, cutoff_len=512)
    mem = memory(smol_shape, c, CPU)
    n, tokens = 134_515_008, 2048
    assert part(mem, "weights").size == 4 * n
    assert part(mem, "gradients").size == 4 * n
    assert part(mem, "optimizer states").size == 8 * n  # AdamW: exp_avg + exp_avg_sq in fp32
    # per token and layer (fp32): two norm inputs + two normalised copies + two norm outputs, q, attention out, o_proj in
    # (9 h), k and v (2 kv), gate/act/up/product (4 I), logsumexp (heads); the head: its rows' gradient, final norm x 2
    per_layer = 4 * (9 * H + 2 * KV * D + 4 * I + HEADS)
    assert mem.activation_bytes_per_token == per_layer
    assert part(mem, "activations").size == LAYERS * tokens * per_layer + tokens * H * 4 * 3
    # the chunked loss: 2**25 // vocab rows of fp32 logits (and logsumexp's copy), the head's gradient and a temporary
    rows = 2**25 // V
    assert part(mem, "loss / backward temporaries").size == rows * V * 8 + 2 * 4 * V * H
    assert mem.full_logits == tokens * V * 12
    # gradients of the layers replace their activations in backward: at the peak only the embedding's is there
    assert part(mem, "gradients").at_peak == 4 * (V * H + H)
    # with a short batch, the layers' gradients outweigh their activations: the peak is at the end of backward
    short = memory(smol_shape, c.model_copy(update={"per_device_train_batch_size": 1, "cutoff_len": 64}), CPU)
    assert part(short, "gradients").at_peak == 4 * n and "end of backward" in short.peak_phase
    assert mem.total == pytest.approx(sum(p.at_peak for p in mem.parts))


def test_qlora_weights_by_hand(smol_shape):
    lora = cfg(finetuning_type="lora", lora_rank=8, bf16=True)
    n, matmul = 134_515_008, smol_shape.flops.matmul_params
    trained = method(smol_shape, lora).trainable
    four = memory(smol_shape, lora.model_copy(update={"quantization_bit": 4}), CPU)
    # two weights per byte, an 8-bit absmax per 64 and an fp32 per 256 blocks (double quantization); the rest fp32
    assert part(four, "weights").size == pytest.approx(4 * trained + (0.5 + (1 + 4 / 256) / 64) * matmul + 4 * (n - matmul))
    eight = memory(smol_shape, lora.model_copy(update={"quantization_bit": 8}), CPU)
    assert part(eight, "weights").size == pytest.approx(4 * trained + matmul + 4 * (n - matmul))
    assert part(four, "dequantized weight (QLoRA)").size == 2 * H * I  # the largest linear, in bf16
    assert not any(p.name.startswith("half weight copies") for p in four.parts)  # bitsandbytes dequantizes, no autocast copy
    assert part(four, "weights").size < part(memory(smol_shape, lora, CPU), "weights").size


def test_lora_parameters_and_activations(smol_shape):
    c = cfg(finetuning_type="lora", lora_rank=8, per_device_train_batch_size=1, cutoff_len=64)
    m = method(smol_shape, c)
    per_layer = (H + H) + (H + KV * D) * 2 + (H + H) + (H + I) * 3  # r × (in + out) of q, k, v, o, gate, up, down
    assert m.lora == m.trainable == 8 * LAYERS * per_layer == 2_442_240
    mem = memory(smol_shape, c, CPU)
    # no normalised copies (norms are frozen); the seven adapters' rank-8 middles
    assert mem.activation_bytes_per_token == 4 * (7 * H + 2 * KV * D + 4 * I + HEADS) + 4 * 8 * 7
    with_dropout = memory(smol_shape, c.model_copy(update={"lora_dropout": 0.1}), CPU)
    inputs = 3 * H + H + 2 * H + I  # q, k, v see h; o sees h; gate and up see h; down sees I
    assert with_dropout.activation_bytes_per_token - mem.activation_bytes_per_token == (4 + 1) * inputs
    with pytest.raises(SftlabError, match="lora_target: nope not in this model"):
        method(smol_shape, c.model_copy(update={"lora_target": ["nope"]}))


def test_gradient_checkpointing_keeps_layer_inputs(smol_shape):
    c = cfg(finetuning_type="lora", per_device_train_batch_size=4, cutoff_len=1024)
    off, on = memory(smol_shape, c, CPU), memory(smol_shape, c.model_copy(update={"gradient_checkpointing": True}), CPU)
    assert off.activations_with_gc == on.activations_with_gc < off.activations_without_gc / 10
    tokens, head = 4096, 4096 * H * 4 * 2
    assert on.activations_with_gc == LAYERS * tokens * H * 4 + tokens * off.activation_bytes_per_token + head


def test_sharding_precision_and_devices(smol_shape):
    c = cfg(finetuning_type="full", per_device_train_batch_size=1, cutoff_len=512, bf16=True)
    gpu = Target(device="cuda", memory=80 * GB)
    ddp = memory(smol_shape, c, Target(device="cuda", devices=8, memory=80 * GB))
    zero2 = memory(smol_shape, c, Target(device="cuda", devices=8, memory=80 * GB, sharding="zero2"))
    zero3 = memory(smol_shape, c, Target(device="cuda", devices=8, memory=80 * GB, sharding="fsdp"))
    n = 134_515_008
    assert part(ddp, "DDP gradient buckets").size == 4 * n
    assert part(zero2, "optimizer states").size == 8 * n / 8 and part(zero2, "gradients").size == 4 * n / 8
    assert part(zero2, "weights").size == 4 * n  # ZeRO-2 keeps every weight
    assert part(zero3, "weights").size == 4 * n / 8 and part(zero3, "gathered layers (ZeRO-3/FSDP)").size == 2 * 2 * 3_540_096
    one = memory(smol_shape, c, gpu)
    assert part(one, "half weight copies (autocast)").size == 2 * smol_shape.flops.matmul_params  # bf16 casts of fp32 weights
    assert part(one, "runtime").size == GB
    # LoRA with bf16 on a GPU: frozen weights in bf16, the adapters in fp32; 8-bit AdamW: 2 B per trained parameter
    lora = cfg(finetuning_type="lora", bf16=True)
    m = method(smol_shape, lora)
    assert part(memory(smol_shape, lora, gpu), "weights").size == 2 * n + 4 * m.lora
    assert part(memory(smol_shape, lora, Target(device="cuda", optimizer="adamw_8bit")), "optimizer states").size == 2 * m.lora


def test_padded_batches_without_flash_attention_pay_for_the_mask(smol_shape):
    c = cfg(finetuning_type="lora", per_device_train_batch_size=2, cutoff_len=256, padding_free=False)
    flat = memory(smol_shape, c.model_copy(update={"padding_free": True}), CPU)
    padded = memory(smol_shape, c, CPU)
    # k and v repeated to every head (GQA) and a float [L, L] mask row per token, measured on CPU sdpa
    assert padded.activation_bytes_per_token - flat.activation_bytes_per_token == 4 * 2 * (HEADS - KV) * D + 4 * 256
    assert memory(smol_shape, c, Target(device="cuda")).activation_bytes_per_token == pytest.approx(
        memory(smol_shape, c.model_copy(update={"padding_free": True}), Target(device="cuda")).activation_bytes_per_token)


def test_largest_batch_is_the_last_that_fits(smol_shape):
    c = cfg(finetuning_type="full", cutoff_len=2048, bf16=True)
    target = Target(device="cuda", memory=24 * GB)
    b = max_batch(smol_shape, c, target)
    assert b > 1
    assert memory(smol_shape, c.model_copy(update={"per_device_train_batch_size": b}), target).total <= 24 * GB
    assert memory(smol_shape, c.model_copy(update={"per_device_train_batch_size": b + 1}), target).total > 24 * GB
    assert max_batch(smol_shape, c.model_copy(update={"gradient_checkpointing": True}), target) > 4 * b
    assert max_batch(smol_shape, c, Target(device="cuda", memory=2 * GB)) == 0


def test_time_from_flops(smol_shape):
    target = Target(device="cuda", peak_tflops=100.0, mfu=0.5)
    full = cfg(finetuning_type="full", per_device_train_batch_size=4, gradient_accumulation_steps=2, cutoff_len=1000, num_train_epochs=2)
    t = training_time(smol_shape, full, target, samples=800, mean_len=500)
    # 6·N per token for the decoder matmuls, causal attention, the head at every position (trained share 1)
    linear = 6 * smol_shape.flops.matmul_params * 500 * 4
    attention = 6 * smol_shape.flops.attn_width * 500**2 * 4
    head = 6 * V * H * 500 * 4
    assert t.step_flops == pytest.approx((linear + attention + head) * 2)
    assert t.step_s == pytest.approx(t.step_flops / (100e12 * 0.5))
    assert t.steps == 2 * math.ceil(800 / 8) and t.total_s == pytest.approx(t.steps * t.step_s)
    # LoRA: no weight gradients for frozen matrices (4·N instead of 6·N), nor for the head
    lora = training_time(smol_shape, full.model_copy(update={"finetuning_type": "lora"}), target, 800, 500)
    assert 0.64 < lora.step_flops / t.step_flops < 0.72  # 4/6, plus attention (6·) and the adapters' own gradients
    assert training_time(smol_shape, full.model_copy(update={"max_steps": 7}), target, None, None).steps == 7


def test_rule_of_thumb(smol_shape):
    n = 134_515_008
    assert rule_of_thumb(smol_shape, cfg(finetuning_type="full", cutoff_len=2048))[0] == 12 * n + 5 * GB
    assert rule_of_thumb(smol_shape, cfg(finetuning_type="lora", cutoff_len=1024, bf16=True))[0] == 2 * n + 2 * GB + 2.5 * GB


def test_parse_size():
    assert parse_size("80GB") == parse_size("80G") == parse_size("80 GiB") == parse_size("80") == 80 * GB
    assert parse_size("24000MB") == 24000 * 2**20
    with pytest.raises(SftlabError, match="memory size 'lots'"):
        parse_size("lots")


def _saved_bytes(module, batch) -> float:
    """Bytes of every distinct storage autograd saves in a forward, parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(**batch)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("finetuning_type, dropout", [("full", 0.0), ("lora", 0.0), ("lora", 0.1)])
def test_activations_equal_what_autograd_saves(tmp_path, finetuning_type, dropout):
    from transformers import AutoModelForCausalLM

    from sftlab.data.batching import collate_flat
    from sftlab.model.load import load_model
    from sftlab.model.loss import TokenLoss

    config = llama_config(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, vocab_size=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    c = load_config(None, [], model_name_or_path=str(tmp_path / "m"), dataset="d", finetuning_type=finetuning_type,
                    lora_dropout=dropout, per_device_train_batch_size=3, cutoff_len=100)
    model = load_model(c, tmp_path / "m", torch.device("cpu"))
    shape = model_shape(config, "m")
    assert method(shape, c).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    lengths = [100, 90, 80]
    rows = {"input_ids": [[5 + i % 400 for i in range(n)] for n in lengths], "labels": [[7 + i % 400 for i in range(n)] for n in lengths]}
    saved = _saved_bytes(TokenLoss(model).train(), collate_flat(rows))
    mem = memory(shape, c, CPU, seq_len=90)  # 3 × 90 tokens = the 270 of the batch
    head_grad = 4 * 512 * 64 if finetuning_type == "full" else 0  # computed in the forward by the chunked loss, saved
    assert saved == pytest.approx(part(mem, "activations").size + head_grad, rel=0.03)


def test_cpu_peak_rss_of_a_real_run_within_tolerance(tmp_path, tiny_model_dir):
    """A real `sftlab train` (tiny model, full, 4 × ~520 tokens) in its own process: peak RSS within ±25 %."""
    spec = importlib.util.spec_from_file_location("bench_estimate", ROOT / "benchmarks" / "bench_estimate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    got = bench.run_point(str(tiny_model_dir), "full", 4, 512, {}, 2, tmp_path / "run")
    est = bench.estimated_gb(str(tiny_model_dir), "full", 4, got["seq_len"], got["trained_share"], {})
    assert abs(est - got["measured_gb"]) / got["measured_gb"] < 0.25, (est, got)


def test_estimate_cli(tmp_path, tiny_model_dir, alpaca_file):
    path = write_config(tmp_path / "c.yaml", model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_file), cutoff_len=256,
                        per_device_train_batch_size=2, finetuning_type="lora", val_size=2)
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", str(path), "--gpu-memory", "24GB", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["target"]["device"] == "cuda" and out["fits"] and out["max_per_device_train_batch_size"] > 2
    assert out["time"]["steps"] == 3 * math.ceil(6 / 2)  # 8 rows, 2 held out, batch 2, 3 epochs
    assert set(out["memory_gb"]) >= {"weights", "gradients", "optimizer states", "activations", "runtime"}
    text = runner.invoke(app, ["estimate", str(path), "per_device_train_batch_size=4", "--device", "cpu", "--gpu-memory", "0.5GB"])
    assert text.exit_code == 1 and "does NOT fit in 0.5 GB" in text.output and "common rule of thumb" in text.output
    bad = runner.invoke(app, ["estimate", str(path), "--sharding", "zero9"])
    assert isinstance(bad.exception, SftlabError) and "zero9" in str(bad.exception)
    # without --sharding, the config's own: deepspeed's ZeRO stage
    z3 = Path(__file__).parents[2] / "examples" / "deepspeed" / "ds_z3_config.json"
    sharded = json.loads(runner.invoke(app, ["estimate", str(path), f"deepspeed={z3}", "--gpus", "4", "--json"]).output)
    assert sharded["target"]["sharding"] == "zero3" and out["target"]["sharding"] == "none"


def test_model_config_needs_no_weights(tmp_path, tiny_model_dir):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((tiny_model_dir / "config.json").read_text())  # a config, no weights
    config, where = load_model_config(str(tmp_path / "cfg"))
    assert config.hidden_size == 32 and where.endswith("config.json")
    with pytest.raises(SftlabError, match="no-such.gguf: GGUF file not found"):
        load_model_config(str(tmp_path / "no-such.gguf"))
    full = estimate(model_shape(config), cfg(finetuning_type="full"), CPU)
    assert full.fits and full.max_batch >= 1


def test_time_from_data_stats(tmp_path, tiny_model_dir):
    from sftlab.plan.estimate import estimate_config

    (tmp_path / "stats.json").write_text(json.dumps({"samples": 1000, "tokens": {"length": {"mean": 200.0}, "answer": {"mean": 50.0}}}))
    c = cfg(model_name_or_path=str(tiny_model_dir), finetuning_type="lora", max_samples=500, val_size=0.1,
            per_device_train_batch_size=5, num_train_epochs=2)
    e = estimate_config(c, Target(device="cuda", peak_tflops=100.0), tmp_path)
    assert e.time.steps == 2 * math.ceil((500 - 50) / 5)  # max_samples caps the rows, val_size holds some out
    assert "200 tokens per micro-batch (mean)" in e.time.basis
    with pytest.raises(SftlabError, match="not a stats.json of `sftlab data stats`"):
        estimate_config(c, CPU, tmp_path / "missing.json")
