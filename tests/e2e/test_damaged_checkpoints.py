"""Damaged checkpoints, a torn metrics line, a killed run's leftovers and a full disk: resuming never ends in a
traceback and never loses the good state. One tiny LoRA run (checkpoints 2, 4, 6) is trained for the module; each
test damages a copy of it."""

import json
import logging
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import train_tiny, write_config
from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.report.metrics import read_metrics
from sftlab.train.checkpoint import MANIFEST, find_checkpoint, saving, verify_checkpoint

COMMON = dict(max_steps=6, save_steps=2, per_device_train_batch_size=2, logging_steps=1, learning_rate=1e-3, lora_rank=4,
              cutoff_len=128)


@pytest.fixture(scope="module")
def base(tiny_model_dir, alpaca_rows_file):
    return dict(model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_rows_file), **COMMON)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base, one_thread) -> Path:
    root = tmp_path_factory.mktemp("damaged")
    return Path(train_tiny(root / "cfg", output_dir=str(root / "run"), **base).output_dir)


def _copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _truncate(path: Path, size: int = 1234) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _cfg(tmp_path: Path, base: dict, **values):
    return load_config(write_config(tmp_path / "resume.yaml", **{**base, **values}))


def test_resume_skips_a_truncated_optimizer_trims_a_torn_metrics_line_and_sweeps_leftovers(trained, tmp_path, base, caplog, one_thread):
    out = _copy(trained, tmp_path)
    full = {r["step"]: r for r in _records(trained)}
    ckpt6 = out / "checkpoint-6" / "optimizer.pt"
    saved_size = ckpt6.stat().st_size
    _truncate(ckpt6)
    # killed while writing step 5's record, after checkpoint-4
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]  # the report and web UI read past it
    leftovers = [".checkpoint-6.tmp-k1ll3d", ".checkpoint-8.per-rank", ".final-staging", ".checkpoint-4.old-4242", "..final-staging.tmp-x"]
    for name in leftovers:
        (out / name).mkdir()
        (out / name / "optimizer.pt").write_bytes(b"half")
    with caplog.at_level(logging.INFO, logger="sftlab"):
        train_tiny(tmp_path / "cfg", output_dir=str(out), resume_from_checkpoint=True, **base)
    log = caplog.text
    assert f"checkpoint-6 skipped: optimizer.pt is 1234 bytes, the manifest says {saved_size}" in log
    assert "resuming from checkpoint-4, the newest checkpoint that verifies" in log
    assert "cut off mid-write" in log and "removed what a stopped run left" in log
    assert "training data changed" not in log  # the same data: the same fingerprint
    assert not [name for name in leftovers if (out / name).exists()]
    # the same steps as the undamaged run from checkpoint-4, each record on its own line
    resumed = _records(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for r in resumed[4:]:
        assert (r["loss"], r["lr"], r["grad_norm"]) == (full[r["step"]]["loss"], full[r["step"]]["lr"], full[r["step"]]["grad_norm"])
    assert verify_checkpoint(out / "checkpoint-6") is None  # written anew
    assert (out / "checkpoint-6" / "optimizer.pt").stat().st_size == saved_size


def test_random_bytes_in_the_adapter_are_caught_by_the_hash(trained, tmp_path, base, caplog):
    out = _copy(trained, tmp_path)
    weights = out / "checkpoint-6" / "adapter_model.safetensors"
    with open(weights, "r+b") as f:  # tensor bytes, not the header: safetensors itself loads it without a word
        f.seek(weights.stat().st_size - 200)
        f.write(os.urandom(64))
    from safetensors.torch import load_file

    load_file(weights)
    with caplog.at_level(logging.INFO, logger="sftlab"):
        assert find_checkpoint(_cfg(tmp_path, base, output_dir=str(out), resume_from_checkpoint=True), 1) == out / "checkpoint-4"
    assert "checkpoint-6 skipped: adapter_model.safetensors does not match its hash in the manifest" in caplog.text


def test_truncated_trainer_state_is_skipped(trained, tmp_path, base, caplog):
    out = _copy(trained, tmp_path)
    state = out / "checkpoint-6" / "trainer_state.json"
    size = state.stat().st_size
    _truncate(state, 10)
    with caplog.at_level(logging.INFO, logger="sftlab"):
        assert find_checkpoint(_cfg(tmp_path, base, output_dir=str(out), resume_from_checkpoint=True), 1) == out / "checkpoint-4"
    assert f"checkpoint-6 skipped: trainer_state.json is 10 bytes, the manifest says {size}" in caplog.text


def test_a_damaged_explicit_checkpoint_is_one_line_naming_the_newest_good_one(trained, tmp_path, base):
    out = _copy(trained, tmp_path)
    _truncate(out / "checkpoint-6" / "scheduler.pt", 5)
    with pytest.raises(SftlabError) as e:
        find_checkpoint(_cfg(tmp_path, base, output_dir=str(out), resume_from_checkpoint=str(out / "checkpoint-6")), 1)
    message = str(e.value)
    assert "\n" not in message and "checkpoint-6 is damaged: scheduler.pt is 5 bytes" in message
    assert message.endswith(f"; resume from the newest good checkpoint instead: resume_from_checkpoint: {out / 'checkpoint-4'}")


def test_no_checkpoint_verifying_is_one_line(trained, tmp_path, base):
    out = _copy(trained, tmp_path)
    for step in (2, 4, 6):
        _truncate(out / f"checkpoint-{step}" / "optimizer.pt")
    with pytest.raises(SftlabError) as e:
        find_checkpoint(_cfg(tmp_path, base, output_dir=str(out), resume_from_checkpoint=True), 1)
    message = str(e.value)
    assert "\n" not in message and "no checkpoint in" in message and "verifies" in message
    assert all(f"checkpoint-{step}: optimizer.pt is 1234 bytes" in message for step in (2, 4, 6))


def test_a_damaged_checkpoint_without_manifest_fails_to_load_in_one_line(trained, tmp_path, base, one_thread):
    """Written by an older sftlab: no manifest, taken as it is; its damaged weights are named when they fail to load."""
    out = _copy(trained, tmp_path)
    for step in (2, 4, 6):
        (out / f"checkpoint-{step}" / MANIFEST).unlink()
    weights = out / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(os.urandom(16) + weights.read_bytes()[16:])  # the header's length and start
    with pytest.raises(SftlabError) as e:
        train_tiny(tmp_path / "cfg", output_dir=str(out), resume_from_checkpoint=True, **base)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{weights} cannot be read (")
    assert message.endswith(f"the checkpoint is damaged; try the newest other checkpoint (it has no manifest to verify it by): "
                            f"resume_from_checkpoint: {out / 'checkpoint-4'}")


def test_a_changed_train_set_is_a_warning(trained, tmp_path, base, caplog, one_thread):
    """Users change the data of a run on purpose: said in one line, not refused; the next checkpoint records the new set.
    Resumed from checkpoint-4 beside a newer checkpoint-6, save_total_limit keeps the checkpoint it just wrote."""
    out = _copy(trained, tmp_path)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["train_samples"] == 8 and state["data_fingerprint"]
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(json.loads(Path(base["dataset"]).read_text())[:6]))
    cfg = _cfg(tmp_path, base, output_dir=str(out), resume_from_checkpoint=str(out / "checkpoint-4"), dataset=str(fewer), max_steps=5,
               save_total_limit=1)
    from sftlab.train.run import run_training

    with caplog.at_level(logging.INFO, logger="sftlab"):
        run_training(cfg)
    assert ("the training data changed since checkpoint-4 was saved (8 samples then, 6 now): the remaining steps cover "
            "the new data, so some samples may repeat or be skipped") in caplog.text
    assert json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())["train_samples"] == 6
    # checkpoint-6 (of the run before) neither counts against the limit nor goes: this run replaces it when it gets there
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


