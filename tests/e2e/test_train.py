"""`sftlab train` end to end on a tiny model: artifacts, metrics, TensorBoard, exact resume, signals."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ALPACA_ROWS, sftlab_cli, write_config
from sftlab.config import load_config
from sftlab.train.run import run_training


def _config(tmp_path, model_dir, data, **over):
    values = dict(model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(tmp_path / "out"),
                  max_steps=4, per_device_train_batch_size=2, logging_steps=1, learning_rate=1e-3, save_steps=2,
                  lora_rank=4, cutoff_len=128)
    values.update(over)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_config(tmp_path / "config.yaml", **values)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _cli(*args, **kw):
    return sftlab_cli(*args, **kw)


def test_train_cli_writes_model_checkpoints_metrics_and_tensorboard(tmp_path, tiny_model_dir, alpaca_file):
    cfg_path = _config(tmp_path, tiny_model_dir, alpaca_file, val_size=2, eval_steps=2, report_to="tensorboard")
    result = _cli("train", str(cfg_path), "lora_dropout=0.1")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"

    # final adapter + tokenizer + resolved config in output_dir itself
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja", "config.yaml"):
        assert (out / name).is_file(), name
    resolved = load_config(out / "config.yaml")
    # every key as given, and the batch layout the run resolved (padding_free: null → true on CPU)
    assert resolved.lora_dropout == 0.1 and resolved == load_config(cfg_path, ["lora_dropout=0.1", "padding_free=true"])
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".sftlab.lock"], "temporary directories left behind"

    # checkpoints every save_steps, complete
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json", "config.yaml", "chat_template.jinja"):
            assert (ckpt / name).is_file(), f"{ckpt.name}/{name}"
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step

    # one record per logging step, eval_loss at eval steps
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "trained_tokens_per_s", "peak_memory_gb"} <= r.keys()
        assert r["loss"] > 0 and r["tokens_per_s"] > r["trained_tokens_per_s"] > 0 and r["peak_memory_gb"] > 0.1
        # a random tiny model: near-uniform predictions over SmolLM2's 49,152 tokens
        assert 0 <= r["token_accuracy"] < 0.2 and 0.5 * math.log(49152) < r["entropy"] <= math.log(49152)
    assert [("eval_loss" in r) for r in records] == [False, True, False, True]
    assert all(0 <= r["eval_token_accuracy"] <= 1 and r["eval_entropy"] > 0 for r in records if "eval_loss" in r)
    assert records[-1]["tokens"] > records[0]["tokens"]

    # real TensorBoard event files with the same losses
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert len(acc.Scalars("eval/loss")) == 2
    assert [e.value for e in acc.Scalars("train/token_accuracy")] == pytest.approx([r["token_accuracy"] for r in records], rel=1e-6)

    # the saved template is the one training used, and the adapter loads onto the base model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert model.generate(**ids, max_new_tokens=2).shape[1] >= ids["input_ids"].shape[1] + 1


def test_padded_padding_free_and_packed_runs_train_the_same_step(tmp_path, tiny_model_dir, alpaca_file):
    """One optimizer step over every sample: the same loss and token counts whatever the batch layout."""
    layouts = {"padded": {"padding_free": False}, "padding_free": {}, "packing": {"packing": True}}
    records = {}
    for name, over in layouts.items():
        cfg = load_config(_config(tmp_path / name, tiny_model_dir, alpaca_file, output_dir=str(tmp_path / name / "out"),
                                  max_steps=-1, num_train_epochs=1, per_device_train_batch_size=len(ALPACA_ROWS),
                                  finetuning_type="full", **over))
        out = run_training(cfg)
        [records[name]] = _metrics(out)
        assert "sftlab_varlen" not in (out / "config.json").read_text()  # the saved model loads anywhere
        assert load_config(out / "config.yaml").padding_free is (name != "padded")  # the layout used, resolved
    padded = records["padded"]
    assert padded["trained_tokens"] > 0 and padded["train_runtime"] > 0 and 0 < padded["mfu"] < 1
    for name in ("padding_free", "packing"):
        r = records[name]
        assert r["loss"] == pytest.approx(padded["loss"], rel=1e-5), name
        assert r["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4), name
        assert (r["tokens"], r["trained_tokens"]) == (padded["tokens"], padded["trained_tokens"]), name


def test_builtin_template_is_saved_with_the_model(tmp_path, tiny_model_dir, alpaca_file):
    cfg = load_config(_config(tmp_path, tiny_model_dir, alpaca_file, template="builtin:default", max_steps=1))
    out = run_training(cfg)
    from sftlab.data.templates import builtin_template

    assert (out / "chat_template.jinja").read_text() == builtin_template("default")
    assert (out / "checkpoint-1" / "chat_template.jinja").read_text() == builtin_template("default")


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, tiny_model_dir, alpaca_file):
    common = dict(max_steps=6, save_steps=3, lora_dropout=0.2, val_size=2, eval_steps=3, group_by_length=True)
    full = run_training(load_config(_config(tmp_path / "cfg_a", tiny_model_dir, alpaca_file, output_dir=str(tmp_path / "a"), **common)))
    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed_dir / "checkpoint-3")
    run_training(load_config(_config(tmp_path / "cfg_b", tiny_model_dir, alpaca_file, output_dir=str(resumed_dir),
                                     resume_from_checkpoint=True, **common)))
    a, b = _metrics(full), _metrics(resumed_dir)
    assert [r["step"] for r in b] == [4, 5, 6]
    for ra, rb in zip(a[3:], b):
        for key in ("loss", "lr", "grad_norm", "eval_loss"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)


def test_resume_true_without_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir, alpaca_file):
    result = _cli("train", str(_config(tmp_path, tiny_model_dir, alpaca_file, resume_from_checkpoint=True)))
    assert result.returncode != 0 and "has no checkpoint" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_that_resumes(tmp_path, tiny_model_dir, alpaca_file, signum):
    cfg_path = _config(tmp_path, tiny_model_dir, alpaca_file, max_steps=100000, save_steps=100000)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sftlab.cli", "train", str(cfg_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stderr and "Traceback" not in stderr
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[1])
    resumed = _cli("train", str(cfg_path), "resume_from_checkpoint=true", f"max_steps={step + 2}")
    assert resumed.returncode == 0, resumed.stderr
    assert _metrics(out)[-1]["step"] == step + 2


@pytest.mark.parametrize("finetuning_type", ["full", "freeze"])
def test_full_and_freeze_save_a_whole_model(tmp_path, tiny_model_dir, alpaca_file, finetuning_type):
    cfg = load_config(_config(tmp_path, tiny_model_dir, alpaca_file, finetuning_type=finetuning_type, freeze_trainable_layers=1, max_steps=2))
    out = run_training(cfg)
    from transformers import AutoModelForCausalLM

    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = {n for (n, p), (_, q) in zip(trained.named_parameters(), base.named_parameters()) if not p.equal(q)}
    if finetuning_type == "freeze":  # only the last decoder layer moved
        assert changed and all(n.startswith("model.layers.1.") for n in changed)
    else:
        assert any(n.startswith("model.layers.0.") for n in changed)


def test_pretraining_stage_on_plain_text(tmp_path, tiny_model_dir):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"Plain text number {i}. " * 20}) + "\n" for i in range(6)))
    cfg = load_config(_config(tmp_path, tiny_model_dir, data, stage="pt", cutoff_len=32, max_steps=2))
    out = run_training(cfg)
    assert (out / "adapter_model.safetensors").is_file() and len(_metrics(out)) == 2


def test_bf16_autocast_on_a_cpu_that_has_it(tmp_path, tiny_model_dir, alpaca_file):
    from sftlab.model.device import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no bf16")
    out = run_training(load_config(_config(tmp_path, tiny_model_dir, alpaca_file, bf16=True, max_steps=2)))
    assert all(r["loss"] > 0 for r in _metrics(out))


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_model_dir, alpaca_file):
    runs = []
    for gc in (False, True):
        cfg = load_config(_config(tmp_path / f"gc{gc}", tiny_model_dir, alpaca_file, output_dir=str(tmp_path / f"out{gc}"),
                                  gradient_checkpointing=gc, max_steps=3))
        runs.append([r["loss"] for r in _metrics(run_training(cfg))])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_report_to_wandb_without_wandb_is_a_clear_error(tmp_path, tiny_model_dir, alpaca_file):
    pytest.importorskip("tensorboard")
    if __import__("importlib").util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    result = _cli("train", str(_config(tmp_path, tiny_model_dir, alpaca_file, report_to="wandb", max_steps=1)))
    assert result.returncode != 0 and "pip install wandb" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_hub_id_that_cannot_be_fetched_is_a_clear_error(tmp_path, alpaca_file):
    cfg = _config(tmp_path, "someone/not-a-cached-model", alpaca_file)
    result = _cli("data", "preview", str(cfg), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "'someone/not-a-cached-model'" in result.stderr and "download it to a directory" in result.stderr


def test_torch_compile_trains_lora_on_padding_free_batches_with_the_same_losses(tmp_path, tiny_model_dir, alpaca_file):
    losses = {}
    for compiled in (False, True):
        cfg = load_config(_config(tmp_path / str(compiled), tiny_model_dir, alpaca_file, output_dir=str(tmp_path / str(compiled) / "out"),
                                  max_steps=2, padding_free=True, torch_compile=compiled))
        losses[compiled] = [r["loss"] for r in _metrics(run_training(cfg))]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
