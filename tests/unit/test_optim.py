"""The optimiser keys of the Hugging Face Trainer / LLaMA-Factory on a tiny model: optim, adam_beta1/2, adam_epsilon,
lr_scheduler_type + lr_scheduler_kwargs, loraplus_lr_ratio and neftune_noise_alpha; each does what it does there, and a
run with an 8-bit or Adafactor optimizer resumes exactly."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import get_scheduler
from transformers.optimization import Adafactor

from conftest import metrics_of, run_and_resume, train_tiny, write_config
from sftlab.config import ConfigError, load_config
from sftlab.errors import SftlabError
from sftlab.evaluate.results import EvalResults
from sftlab.evaluate.runs import evaluate_runs
from sftlab.model.load import load_model, trained_from_config
from sftlab.train.optim import build_optimizer, build_scheduler, neftune

CPU = torch.device("cpu")
IDS = torch.tensor([[1, 17, 230, 4021, 9, 77, 310, 2]])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(alpaca_rows_file) -> Path:
    return alpaca_rows_file


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with MLP matrices of 4096 weights, the smallest that bitsandbytes gives 8-bit states."""
    from transformers import AutoConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("wide") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = AutoConfig.from_pretrained(out)
    config.intermediate_size = 128
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _cfg(model_dir: Path, **over):
    return load_config(None, model_name_or_path=str(model_dir), dataset="d", **over)


def _model(model_dir: Path, **over):
    cfg = _cfg(model_dir, **over)
    torch.manual_seed(0)
    return cfg, load_model(cfg, model_dir, CPU)


def _step(model, optimizer) -> None:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()


def _train(path: Path, model_dir: Path, data: Path, **over):
    values = dict(model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(path / "out"), max_steps=3,
                  per_device_train_batch_size=2, logging_steps=1, learning_rate=1e-2, save_steps=2, lora_rank=4,
                  cutoff_len=128, val_size=2, plot_loss=False)
    return train_tiny(path, **{**values, **over})


# ---------------------------------------------------------------- optim, betas, epsilon


def _bnb(name: str):
    return getattr(pytest.importorskip("bitsandbytes").optim, name)


@pytest.mark.parametrize("optim, expected", [
    ("adamw_torch", lambda: torch.optim.AdamW), ("adamw_torch_fused", lambda: torch.optim.AdamW),
    ("adamw_8bit", lambda: _bnb("AdamW8bit")), ("adamw_bnb_8bit", lambda: _bnb("AdamW8bit")),
    ("paged_adamw_8bit", lambda: _bnb("PagedAdamW8bit")), ("adafactor", lambda: Adafactor), ("sgd", lambda: torch.optim.SGD)])
def test_each_optim_builds_its_optimizer_and_a_step_moves_the_weights(tiny_model_dir, optim, expected):
    cls = expected()
    cfg, model = _model(tiny_model_dir, finetuning_type="full", optim=optim, learning_rate=1e-2)
    optimizer = build_optimizer(cfg, model)
    assert type(optimizer) is cls
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, optimizer)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.norm.weight" in moved


