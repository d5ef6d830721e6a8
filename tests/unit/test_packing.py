"""Padding-free and packed batches: the same loss and gradients as padded ones, nothing crosses samples."""

import random

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from sftlab.config import SFTConfig, load_config
from sftlab.data.batching import best_fit_decreasing, collate, collate_flat
from sftlab.data.render import IGNORE_INDEX
from sftlab.data.schedule import Schedule
from sftlab.model.attention import VARLEN, use_flat_batches
from sftlab.model.flops import FlopCounter
from sftlab.model.load import load_model
from sftlab.model.loss import TokenLoss, linear_cross_entropy
from sftlab.train.backend import Backend
from sftlab.train.loop import accumulate_gradients


def _samples(n: int, vocab: int, seed: int = 1) -> dict[str, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": []}
    for i in range(n):
        ids = torch.randint(5, vocab, (5 + 7 * i % 23,), generator=g).tolist()
        prompt = 1 + i % 4
        rows["input_ids"].append(ids)
        rows["labels"].append([IGNORE_INDEX] * prompt + ids[prompt:])
    rows["labels"][0] = list(rows["input_ids"][0])  # trained from the first token (train_on_prompt, pt)
    return rows


def _module(tiny_model_dir, finetuning_type: str, **values) -> TokenLoss:
    cfg = load_config(None, [], model_name_or_path=str(tiny_model_dir), dataset="d", finetuning_type=finetuning_type,
                      padding_free=True, **values)
    torch.manual_seed(0)
    model = load_model(cfg, tiny_model_dir, torch.device("cpu"))
    assert model.config._attn_implementation == VARLEN
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero, so A would get no gradient: perturb B to test both
            torch.nn.init.normal_(p, std=0.02)
    return TokenLoss(model)


def _loss_and_grads(module: TokenLoss, batches: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    loss = accumulate_gradients(Backend(Accelerator(cpu=True)), module, batches).loss
    return loss, {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("finetuning_type,checkpointing", [("full", False), ("lora", False), ("lora", True)])
def test_flat_batch_equals_padded_batch(tiny_model_dir, finetuning_type, checkpointing):
    module = _module(tiny_model_dir, finetuning_type, gradient_checkpointing=checkpointing)
    rows = _samples(8, vocab=module.model.config.vocab_size)
    padded_loss, padded = _loss_and_grads(module, [collate(rows, pad_id=0)])
    flat_loss, flat = _loss_and_grads(module, [collate_flat(rows)])
    assert flat_loss == pytest.approx(padded_loss, rel=1e-6)
    assert padded.keys() == flat.keys() and len(padded) > 0
    for name in padded:
        assert padded[name].abs().sum() > 0, name
        torch.testing.assert_close(flat[name], padded[name], rtol=1e-5, atol=1e-7, msg=name)


def test_samples_in_one_row_do_not_see_each_other(tiny_model_dir):
    module = _module(tiny_model_dir, "full")
    rows = _samples(4, vocab=module.model.config.vocab_size)
    alone = module(**collate_flat({k: v[:1] for k, v in rows.items()}))[0]
    together = module(**collate_flat(rows))[0]
    others = module(**collate_flat({k: v[1:] for k, v in rows.items()}))[0]
    torch.testing.assert_close(together, alone + others, rtol=1e-6, atol=1e-5)
    # The same row without cu_seq_lens (plain concatenation) would let samples attend to each other.
    naive = collate_flat(rows)
    del naive["cu_seq_lens"], naive["position_ids"]
    assert abs(module(**naive)[0].item() - together.item()) > 1e-2


def test_collate_flat_restarts_positions_and_masks_each_first_label():
    rows = {"input_ids": [[7, 8, 9], [4, 5]], "labels": [[7, 8, 9], [IGNORE_INDEX, 5]]}
    b = collate_flat(rows)
    assert b["input_ids"].tolist() == [[7, 8, 9, 4, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["cu_seq_lens"].tolist() == [0, 3, 5] and b["cu_seq_lens"].dtype == torch.int32
    # the 4 would be "predicted" from the 9 of another sample: never trained
    assert b["labels"].tolist() == [[IGNORE_INDEX, 8, 9, IGNORE_INDEX, 5]]


def test_best_fit_decreasing_fills_bins_and_places_every_sample_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)] + [100, 100]
    bins = best_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 100 + 1  # BFD is within 11/9 OPT; here nearly perfect
    assert best_fit_decreasing([60, 50, 40, 30, 20], 100) == [[0, 2], [1, 3, 4]]
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    assert len(best_fit_decreasing(lengths, 100, shuffled)) == len(bins)


def test_packing_schedule_covers_every_sample_once_per_epoch():
    rng = random.Random(1)
    lengths = [rng.randint(5, 64) for _ in range(300)]
    s = Schedule(300, batch_size=2, accumulation=2, world_size=1, seed=5, lengths=lengths, pack_len=64)
    assert s.n_rows < 300 and 0.85 < s.packing_efficiency <= 1.0
    for epoch in range(2):
        seen = [i for step in range(epoch * s.steps_per_epoch, (epoch + 1) * s.steps_per_epoch)
                for mb in s.micro_batches(step, 0) for i in mb]
        assert sorted(seen) == list(range(300))
    assert s.micro_batches(0, 0) != s.micro_batches(s.steps_per_epoch, 0)  # a new order each epoch
    again = Schedule(300, 2, 2, 1, 5, lengths=lengths, pack_len=64)
    assert again.micro_batches(3, 0) == s.micro_batches(3, 0)


@pytest.mark.parametrize("needs_weight_grad", [True, False])
def test_chunked_linear_cross_entropy_equals_full_logits(needs_weight_grad):
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=needs_weight_grad)
    t = torch.randint(0, 50, (37,))
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    ref_grads = torch.autograd.grad(2.5 * ref, [h, w] if needs_weight_grad else [h])
    out, stats = linear_cross_entropy(h, w, t, chunk=8)
    grads = torch.autograd.grad(2.5 * out, [h, w] if needs_weight_grad else [h])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-10)
    with torch.no_grad():  # token accuracy and entropy, from the same chunks
        probs = torch.softmax(h @ w.T, -1)
        correct = (probs.argmax(-1) == t).sum().item()
        assert 0 < correct < 37
        assert stats[0].item() == correct
        torch.testing.assert_close(stats[1], -(probs * probs.log()).sum(), rtol=1e-10, atol=1e-10)
        _, eval_stats = linear_cross_entropy(h, w, t, chunk=8)  # no gradient: the entropy takes its own pass
        torch.testing.assert_close(eval_stats, stats, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_chunked_loss_under_bf16_autocast_matches_linear_layer():
    torch.manual_seed(0)
    h = torch.randn(40, 32, requires_grad=True)
    w = torch.randn(64, 32) / 4
    t = torch.randint(0, 64, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
        out, _ = linear_cross_entropy(h, w, t, chunk=16)
    (gr,), (go,) = torch.autograd.grad(ref, [h]), torch.autograd.grad(out, [h])
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(go, gr, rtol=2e-2, atol=2e-3)


def test_flop_count_of_a_known_model(tiny_model_dir):
    cfg = load_config(None, [], model_name_or_path=str(tiny_model_dir), dataset="d", finetuning_type="full")
    model = load_model(cfg, tiny_model_dir, torch.device("cpu"))
    c = model.config
    per_layer = c.hidden_size * (2 * c.hidden_size + 2 * c.num_key_value_heads * c.head_dim) + 3 * c.hidden_size * c.intermediate_size
    fc = FlopCounter.for_model(model)
    assert fc.matmul_params == c.num_hidden_layers * per_layer and fc.trained_fraction == 1.0
    assert fc.head_params == c.vocab_size * c.hidden_size and fc.head_trained
    linear = 2 * fc.matmul_params * 30
    attention = 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * (10**2 + 20**2)
    assert fc.step_flops([10, 20], n_trained=7) == 3 * linear + 3 * attention + 3 * 2 * fc.head_params * 7


@pytest.mark.parametrize(
    ("packing", "padding_free", "group_by_length", "device", "flat"),
    [
        (False, None, False, "cpu", True),  # the default on CPU: padding-free (measured faster, leaner)
        (False, None, True, "cpu", False),  # group_by_length asks for padded, length-grouped batches
        (False, None, False, "cuda", False),  # CUDA without flash-attn: one fused sdpa over a padded batch
        (False, False, False, "cpu", False),
        (False, True, True, "cuda", True),  # an explicit choice wins
        (True, False, False, "cpu", True),  # packed rows are always flat
    ],
)
def test_batch_layout_default(packing, padding_free, group_by_length, device, flat):
    assert use_flat_batches(SFTConfig(model_name_or_path="m", dataset=["d"], packing=packing, padding_free=padding_free,
                                      group_by_length=group_by_length), device, flash_attn=False) is flat
