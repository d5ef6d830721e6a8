"""examples/sft_from_scratch.py and sftlab agree: same input ids, same labels, same first-step loss
and gradients, so the teaching script and the framework cannot drift apart."""

import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

from sftlab.config import load_config
from sftlab.data.batching import collate, collate_flat
from sftlab.data.formats import FormatSpec
from sftlab.data.pipeline import build_data, encode_options, encode_row
from sftlab.model.assets import cache_dir
from sftlab.model.load import load_model, load_tokenizer
from sftlab.model.loss import TokenLoss
from sftlab.train.backend import Backend
from sftlab.train.loop import accumulate_gradients

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


@pytest.fixture(scope="module")
def scratch():
    """The script, imported as a module from its file."""
    spec = importlib.util.spec_from_file_location("sft_from_scratch", ROOT / "examples" / "sft_from_scratch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quickstart(model_dir: Path, **updates):
    """The quickstart's config (so its data and template settings), on ``model_dir``, with ``updates``
    applied after validation (val_size 0 would clash with its evaluation settings, which play no part here)."""
    cfg = load_config(ROOT / "examples" / "quickstart.yaml", [], model_name_or_path=str(model_dir), dataset_dir=str(DATA))
    return cfg.model_copy(update=updates)


def _rows(name: str) -> list[dict]:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def test_every_quickstart_sample_gets_sftlabs_ids_and_labels(scratch, smol_dir):
    cfg = _quickstart(smol_dir)
    tokenizer = load_tokenizer(cfg, smol_dir)
    options = encode_options(cfg, tokenizer)
    rows = _rows("person_json_train.json") + _rows("person_json_test.json")
    for i, row in enumerate(rows):
        ours = scratch.encode(tokenizer, row)
        (theirs,) = encode_row(row, FormatSpec("alpaca"), tokenizer, options)
        assert ours == (theirs.input_ids, theirs.labels), f"row {i}"
    # the template written out is the model's own template
    user = scratch.alpaca_user_turn(rows[0])
    messages = [{"role": "user", "content": user}]
    assert scratch.chat_prompt(user) == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_default_model_is_where_sftlab_caches_smollm2(scratch, smol_dir):
    if not smol_dir.is_relative_to(cache_dir()):
        pytest.skip("SmolLM2 resolved from the Hugging Face cache, not converted by sftlab")
    assert scratch.DEFAULT_MODEL == smol_dir


def test_first_step_batch_loss_and_gradients_equal_sftlabs(scratch, tiny_model_dir):
    cfg = _quickstart(tiny_model_dir, finetuning_type="full", max_samples=8, val_size=0)
    tokenizer = load_tokenizer(cfg, tiny_model_dir)
    data = build_data(cfg, tokenizer)  # val_size 0: the first 8 rows, in file order
    ours = [scratch.encode(tokenizer, row) for row in _rows("person_json_train.json")[:8]]
    assert data.train["input_ids"] == [ids for ids, _ in ours]
    assert data.train["labels"] == [labels for _, labels in ours]
    batch = scratch.make_batch(ours, tokenizer.pad_token_id)
    padded = collate(data.train[:8], tokenizer.pad_token_id)
    assert batch.keys() == padded.keys() and all(torch.equal(batch[k], padded[k]) for k in batch)

    # The script's loss and gradients, on the model loaded as the script loads --model.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loss_sum, n = scratch.sft_loss(model, batch)
    loss = loss_sum / n
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}

    # sftlab's: its model loading, TokenLoss, and the loop's step, with padded and padding-free batches.
    module = TokenLoss(load_model(cfg, tiny_model_dir, torch.device("cpu")))
    for layout in (padded, collate_flat(data.train[:8])):
        module.zero_grad(set_to_none=True)
        their_sum, their_n = accumulate_gradients(Backend(Accelerator(cpu=True)), module, [layout])[:2]
        assert their_n == int(n)
        assert abs(their_sum / their_n - loss.item()) < 1e-5
        for name, p in module.model.named_parameters():
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _tiny(scratch, smol_tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return scratch.tiny_model(smol_tokenizer)


def _batch(scratch, tokenizer) -> dict[str, torch.Tensor]:
    samples = [scratch.encode(tokenizer, row) for row in _rows("person_json_train.json")[:8]]
    return scratch.make_batch(samples, tokenizer.pad_token_id)


def test_lora_starts_as_the_pretrained_model_and_trains_only_a_and_b(scratch, smol_tokenizer):
    model = _tiny(scratch, smol_tokenizer)
    ids = _batch(scratch, smol_tokenizer)["input_ids"][:2]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        scratch.add_lora(model, rank=4, alpha=8)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)  # B = 0: W x + 0
    wrapped = [m for m in model.modules() if isinstance(m, scratch.LoRALinear)]
    assert len(wrapped) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers; not the head
    trainable = {name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"A", "B"}
    assert all(torch.count_nonzero(m.B) == 0 and m.A.abs().sum() > 0 for m in wrapped)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_one_training_step_lowers_the_loss_on_its_batch(scratch, smol_tokenizer, method):
    model = _tiny(scratch, smol_tokenizer)
    if method == "lora":
        scratch.add_lora(model, rank=8, alpha=16)
    batch = _batch(scratch, smol_tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    before = scratch.train_step(model, optimizer, batch, lr=1e-2)
    with torch.no_grad():
        loss_sum, n = scratch.sft_loss(model, batch)
    assert before == pytest.approx(math.log(len(smol_tokenizer)), abs=0.5)  # a random model: about uniform
    assert (loss_sum / n).item() < before - 0.01


def test_cosine_schedule_matches_transformers_after_warmup(scratch):
    total, warmup, peak = 20, 2, 1e-3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    reference = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    for step in range(total):
        if step >= warmup:
            assert scratch.cosine_lr(step, total, peak, warmup) == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        optimizer.step()
        reference.step()
    assert scratch.cosine_lr(0, total, peak, warmup) == peak / warmup  # the first step already moves


def test_tiny_run_end_to_end(scratch, smol_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sft_from_scratch.py", "--tiny", "--model", str(smol_dir), "--steps", "2"])
    monkeypatch.setattr(scratch, "generate", functools.partial(scratch.generate, max_new_tokens=4))  # seconds, not tens
    scratch.main()
    out = capsys.readouterr().out
    assert "step   2/2 | loss" in out and out.count("before:") == 2 and out.count("after:") == 2
