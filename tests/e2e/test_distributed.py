"""Several processes on one machine (DDP over gloo on the CPU): the same training as one process."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import sftlab_cli, write_config
from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.train.launch import launched, torchrun_command
from sftlab.train.run import run_training


EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "deepspeed")
_BASELINES: dict = {}  # one plain process's run per settings, shared by the tests that compare with it


def _run(tmp_path, name, model_dir, data, nproc, accumulation, **over):
    values = dict(model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(tmp_path / name), max_samples=7, val_size=2,
                  per_device_train_batch_size=1, gradient_accumulation_steps=accumulation, num_train_epochs=2, logging_steps=1,
                  eval_steps=2, save_steps=2, learning_rate=1e-3, lora_rank=4, cutoff_len=128, plot_loss=False)
    values.update(over)
    cfg = write_config(tmp_path / f"{name}.yaml", **values)
    if nproc == 1 and not values.get("fsdp") and not values.get("deepspeed"):  # a plain run: in this process, no launcher
        key = (Path(data).read_bytes(), accumulation, tuple(sorted((k, str(v)) for k, v in over.items())))
        if "resume_from_checkpoint" in over:
            return run_training(load_config(cfg)), None
        if key not in _BASELINES:
            _BASELINES[key] = run_training(load_config(cfg))
        return _BASELINES[key], None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = sftlab_cli("train", cfg, "--nproc", nproc, "--master-port", 29500 + os.getpid() % 1000, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / name, done


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_steps(a, b, keys=("loss", "grad_norm", "eval_loss", "token_accuracy"), rel=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            assert (key in ra) == (key in rb), (ra["step"], key)
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-6), (ra["step"], key)


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, tiny_model_dir, alpaca_file):
    # 5 train samples, batch 1: 3 steps per epoch, and in the last one rank 1 has no sample (it must not hang)
    one, _ = _run(tmp_path, "one", tiny_model_dir, alpaca_file, nproc=1, accumulation=2)
    two, done = _run(tmp_path, "two", tiny_model_dir, alpaca_file, nproc=2, accumulation=1)
    assert "effective batch 2 (2 processes, MULTI_CPU)" in " ".join(done.stderr.split())  # the log wraps
    a, b = _records(one), _records(two)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # one record per step: only the main process writes
    _same_steps(a, b)
    assert a[-1]["tokens"] == b[-1]["tokens"]  # every sample once per epoch, none twice
    wa, wb = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    # a checkpoint of the 2-process run resumes on 1 process (same global batch) with the same losses
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    out, _ = _run(tmp_path, "resumed", tiny_model_dir, alpaca_file, nproc=1, accumulation=2, resume_from_checkpoint=True)
    _same_steps(b[2:], _records(out))


def test_torchrun_command_and_launch_detection(monkeypatch):
    cmd = torchrun_command("c.yaml", ["learning_rate=1e-4"], nproc=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400)
    assert cmd[1:3] == ["-m", "sftlab.train.launch"]  # torchrun, without its traceback when a rank fails
    assert {"--nproc-per-node=4", "--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29400"} <= set(cmd)
    assert cmd[-5:] == ["-m", "sftlab.cli", "train", "c.yaml", "learning_rate=1e-4"]
    with pytest.raises(SftlabError, match="node-rank 2"):
        torchrun_command("c.yaml", [], nproc=2, nnodes=2, node_rank=2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not launched()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched()


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_fsdp_shards_and_trains_like_one_process(tmp_path, tiny_model_dir, alpaca_file, finetuning_type):
    """FSDP2 over gloo: the same steps as one process; its full-state checkpoints resume without FSDP."""
    over = dict(finetuning_type=finetuning_type)
    one, _ = _run(tmp_path, "one", tiny_model_dir, alpaca_file, nproc=1, accumulation=2, **over)
    two, done = _run(tmp_path, "fsdp", tiny_model_dir, alpaca_file, nproc=2, accumulation=1, fsdp=True, **over)
    assert "2 processes, MULTI_CPU" in " ".join(done.stderr.split())
    a, b = _records(one), _records(two)
    _same_steps(a, b)
    weights = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    wa, wb = load_file(one / weights), load_file(two / weights)  # a normal model/adapter file, gathered
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)

    # the FSDP checkpoint (optimizer state by parameter name) resumes on one process without FSDP
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    out, _ = _run(tmp_path, "resumed", tiny_model_dir, alpaca_file, nproc=1, accumulation=2, resume_from_checkpoint=True, **over)
    _same_steps(b[2:], _records(out))
    if finetuning_type == "lora":
        # and a one-process checkpoint (optimizer state by index) resumes under FSDP
        again = tmp_path / "again"
        again.mkdir()
        shutil.copytree(one / "checkpoint-2", again / "checkpoint-2")
        out, _ = _run(tmp_path, "again", tiny_model_dir, alpaca_file, nproc=2, accumulation=1, fsdp=True, resume_from_checkpoint=True, **over)
        _same_steps(a[2:], _records(out))


def test_fsdp_sharded_checkpoints_resume_on_another_process_count(tmp_path, tiny_model_dir, alpaca_file):
    """fsdp_state_dict_type sharded: each rank writes its shards (nothing gathered); the checkpoint resumes with
    the same losses under FSDP and on one process without it; the final model is still a whole one."""
    over = dict(finetuning_type="full", max_samples=5, val_size=1, num_train_epochs=1)  # 4 samples: 2 steps of 2
    one, _ = _run(tmp_path, "one", tiny_model_dir, alpaca_file, nproc=1, accumulation=2, save_steps=1, **over)
    two, _ = _run(tmp_path, "sharded", tiny_model_dir, alpaca_file, nproc=2, accumulation=1, fsdp=True, save_steps=1,
                  fsdp_state_dict_type="sharded", **over)
    a, b = _records(one), _records(two)
    _same_steps(a, b)
    ckpt = two / "checkpoint-1"
    assert (ckpt / "fsdp" / ".metadata").is_file() and not list(ckpt.glob("*.safetensors")) and not (ckpt / "optimizer.pt").exists()
    assert (ckpt / "config.json").is_file()  # the model's config, for what the weights are
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)
    for name, nproc, accumulation, fsdp in (("on-two", 2, 1, True), ("on-one", 1, 2, False)):
        resumed = tmp_path / name
        resumed.mkdir()
        shutil.copytree(ckpt, resumed / "checkpoint-1")
        out, _ = _run(tmp_path, name, tiny_model_dir, alpaca_file, nproc=nproc, accumulation=accumulation, fsdp=fsdp,
                      resume_from_checkpoint=True, **over, **({"fsdp_state_dict_type": "sharded"} if fsdp else {}))
        _same_steps(b[1:], _records(out))


def test_fsdp_evaluates_before_and_after_like_one_process(tmp_path, tiny_model_dir, alpaca_file):
    """do_eval_baseline under FSDP: every rank runs the evaluation (loss and generation) on gathered weights in step,
    the main process writes it; the results equal one process's."""
    over = dict(do_eval_baseline=True, predict_with_generate=True, max_new_tokens=8, num_train_epochs=1)
    one, _ = _run(tmp_path, "one", tiny_model_dir, alpaca_file, nproc=1, accumulation=2, **over)
    two, _ = _run(tmp_path, "fsdp", tiny_model_dir, alpaca_file, nproc=2, accumulation=1, fsdp=True, **over)
    for split in ("eval_baseline", "eval"):
        a = json.loads((one / split / "eval_results.json").read_text())["metrics"]
        b = json.loads((two / split / "eval_results.json").read_text())["metrics"]
        assert a.keys() == b.keys() and "bleu-4" in a
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (split, key)
        pa = [json.loads(line)["prediction"] for line in (one / split / "generated_predictions.jsonl").read_text().splitlines()]
        pb = [json.loads(line)["prediction"] for line in (two / split / "generated_predictions.jsonl").read_text().splitlines()]
        assert pa == pb
    assert (two / "compare.md").is_file()  # the before → after table


