"""Loss normalisation and the data schedule of the training loop."""

import copy

import pytest
import torch
from accelerate import Accelerator

from sftlab.config import load_config
from sftlab.data.batching import collate
from sftlab.data.render import IGNORE_INDEX
from sftlab.data.schedule import Schedule
from sftlab.model.load import load_model
from sftlab.model.loss import TokenLoss
from sftlab.train.backend import Backend
from sftlab.train.loop import accumulate_gradients


def _samples(n: int, vocab: int) -> dict[str, list[list[int]]]:
    """Samples of different lengths with different numbers of trained tokens."""
    g = torch.Generator().manual_seed(1)
    rows = {"input_ids": [], "labels": []}
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        prompt = 2 + i % 4
        rows["input_ids"].append(ids)
        rows["labels"].append([IGNORE_INDEX] * prompt + ids[prompt:])
    return rows


def _grads(module: TokenLoss, rows: dict, batch_size: int) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    batches = [collate({k: v[i : i + batch_size] for k, v in rows.items()}, pad_id=0) for i in range(0, 8, batch_size)]
    accumulate_gradients(Backend(Accelerator(cpu=True)), module, batches)
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_batch8_x_accum1_equals_batch1_x_accum8(tiny_model_dir, finetuning_type):
    cfg = load_config(None, [], model_name_or_path=str(tiny_model_dir), dataset="d", finetuning_type=finetuning_type)
    torch.manual_seed(0)
    module = TokenLoss(load_model(cfg, tiny_model_dir, torch.device("cpu")))
    if finetuning_type == "lora":  # B starts at zero, so A gets no gradient: perturb B to test both
        for n, p in module.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    rows = _samples(8, vocab=module.model.config.vocab_size)
    g8, g1 = _grads(module, rows, 8), _grads(module, rows, 1)
    g_pairs = _grads(module, rows, 2)
    assert g8.keys() == g1.keys() and len(g8) > 0
    for name in g8:
        assert g8[name].abs().sum() > 0, name
        torch.testing.assert_close(g1[name], g8[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(g_pairs[name], g8[name], rtol=1e-4, atol=1e-6, msg=name)


def test_loss_is_token_mean_not_mean_of_batch_means(tiny_model_dir):
    cfg = load_config(None, [], model_name_or_path=str(tiny_model_dir), dataset="d", finetuning_type="full")
    module = TokenLoss(load_model(cfg, tiny_model_dir, torch.device("cpu")))
    rows = _samples(8, vocab=module.model.config.vocab_size)
    batches = [collate({k: v[i : i + 1] for k, v in rows.items()}, pad_id=0) for i in range(8)]
    loss_sum, n_trained = accumulate_gradients(Backend(Accelerator(cpu=True)), module, batches)[:2]
    with torch.no_grad():
        whole, n, _ = module(**collate(rows, pad_id=0))
    assert n_trained == int(n) == sum(len(l) - 1 - l[1:].count(IGNORE_INDEX) for l in rows["labels"])
    assert loss_sum == pytest.approx(whole.item(), rel=1e-5)


def test_selective_head_equals_full_logits(tiny_model_dir):
    cfg = load_config(None, [], model_name_or_path=str(tiny_model_dir), dataset="d", finetuning_type="full")
    module = TokenLoss(load_model(cfg, tiny_model_dir, torch.device("cpu")))
    batch = collate(_samples(4, vocab=module.model.config.vocab_size), pad_id=0)
    assert module.selective
    fast, n, fast_stats = module(**batch)
    slow_module = copy.copy(module)
    slow_module.selective = False
    slow, n2, slow_stats = slow_module(**batch)
    assert n == n2 and fast.item() == pytest.approx(slow.item(), rel=1e-5)
    torch.testing.assert_close(fast_stats, slow_stats, rtol=1e-5, atol=1e-4)


def test_schedule_covers_every_sample_once_per_epoch_and_is_deterministic():
    s = Schedule(n_samples=21, batch_size=4, accumulation=2, world_size=1, seed=3)
    assert s.micro_per_epoch == 6 and s.steps_per_epoch == 3
    epoch0 = [i for step in range(3) for mb in s.micro_batches(step, 0) for i in mb]
    assert sorted(epoch0) == list(range(21))
    epoch1 = [i for step in range(3, 6) for mb in s.micro_batches(step, 0) for i in mb]
    assert sorted(epoch1) == list(range(21)) and epoch1 != epoch0  # reshuffled
    assert s.micro_batches(4, 0) == Schedule(21, 4, 2, 1, 3).micro_batches(4, 0)


def test_schedule_shards_a_step_across_ranks():
    s = Schedule(n_samples=32, batch_size=2, accumulation=2, world_size=2, seed=0)
    r0, r1 = s.micro_batches(0, 0), s.micro_batches(0, 1)
    assert len(r0) == len(r1) == 2
    assert not set(i for mb in r0 for i in mb) & set(i for mb in r1 for i in mb)


def test_pad_equal_to_eos_never_masks_a_trained_eos():
    # SmolLM2's pad token is its EOS (<|im_end|>, id 2): padding is placed by position, so the
    # trained EOS keeps its label.
    batch = collate({"input_ids": [[5, 6, 2], [5, 2]], "labels": [[IGNORE_INDEX, 6, 2], [IGNORE_INDEX, 2]]}, pad_id=2)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 2], [IGNORE_INDEX, 2, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_group_by_length_pads_less_and_keeps_every_sample_once():
    import random

    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(5, 20), rng.randint(100, 400)]) for _ in range(1000)]
    plain = Schedule(1000, 8, 1, 1, seed=0)
    grouped = Schedule(1000, 8, 1, 1, seed=0, lengths=lengths)
    steps = plain.steps_per_epoch
    assert grouped.steps_per_epoch == steps

    def padded(schedule, epoch):
        batches = [mb for step in range(epoch * steps, (epoch + 1) * steps) for mb in schedule.micro_batches(step, 0)]
        assert sorted(i for mb in batches for i in mb) == list(range(1000))
        return sum(len(mb) * max(lengths[i] for i in mb) for mb in batches)

    real = sum(lengths)
    assert padded(grouped, 0) < 1.15 * real < padded(plain, 0)  # ungrouped wastes far more
    assert grouped.micro_batches(3, 0) == Schedule(1000, 8, 1, 1, seed=0, lengths=lengths).micro_batches(3, 0)
    assert padded(grouped, 1) < 1.15 * real and grouped.micro_batches(steps, 0) != grouped.micro_batches(0, 0)