@contextmanager
def _small_disk(tmp_path: Path, size_kb: int):
    """A folder on a tmpfs of ``size_kb`` KiB, for writes that fail for real with ENOSPC: mounted in the user and mount
    namespace of a helper process (unshare, no root needed where user namespaces are allowed), reached through its
    /proc/PID/root. Skips the test where it cannot be made."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    holder = subprocess.Popen(["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs -o size="$1"k none "$2" && echo mounted && exec sleep 600',
                               "sh", str(size_kb), str(mnt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if holder.stdout.readline().strip() != "mounted":
            pytest.skip(f"cannot mount a small tmpfs here: {holder.stderr.read().strip()}")
        yield Path(f"/proc/{holder.pid}/root{mnt}")
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(trained, tmp_path, base, one_thread):
    """A real ENOSPC: output_dir is on a tmpfs with room for checkpoint-4 and half a checkpoint more."""
    checkpoint = sum(f.stat().st_size for f in (trained / "checkpoint-4").rglob("*"))
    with _small_disk(tmp_path, (checkpoint + checkpoint // 2) // 1024 + 256) as disk:  # + the metrics and config
        out = disk / "run"
        shutil.copytree(trained / "checkpoint-4", out / "checkpoint-4")
        for name in ("metrics.jsonl", "config.yaml"):
            shutil.copy2(trained / name, out / name)
        with pytest.raises(SftlabError) as e:
            train_tiny(tmp_path / "cfg", output_dir=str(out), resume_from_checkpoint=True, **base)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"cannot save checkpoint-6 in {out}: No space left on device; "
                                                           f"it needs about {checkpoint / 1e6:.1f} MB; free that much there")
        assert message.endswith("then resume with resume_from_checkpoint: true (the checkpoints saved before are intact)")
        assert verify_checkpoint(out / "checkpoint-4") is None
        kept = [p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", ".")) and not p.name.startswith(".sftlab")]
        assert kept == ["checkpoint-4"]  # no temporary directory left behind (the run's lock file aside)


def test_each_writer_s_refused_write_keeps_its_errno(tiny_model_dir, tmp_path):
    """torch.save (through a file), safetensors and the tokenizer report an ENOSPC each their own way."""
    import errno

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from sftlab.train.checkpoint import _save_pt, refused_errno

    tensors = {"w": torch.zeros(1 << 18)}  # 1 MB
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir).backend_tokenizer  # tokenizer.json: 2 MB
    with _small_disk(tmp_path, 64) as disk:
        writers = {"torch.save": lambda f: _save_pt(tensors, f), "safetensors": lambda f: save_file(tensors, str(f)),
                   "open": lambda f: f.write_bytes(bytes(1 << 20)), "tokenizers": lambda f: tokenizer.save(str(f))}
        for name, write in writers.items():
            with pytest.raises(Exception) as e:
                write(disk / name)
            assert refused_errno(e.value) == errno.ENOSPC, (name, repr(e.value))
            (disk / name).unlink(missing_ok=True)
        with pytest.raises(RuntimeError) as e:
            torch.save(tensors, disk / "path")  # to a path torch keeps no errno: why checkpoints go through _save_pt
        assert refused_errno(e.value) is None


def test_a_full_disk_while_logging_is_one_line(tmp_path):
    """metrics.jsonl's writer, as the training monitor calls it, on a tmpfs that is full."""
    from sftlab.report.metrics import MetricsWriter

    with _small_disk(tmp_path, 64) as disk:
        writer = MetricsWriter(disk, "none", {})
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError):
                while True:  # fill the disk
                    os.write(fd, b"x" * 4096)
        finally:
            os.close(fd)
        with pytest.raises(SftlabError) as e, saving("metrics.jsonl", disk):
            writer.write({"step": 1, "loss": 1.0})
    assert str(e.value).startswith(f"cannot save metrics.jsonl in {disk}: No space left on device; free space there")