@pytest.mark.parametrize("engine,finetuning_type", [("fsdp", "full"), ("z3", "lora")])
def test_load_best_model_at_end_with_sharded_weights(tmp_path, tiny_model_dir, engine, finetuning_type):
    """Under FSDP and ZeRO-3 the best checkpoint's gathered weights become the final model, and the evaluation
    after training (do_eval_baseline) is of them, put back into every rank's shards (a run forced to overfit:
    random-word answers, a high constant learning rate)."""
    import random

    if engine == "z3":
        pytest.importorskip("deepspeed")
    rng = random.Random(0)
    words = "apple river stone cloud green seven table music horse paper light ocean winter silver garden candle".split()
    rows = [{"instruction": f"Code word {i}?", "input": "", "output": " ".join(rng.choice(words) for _ in range(4))} for i in range(16)]
    (tmp_path / "codes.json").write_text(json.dumps(rows))
    sharding = dict(fsdp=True) if engine == "fsdp" else dict(deepspeed=os.path.abspath(os.path.join(EXAMPLES, "ds_z3_config.json")))
    out, _ = _run(tmp_path, "best", tiny_model_dir, tmp_path / "codes.json", nproc=2, accumulation=1, finetuning_type=finetuning_type,
                  max_samples=None, val_size=6, per_device_train_batch_size=5, learning_rate=0.01 if finetuning_type == "full" else 0.05,
                  lr_scheduler_type="constant", max_steps=30, logging_steps=5, eval_steps=5, save_steps=1000, save_total_limit=1,
                  cutoff_len=64, load_best_model_at_end=True, do_eval_baseline=True, **sharding)
    last = _records(out)[-1]
    assert last["best_step"] < last["step"], "no overfitting: the test proves nothing"
    weights = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    final, at_best = load_file(out / weights), load_file(out / f"checkpoint-{last['best_step']}" / weights)
    assert final.keys() == at_best.keys() and all(torch.equal(final[k], at_best[k]) for k in final)
    at_last = load_file(out / f"checkpoint-{last['step']}" / weights)
    assert not all(torch.equal(final[k], at_last[k]) for k in final)
    after = json.loads((out / "eval" / "eval_results.json").read_text())["metrics"]["eval_loss"]
    assert after == pytest.approx(last["best_eval_loss"], rel=1e-4)  # the best weights were evaluated, not the last ones
    assert after != pytest.approx(last["eval_loss"], rel=1e-4)