def test_adamw_torch_fused_uses_fused_kernels_and_gives_the_plain_update(tiny_model_dir):
    results = {}
    for optim in ("adamw_torch", "adamw_torch_fused"):
        cfg, model = _model(tiny_model_dir, finetuning_type="full", optim=optim, learning_rate=1e-2)
        optimizer = build_optimizer(cfg, model)
        assert optimizer.defaults["fused"] is (True if optim.endswith("fused") else None)  # torch has CPU fused kernels
        for _ in range(2):
            _step(model, optimizer)
        results[optim] = dict(model.named_parameters())
    for name, p in results["adamw_torch"].items():
        torch.testing.assert_close(results["adamw_torch_fused"][name], p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"])
def test_adam_betas_and_epsilon_reach_the_optimizer(tiny_model_dir, optim):
    if "8bit" in optim:
        pytest.importorskip("bitsandbytes")
    cfg, model = _model(tiny_model_dir, optim=optim, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    for group in build_optimizer(cfg, model).param_groups:
        assert tuple(group["betas"]) == (0.8, 0.95) and group["eps"] == 1e-6


def test_defaults_are_the_hf_trainers(tiny_model_dir):
    cfg, model = _model(tiny_model_dir)
    assert (cfg.optim, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == ("adamw_torch", 0.9, 0.999, 1e-8)
    optimizer = build_optimizer(cfg, model)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["betas"] == (0.9, 0.999)


def test_adafactor_has_the_hf_trainers_settings_at_learning_rate(tiny_model_dir):
    cfg, model = _model(tiny_model_dir, optim="adafactor", learning_rate=3e-3)
    group = build_optimizer(cfg, model).param_groups[0]
    assert (group["lr"], group["scale_parameter"], group["relative_step"]) == (3e-3, False, False)


def test_weight_decay_only_on_matrices(tiny_model_dir):
    cfg, model = _model(tiny_model_dir, finetuning_type="full", weight_decay=0.1)
    decay, no_decay = build_optimizer(cfg, model).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == sum(1 for p in model.parameters() if p.requires_grad)


def test_eight_bit_keeps_32_bit_states_for_embeddings_as_the_hf_trainer(wide_model_dir):
    pytest.importorskip("bitsandbytes")
    cfg, model = _model(wide_model_dir, finetuning_type="full", optim="adamw_8bit")
    optimizer = build_optimizer(cfg, model)
    _step(model, optimizer)
    assert optimizer.state[model.model.layers[0].mlp.up_proj.weight]["state1"].dtype == torch.uint8
    embeddings = model.get_input_embeddings().weight
    assert optimizer.state[embeddings]["state1"].dtype == torch.float32
    alike = torch.nn.Parameter(embeddings.detach().clone())  # the same size, not an embedding's: 8-bit states
    alike.grad = embeddings.grad.clone()
    plain = type(optimizer)([alike], lr=1e-3)
    plain.step()
    assert plain.state[alike]["state1"].dtype == torch.uint8


def test_eight_bit_without_bitsandbytes_says_how_to_install_it(tiny_model_dir, monkeypatch):
    cfg, model = _model(tiny_model_dir, optim="adamw_8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
    with pytest.raises(SftlabError, match=r"^optim: adamw_8bit needs bitsandbytes.*pip install bitsandbytes"):
        build_optimizer(cfg, model)


# ---------------------------------------------------------------- schedules


def _lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _sgd(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


SCHEDULES = [
    ("cosine_with_restarts", {"num_cycles": 2}),
    ("polynomial", {"lr_end": 1e-4, "power": 2.0}),
    ("inverse_sqrt", {"timescale": 5}),
    ("cosine_with_min_lr", {"min_lr": 1e-4}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 8, "decay_type": "linear"}),
]


@pytest.mark.parametrize("name, kwargs", SCHEDULES, ids=[f"{n}-{'-'.join(k)}" for n, k in SCHEDULES])
def test_each_schedule_is_get_schedulers_curve_with_the_kwargs(tiny_model_dir, name, kwargs):
    total, warmup = 20, 3
    cfg = _cfg(tiny_model_dir, learning_rate=1e-2, lr_scheduler_type=name, lr_scheduler_kwargs=kwargs, warmup_steps=warmup)
    ours = _lrs(build_scheduler(cfg, _sgd(1e-2), total), total)
    extra = {"num_stable_steps": (total - warmup) // 3} if name == "warmup_stable_decay" else {}
    theirs = _lrs(get_scheduler(name, _sgd(1e-2), num_warmup_steps=warmup, num_training_steps=total,
                                scheduler_specific_kwargs={**extra, **kwargs}), total)
    assert ours == pytest.approx(theirs) and len(set(ours)) > 3
    plain = _lrs(get_scheduler("cosine", _sgd(1e-2), num_warmup_steps=warmup, num_training_steps=total), total)
    assert ours != pytest.approx(plain)  # the kwargs change the curve


def test_cosine_with_min_lr_ends_at_min_lr_and_restarts_return_to_the_peak(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, learning_rate=1e-2, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-3})
    scheduler = build_scheduler(cfg, _sgd(1e-2), 10)
    lrs = _lrs(scheduler, 10) + [scheduler.get_last_lr()[0]]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3) and min(lrs) == pytest.approx(1e-3)
    cfg = _cfg(tiny_model_dir, learning_rate=1e-2, lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs='{"num_cycles": 2}')
    lrs = _lrs(build_scheduler(cfg, _sgd(1e-2), 10), 10)
    assert lrs[5] == pytest.approx(1e-2) and lrs[4] < 2e-3  # the JSON string's 2 cycles: back at the peak half-way


def test_warmup_stable_decay_defaults_to_a_third_stable_then_decay(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, learning_rate=1e-2, lr_scheduler_type="warmup_stable_decay", warmup_steps=2)
    scheduler = build_scheduler(cfg, _sgd(1e-2), 11)  # 9 after warmup: 3 stable, 6 decaying
    lrs = _lrs(scheduler, 11) + [scheduler.get_last_lr()[0]]
    assert lrs[1] < 1e-2 and lrs[2:6] == pytest.approx([1e-2] * 4) and lrs[6] < 1e-2 and lrs[-1] == pytest.approx(0.0)


def test_a_run_follows_the_schedule_it_was_given(tmp_path, tiny_model_dir, data):
    cfg = _train(tmp_path, tiny_model_dir, data, max_steps=4, lr_scheduler_type="cosine_with_min_lr",
                 lr_scheduler_kwargs={"min_lr_rate": 0.5}, val_size=0)
    logged = [r["lr"] for r in metrics_of(cfg) if "lr" in r]
    assert logged == pytest.approx(_lrs(get_scheduler("cosine_with_min_lr", _sgd(1e-2), num_warmup_steps=0, num_training_steps=4,
                                                      scheduler_specific_kwargs={"min_lr_rate": 0.5}), 4))


# ---------------------------------------------------------------- LoRA+


def test_loraplus_gives_lora_b_ratio_times_the_learning_rate(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    # sftlab's lora_target takes linear layers; an adapter trained on (adapter_name_or_path) may also hold embedding LoRA
    cfg, model = _model(tiny_model_dir, finetuning_type="full", learning_rate=1e-3, weight_decay=0.1)
    cfg = _cfg(tiny_model_dir, loraplus_lr_ratio=16, learning_rate=1e-3, loraplus_lr_embedding=1e-5, weight_decay=0.1)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    optimizer = build_optimizer(cfg, model)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"} <= {part for n in names for part in n.split(".")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in group_of
            continue
        lr = group_of[id(p)]["lr"]
        if "lora_embedding_B" in name:
            assert lr == 1e-5, name
        elif "lora_B" in name:
            assert lr == pytest.approx(16e-3), name
        else:  # lora_A, lora_embedding_A
            assert lr == 1e-3, name
        assert group_of[id(p)]["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0)
    scheduler = build_scheduler(cfg, optimizer, 10)
    _lrs(scheduler, 4)
    rates = scheduler.get_last_lr()  # the schedule scales every group alike: the ratio holds
    assert rates[0] < 1e-3 and {round(r / rates[0], 6) for r in rates} == {1.0, 16.0, 0.01}


def test_loraplus_trains_lora_b_faster(tmp_path, tiny_model_dir, data):
    def lora_b_change(cfg) -> float:
        weights = load_file(Path(cfg.output_dir) / "adapter_model.safetensors")
        return sum(float(v.abs().sum()) for k, v in weights.items() if "lora_B" in k)  # lora_B starts at zero

    plain = _train(tmp_path / "plain", tiny_model_dir, data, val_size=0, learning_rate=1e-4)
    plus = _train(tmp_path / "plus", tiny_model_dir, data, val_size=0, learning_rate=1e-4, loraplus_lr_ratio=16)
    assert lora_b_change(plus) > 5 * lora_b_change(plain)


# ---------------------------------------------------------------- NEFTune


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_neftune_noises_embeddings_in_training_only(tiny_model_dir, finetuning_type):
    cfg, model = _model(tiny_model_dir, finetuning_type=finetuning_type)
    embeddings = model.get_input_embeddings()
    clean = embeddings(IDS).detach()
    alpha = 5.0
    with neftune(model, alpha):
        model.train()
        noisy = embeddings(IDS).detach()
        bound = alpha / (IDS.shape[1] * clean.shape[-1]) ** 0.5
        assert 0 < float((noisy - clean).abs().max()) <= bound
        train_logits = model(input_ids=IDS).logits
        model.eval()
        assert torch.equal(embeddings(IDS), clean)
        with torch.no_grad():
            eval_logits = model(input_ids=IDS).logits
            generated = model.generate(input_ids=IDS, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        assert torch.equal(eval_logits, model(input_ids=IDS).logits)
        assert torch.equal(generated, model.generate(input_ids=IDS, max_new_tokens=5, do_sample=False))
    model.train()  # after training: no hook left, and no noise even in training mode
    assert not embeddings._forward_hooks and not hasattr(embeddings, "neftune_noise_alpha")
    assert torch.equal(embeddings(IDS), clean)
    assert not torch.allclose(train_logits, model(input_ids=IDS).logits)


def test_neftune_changes_training_and_not_the_evaluation_of_the_saved_adapter(tmp_path, tiny_model_dir, data):
    plain = _train(tmp_path / "plain", tiny_model_dir, data)
    noisy = _train(tmp_path / "noisy", tiny_model_dir, data, neftune_noise_alpha=5.0)
    assert metrics_of(plain)[0]["loss"] != metrics_of(noisy)[0]["loss"]
    final = [r["eval_loss"] for r in metrics_of(noisy) if "eval_loss" in r][-1]  # evaluated inside training, in eval mode
    out = Path(tempfile.mkdtemp(prefix="eval-", dir=tmp_path)) / "eval"
    evaluate_runs(noisy, trained_from_config(noisy), out, from_config=True, validation=True)  # the saved adapter, reloaded
    assert EvalResults.read(out).metrics["eval_loss"] == pytest.approx(final, rel=1e-5)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("optim", ["adamw_8bit", "adafactor"])
def test_a_run_resumes_its_optimizer_state_exactly(tmp_path, wide_model_dir, data, optim):
    if optim == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    common = dict(max_steps=4, save_steps=2, val_size=0, finetuning_type="full", learning_rate=1e-3, optim=optim)
    full, again = run_and_resume(lambda path, **values: _train(path, wide_model_dir, data, **values), tmp_path, 2, **common)
    a, b = metrics_of(full), metrics_of(again)
    assert [r["step"] for r in b] == [3, 4]
    for ra, rb in zip(a[2:], b):
        assert (ra["loss"], ra["grad_norm"]) == (rb["loss"], rb["grad_norm"]), ra["step"]
    state = torch.load(Path(full.output_dir) / "checkpoint-2" / "optimizer.pt", weights_only=False)["state"]
    if optim == "adamw_8bit":  # 8-bit moments (bitsandbytes saves them under its own key)
        assert any(s.get("__bnb_optimizer_quant_state__", {}).get("state1", torch.empty(0)).dtype == torch.uint8 for s in state.values())
    else:  # Adafactor's factored second moment
        assert any("exp_avg_sq_row" in s for s in state.values())
    final_a = load_file(Path(full.output_dir) / "model.safetensors")
    final_b = load_file(Path(again.output_dir) / "model.safetensors")
    for key, value in final_a.items():
        torch.testing.assert_close(final_b[key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize("over, message", [
    (dict(optim="adam"), r"optim: Input should be 'adamw_torch', 'adamw_torch_fused', .*'sgd'"),
    (dict(lr_scheduler_type="reduce_lr_on_plateau"), r"lr_scheduler_type: Input should be .*'warmup_stable_decay'"),
    (dict(lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycle": 2}), r"lr_scheduler_kwargs: .*takes num_cycles, not num_cycle"),
    (dict(lr_scheduler_type="constant", lr_scheduler_kwargs={"num_cycles": 2}), r"lr_scheduler_kwargs: .*constant takes no arguments"),
    (dict(lr_scheduler_type="cosine_with_min_lr"), r"lr_scheduler_kwargs: One of min_lr or min_lr_rate"),
    (dict(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs="{num_cycles: 2}"), r"lr_scheduler_kwargs: not valid JSON"),
    (dict(lr_scheduler_type="polynomial", lr_scheduler_kwargs={"lr_end": 1.0}), r"lr_scheduler_kwargs: lr_end \(1.0\) must be smaller"),
    (dict(finetuning_type="full", loraplus_lr_ratio=16), r"loraplus_lr_ratio .*finetuning_type full.*set finetuning_type: lora"),
    (dict(fsdp=True, optim="adafactor"), r"optim: adafactor does not run on FSDP's sharded parameters"),
    (dict(fsdp=True, optim="paged_adamw_8bit"), r"optim: paged_adamw_8bit does not run on FSDP's sharded parameters"),
    (dict(adam_beta2=1.5), r"adam_beta2: Input should be less than 1"),
    (dict(neftune_noise_alpha=-1), r"neftune_noise_alpha: Input should be greater than or equal to 0"),
])
def test_bad_values_are_one_line_errors_naming_the_key(tmp_path, tiny_model_dir, over, message):
    path = write_config(tmp_path / "c.yaml", model_name_or_path=str(tiny_model_dir), dataset="d", **over)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_kwargs_that_do_not_fit_the_runs_steps_are_an_error_naming_the_key(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs={"warmup_type": "linear"})
    cfg = cfg.model_copy(update={"lr_scheduler_kwargs": {"bogus": 1}})  # past validation, as a program could
    with pytest.raises(SftlabError, match=r"^lr_scheduler_kwargs: .* do not fit lr_scheduler_type warmup_stable_decay"):
        build_scheduler(cfg, _sgd(1e-2), 10)
