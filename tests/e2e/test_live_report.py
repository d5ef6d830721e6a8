"""`sftlab report OUTPUT_DIR --watch` follows a real training run to its end; the terminal view's parts."""

import math
import signal
import subprocess
import sys
import time

from rich.console import Console

from conftest import write_config
from sftlab.report.diagnose import Finding
from sftlab.report.live import sparkline, status_view


def test_watch_follows_a_running_training_until_it_ends(tmp_path, tiny_model_dir, alpaca_file):
    cfg = write_config(tmp_path / "c.yaml", model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_file),
                       output_dir=str(tmp_path / "out"), max_steps=60, per_device_train_batch_size=2, logging_steps=2,
                       learning_rate=1e-3, save_steps=1000, cutoff_len=128, plot_loss=False)
    train = subprocess.Popen([sys.executable, "-m", "sftlab.cli", "train", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    try:
        # hold the run mid-way (a quiet machine trains the tiny model in seconds), so the watcher surely sees it running
        deadline = time.time() + 300
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1) and train.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        train.send_signal(signal.SIGSTOP)
        watch = subprocess.Popen([sys.executable, "-m", "sftlab.cli", "report", str(tmp_path / "out"), "--watch", "--every", "1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = watch.stdout.readline()  # the first render, while the run is held
        train.send_signal(signal.SIGCONT)
        rest, watch_err = watch.communicate(timeout=300)
    finally:
        train.send_signal(signal.SIGCONT)
        train_err = train.communicate(timeout=300)[1]
    assert train.returncode == 0, train_err
    assert watch.returncode == 0, watch_err
    lines = [first.rstrip("\n")] + rest.splitlines()
    assert "running: step" in lines[0], lines  # seen mid-run
    assert "finished at step 60" in lines[-2] and lines[-1] == f"report: {tmp_path / 'out' / 'report.html'}"
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Token accuracy" in page and 'http-equiv="refresh"' not in page


def test_sparkline_scales_between_min_and_max_and_marks_nan():
    assert sparkline([1.0, 2.0, 3.0]) == "▁▅█"
    assert sparkline([5.0, 5.0]) == "▁▁"
    assert sparkline([1.0, math.nan, 3.0]) == "▁×█"
    assert len(sparkline([float(i) for i in range(1000)], width=40)) == 40
    assert sparkline([]) == ""


def test_status_view_shows_where_the_run_is_and_the_diagnosis(tmp_path):
    records = [{"step": s, "epoch": s / 10, "loss": 2.0 / s, "token_accuracy": 0.5, "lr": 1e-4, "tokens_per_s": 900.0,
                "peak_memory_gb": 1.5} for s in range(1, 6)]
    records[3]["eval_loss"], records[4]["eval_loss"] = 0.7, 0.9
    finding = Finding("overfitting", "warning", "Overfitting: eval_loss rose", "lowest 0.7 at step 4", "stop earlier", [4])
    console = Console(width=160, record=True)
    console.print(status_view(tmp_path, records, [finding]))
    text = console.export_text()
    assert "running: step 5, epoch 0.50" in text and "0.9000 (best 0.7000 at step 4)" in text
    assert "token accuracy  0.500" in text and "warning" in text and "Overfitting: eval_loss rose" in text