def test_a_rank_short_of_micro_batches_borrows_one_counted_apart():
    # 7 micro-batches, 2 per rank per step on 2 ranks: the second step deals 4, 5, 6 → rank 0 runs two, rank 1 one
    schedule = Schedule(7, 1, 2, 2, seed=0)
    assert schedule.steps_per_epoch == 2
    own0, own1 = schedule.micro_batches(1, 0), schedule.micro_batches(1, 1)
    assert (len(own0), len(own1)) == (2, 1)
    assert schedule.rank_batches(1, 0) == (own0, 2)
    assert schedule.rank_batches(1, 1) == (own1, 1)  # DDP: one backward per rank is enough
    assert schedule.rank_batches(1, 1, lockstep=True) == (own1 + own1[:1], 1)  # DeepSpeed: as many as rank 0
    # a rank with none at all borrows rank 0's first, so that it still joins the step
    lone = Schedule(5, 1, 2, 2, seed=0)  # second step: micro-batch 4 only, on rank 0
    assert lone.micro_batches(1, 1) == [] and lone.rank_batches(1, 1) == (lone.micro_batches(1, 0)[:1], 0)


def test_step_meter_means_speeds_and_mfu_over_the_steps_since_the_last_record():
    from sftlab.model.flops import FlopCounter
    from sftlab.report.metrics import StepMeter
    from sftlab.train.loop import StepSums

    flops = FlopCounter(matmul_params=100, head_params=10, attn_width=4, trained_fraction=0.0, head_trained=False)
    meter = StepMeter(flops, peak_flops=1e6, world_size=2)
    meter.add(StepSums(loss=6.0, trained=3, inputs=10, correct=3.0, entropy=1.5), 0.5, [5])
    meter.skip()
    meter.add(StepSums(loss=2.0, trained=1, inputs=6, correct=0.0, entropy=0.5), 1.5, [3])
    record = meter.record(lr=1e-4, grad_norm=0.5, tokens=16, peak_memory_gb=1.0)
    assert record["loss"] == 2.0 and record["token_accuracy"] == 0.75 and record["entropy"] == 0.5  # token means
    assert record["tokens_per_s"] == 8.0 and record["trained_tokens_per_s"] == 2.0 and record["skipped_steps"] == 1
    step_flops = (flops.step_flops([5], 1.5) + flops.step_flops([3], 0.5)) * 2  # this rank's samples × ranks
    assert record["mfu"] == pytest.approx(step_flops / 2.0 / (1e6 * 2))
    after = meter.record(lr=1e-4, grad_norm=0.5, tokens=16, peak_memory_gb=1.0)  # a fresh window
    assert after["tokens_per_s"] == 0.0 and "skipped_steps" not in after
    assert meter.totals() == {"train_runtime": 2.0, "trained_tokens": 4}