def test_fsdp_runs_as_a_launch_and_checks_its_config(tmp_path, tiny_model_dir, alpaca_file):
    cfg = load_config(write_config(tmp_path / "c.yaml", model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_file),
                                   output_dir=str(tmp_path / "out"), fsdp=True, max_steps=1))
    # `sftlab train` relaunches itself (one process too); called in-process without a launcher, it says how
    with pytest.raises(SftlabError, match="fsdp: runs as a torchrun launch, also on one process"):
        run_training(cfg)
    with pytest.raises(SftlabError, match="use bf16"):
        load_config(None, [], model_name_or_path="m", dataset="d", fsdp=True, fp16=True)
    with pytest.raises(SftlabError, match="load_best_model_at_end needs checkpoints that hold the weights"):
        load_config(None, [], model_name_or_path="m", dataset="d", fsdp=True, fsdp_state_dict_type="sharded", val_size=0.1,
                    eval_steps=5, load_best_model_at_end=True)
    with pytest.raises(SftlabError, match="fsdp_state_dict_type: sharded applies to FSDP runs"):
        load_config(None, [], model_name_or_path="m", dataset="d", fsdp_state_dict_type="sharded")


@pytest.mark.parametrize("stage,finetuning_type", [("z2", "lora"), ("z3", "full")])
def test_deepspeed_zero_trains_like_one_process(tmp_path, tiny_model_dir, alpaca_file, stage, finetuning_type):
    """DeepSpeed ZeRO-2/3 (gloo on the CPU) with the shipped JSONs: the same steps as one process without it;
    the result is a normal adapter/model; a checkpoint resumes on as many processes, and says so on others."""
    pytest.importorskip("deepspeed")
    ds = os.path.abspath(os.path.join(EXAMPLES, f"ds_{stage}_config.json"))
    over = dict(finetuning_type=finetuning_type)
    one, _ = _run(tmp_path, "one", tiny_model_dir, alpaca_file, nproc=1, accumulation=2, **over)
    two, done = _run(tmp_path, "ds", tiny_model_dir, alpaca_file, nproc=2, accumulation=1, deepspeed=ds, **over)
    assert "2 processes, DEEPSPEED" in " ".join(done.stderr.split())
    a, b = _records(one), _records(two)
    # ZeRO-3 sums the squares of its partitions in another order: full tuning's grad norm drifts ~1e-5 by step 4
    _same_steps(a, b, rel=1e-4 if stage == "z3" else 1e-5)
    assert a[-1]["tokens"] == b[-1]["tokens"]
    weights = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    wa, wb = load_file(one / weights), load_file(two / weights)  # ZeRO-3: gathered from the shards
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)
    assert (two / "checkpoint-2" / "deepspeed").is_dir() and not (two / "checkpoint-2" / "optimizer.pt").exists()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    out, _ = _run(tmp_path, "resumed", tiny_model_dir, alpaca_file, nproc=2, accumulation=1, deepspeed=ds, resume_from_checkpoint=True, **over)
    _same_steps(b[2:], _records(out))
    if stage == "z2":  # DeepSpeed's optimizer state is sharded per process: elsewhere, a one-line error before any model loads
        values = dict(model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_file), max_samples=7, val_size=2, lora_rank=4,
                      cutoff_len=128, output_dir=str(tmp_path / "again"), resume_from_checkpoint=str(two / "checkpoint-2"))
        cfg = write_config(tmp_path / "again.yaml", deepspeed=ds, **values)
        failed = sftlab_cli("train", cfg, "--nproc", 3, "--master-port", 29501 + os.getpid() % 1000, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert failed.returncode != 0 and "sharded over 2 process(es) and this run has 3" in " ".join(failed.stderr.split()), failed.stderr[-2000:]
        assert failed.stderr.count("error:") == 1 and "launching" not in failed.stderr  # said once, before any rank starts
        with pytest.raises(SftlabError, match="holds DeepSpeed's optimizer state, sharded per process"):
            run_training(load_config(write_config(tmp_path / "plain.yaml", gradient_accumulation_steps=2, **values)))
