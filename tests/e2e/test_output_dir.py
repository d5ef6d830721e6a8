"""`sftlab train` and output_dir end to end: the refusals come from the CLI at once, and an overwrite leaves nothing of
the previous run. One test trains (2 steps); the others fail before any model loads."""

import json
import os

import pytest

from conftest import sftlab_cli, write_config
from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.model.load import trained_from_config
from sftlab.train.output_dir import LOCK_FILE, RunLock, check_free
from sftlab.train.run import run_training


def _values(tmp_path, model_dir, data, **over):
    values = dict(model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(tmp_path / "out"), max_steps=2,
                  per_device_train_batch_size=2, logging_steps=1, save_steps=1, lora_rank=4, cutoff_len=64, plot_loss=False)
    return {**values, **over}


def test_train_cli_refuses_a_folder_a_run_holds_before_launching_anything(tmp_path, tiny_model_dir, alpaca_file):
    cfg = write_config(tmp_path / "config.yaml", **_values(tmp_path, tiny_model_dir, alpaca_file))
    (tmp_path / "out").mkdir()
    with RunLock(tmp_path / "out").acquire():  # this test process is "the other run"
        busy = sftlab_cli("train", cfg, "--nproc", 2, "overwrite_output_dir=true", timeout=120)
    assert busy.returncode == 2 and "Traceback" not in busy.stderr and "launching" not in busy.stderr, busy.stderr
    assert f"is in use by a run that is still going (pid {os.getpid()} on " in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1


def test_train_cli_never_writes_into_a_users_folder_or_over_its_config(tmp_path, tiny_model_dir, alpaca_file):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("my notes")
    (project / "tokenizer.json").write_text("{}")
    cfg = write_config(project / "config.yaml", **_values(tmp_path, tiny_model_dir, alpaca_file, output_dir=str(project)))
    before = {p.name: p.read_bytes() for p in project.iterdir()}
    inside = sftlab_cli("train", cfg, "overwrite_output_dir=true", timeout=120)
    assert inside.returncode == 2 and "contains this run's config file" in inside.stderr and "Traceback" not in inside.stderr
    other = write_config(tmp_path / "c.yaml", **_values(tmp_path, tiny_model_dir, alpaca_file, output_dir=str(project)))
    outside = sftlab_cli("train", other, timeout=120)
    assert outside.returncode == 2 and "is a folder that holds other files (README.md, config.yaml, tokenizer.json), not a sftlab run" in outside.stderr
    assert {p.name: p.read_bytes() for p in project.iterdir()} == before


def test_one_run_per_output_dir_and_an_overwrite_killed_early_leaves_no_stale_adapter(tmp_path, tiny_model_dir, alpaca_file):
    values = _values(tmp_path, tiny_model_dir, alpaca_file)
    path = write_config(tmp_path / "config.yaml", **values)
    cfg = load_config(path)
    out = run_training(cfg)
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    check_free(out)  # the run released it when it ended
    with pytest.raises(SftlabError, match="already holds a run; set resume_from_checkpoint: true to continue it or overwrite_output_dir"):
        run_training(cfg)

    # an overwrite that stops before it trains (here: its data does not parse) has already removed the whole previous run
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": ')
    with pytest.raises(SftlabError, match="bad.json"):
        run_training(load_config(path, ["overwrite_output_dir=true", f"dataset={bad}"]))
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    with pytest.raises(SftlabError, match="holds no trained adapter yet"):  # what eval, chat and export load
        trained_from_config(cfg)
    with pytest.raises(SftlabError, match="has no checkpoint"):
        run_training(cfg.model_copy(update={"resume_from_checkpoint": True}))
