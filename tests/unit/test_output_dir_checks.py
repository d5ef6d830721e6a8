"""output_dir: one run at a time (the lock), never over a user's folder or the run's inputs, no stale result after an
overwrite, a one-line error for a folder that cannot be written. ``prepare_output_dir`` is called directly: nothing trains."""

import json
import os
import socket
import subprocess
import sys

import pytest

from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.model.load import trained_from_config
from sftlab.train.output_dir import LOCK_FILE, RunLock, check_free
from sftlab.train.run import prepare_output_dir

HOLD = "import sys, time; from sftlab.train.output_dir import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def _cfg(out, **values):
    values = {"model_name_or_path": "some/model", "dataset": "data.json", **values}
    return load_config(None, [], output_dir=str(out), **values)


def _fake_run(out):
    """What a finished LoRA run leaves in output_dir (the files, not real weights)."""
    for d in ("checkpoint-2", "eval", "runs"):
        (out / d).mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "config.yaml", "generated_predictions.jsonl", "eval/eval_results.json"):
        (out / name).write_text("x")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')


@pytest.fixture
def holder(tmp_path):
    """A child process that holds tmp_path/out's lock; killed at the end."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    proc.kill()
    proc.wait()


def test_a_second_run_and_an_overwrite_are_refused_while_a_run_holds_the_folder_then_a_dead_holder_is_taken_over(holder):
    out, proc = holder
    _fake_run(out)
    who = f"pid {proc.pid} on {socket.gethostname()}, since "
    for cfg in (_cfg(out), _cfg(out, overwrite_output_dir=True), _cfg(out, resume_from_checkpoint=True)):
        with pytest.raises(SftlabError, match="is in use by a run that is still going") as e:
            prepare_output_dir(cfg, resuming=cfg.resume_from_checkpoint is True)
        assert who in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SftlabError, match=who):
        check_free(out)
    assert (out / "checkpoint-2").is_dir() and (out / "adapter_model.safetensors").is_file()  # the overwrite deleted nothing

    proc.kill()
    proc.wait()  # the kernel drops a dead process's flock: its lock file alone holds nothing
    with prepare_output_dir(_cfg(out, overwrite_output_dir=True), resuming=False) as lock:
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid() and lock.fd is not None
        with pytest.raises(SftlabError, match=f"pid {os.getpid()} on "):  # held by this run now
            RunLock(out).acquire()
    check_free(out)  # released with the run


def test_other_ranks_check_the_folder_without_taking_its_lock(tmp_path):
    out = tmp_path / "out"
    with prepare_output_dir(_cfg(out), resuming=False):  # rank 0
        with prepare_output_dir(_cfg(out), resuming=False, clean=False) as other:  # rank 1, after rank 0
            assert other.fd is None


def test_a_folder_that_is_not_a_run_is_never_written_even_with_overwrite(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    files = {"README.md": "my notes", "tokenizer.json": "{}", "data.csv": "a,b"}
    for name, text in files.items():
        (out / name).write_text(text)
    for overwrite in (False, True):
        with pytest.raises(SftlabError, match=r"is a folder that holds other files \(README.md, data.csv, tokenizer.json\), not a "
                                              r"sftlab run; .*overwrite_output_dir never deletes a folder that is not a run"):
            prepare_output_dir(_cfg(out, overwrite_output_dir=overwrite), resuming=False)
    assert {p.name: p.read_text() for p in out.iterdir()} == files  # not even a lock file


def test_the_runs_inputs_inside_output_dir_are_refused(tmp_path):
    out = tmp_path / "out"
    _fake_run(out)
    (out / "mine.yaml").write_text("x")
    (out / "train.json").write_text("[]")
    with pytest.raises(SftlabError, match=r"contains this run's config file \(.*mine.yaml\); training writes there \(and "
                                          r"overwrite_output_dir would delete it\)"):
        prepare_output_dir(_cfg(out, overwrite_output_dir=True), resuming=False, config=out / "mine.yaml")
    with pytest.raises(SftlabError, match=r"contains this run's dataset file \(.*train.json\)"):
        prepare_output_dir(_cfg(out, overwrite_output_dir=True, dataset=str(out / "train.json")), resuming=False)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(SftlabError, match=r"output_dir .*model is this run's model directory"):
        prepare_output_dir(_cfg(model, model_name_or_path=str(model)), resuming=False)
    with pytest.raises(SftlabError, match=r"contains this run's model directory"):
        prepare_output_dir(_cfg(tmp_path, model_name_or_path=str(model), overwrite_output_dir=True), resuming=False)
    assert (out / "mine.yaml").is_file() and (out / "train.json").is_file() and (model / "config.json").is_file()
    # the run's own config.yaml, started again (sftlab train out/config.yaml resume_from_checkpoint=true): its record
    with prepare_output_dir(_cfg(out, resume_from_checkpoint=True), resuming=True, config=out / "config.yaml"):
        pass


def test_overwrite_removes_every_file_of_the_previous_run_so_no_stale_result_is_loaded(tmp_path):
    out = tmp_path / "out"
    _fake_run(out)
    (out / ".sftlab-trash-1").mkdir()  # what an overwrite that crashed while deleting left
    (out / ".sftlab-trash-1" / "model.safetensors").write_text("x")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    cfg = _cfg(out, model_name_or_path=str(tmp_path / "base"))
    with pytest.raises(SftlabError, match="already holds a run; set resume_from_checkpoint: true to continue it or overwrite_output_dir: true"):
        prepare_output_dir(cfg, resuming=False)
    with prepare_output_dir(cfg.model_copy(update={"overwrite_output_dir": True}), resuming=False):
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    # a run killed right after this start leaves no result that eval, chat or export would take for its own
    with pytest.raises(SftlabError, match="holds no trained adapter yet"):
        trained_from_config(cfg)
    # a folder holding only the lock of a run that ended before writing anything is a run: started again, no overwrite needed
    with prepare_output_dir(cfg, resuming=False):
        pass


def test_an_output_dir_that_is_a_file_or_under_one_is_a_one_line_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SftlabError, match=r"output_dir .*f is a file, not a folder: set output_dir to a folder"):
        prepare_output_dir(_cfg(tmp_path / "f"), resuming=False)
    with pytest.raises(SftlabError, match=r"output_dir .*f/out cannot be written \(Not a directory: .*\): choose a folder you can write to"):
        prepare_output_dir(_cfg(tmp_path / "f" / "out"), resuming=False)


def test_a_read_only_output_dir_or_parent_is_a_one_line_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root's writes, so a read-only folder cannot be made here "
                    "(the ENOTDIR case above goes through the same probe)")
    parent = tmp_path / "ro"
    (parent / "out").mkdir(parents=True)
    parent.chmod(0o555)
    (parent / "out").chmod(0o555)
    try:
        for out in (parent / "out", parent / "new"):
            with pytest.raises(SftlabError, match=r"cannot be written \(Permission denied: .*\): choose a folder you can write to"):
                prepare_output_dir(_cfg(out), resuming=False)
    finally:
        (parent / "out").chmod(0o755)
        parent.chmod(0o755)


def test_the_web_ui_does_not_start_a_job_into_a_folder_a_run_holds(holder, monkeypatch):
    from sftlab.webui.jobs import job_dir, start_job

    out, proc = holder
    monkeypatch.setenv("SFTLAB_CACHE", str(out.parent / "cache"))
    with pytest.raises(SftlabError, match=f"in use by a run that is still going \\(pid {proc.pid} on "):
        start_job(_cfg(out))
    assert not (job_dir(out) / "job.json").exists()  # nothing was started
