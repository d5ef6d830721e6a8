"""report/live.py::watch: re-renders the report as metrics.jsonl grows, and stops once the run has finished."""

import json
import os
import threading
import time

from sftlab.report.live import watch

RUNNING = [{"step": 1, "epoch": 0.5, "loss": 2.0}]
FINISHED = RUNNING + [{"step": 2, "epoch": 1.0, "loss": 1.5, "train_runtime": 3.0}]


def _write(path, records):
    """Whole or not at all, as the watcher must never see half a write here."""
    part = path.with_suffix(".part")
    part.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(part, path)


def test_watch_of_a_finished_run_renders_once_and_returns(tmp_path):
    _write(tmp_path / "metrics.jsonl", FINISHED)
    rendered, waited = [], []
    files = watch(tmp_path, 0.01, lambda records, findings: rendered.append(records), on_waiting=waited.append)
    assert rendered == [FINISHED] and waited == []
    assert files[-1] == tmp_path / "report.html" and files[-1].is_file()
    assert 'http-equiv="refresh"' not in files[-1].read_text(encoding="utf-8")  # finished: the page stops reloading


def test_watch_waits_for_the_run_then_follows_it_to_its_end(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rendered, waited = [], []

    def train():  # the run starts logging, then logs its last step
        time.sleep(0.2)
        _write(metrics, RUNNING)
        while not rendered:
            time.sleep(0.01)
        _write(metrics, FINISHED)

    thread = threading.Thread(target=train)
    thread.start()
    try:
        watch(tmp_path, 0.02, lambda records, findings: rendered.append(records), on_waiting=waited.append)
    finally:
        thread.join()
    assert waited == [metrics]  # said once, not at every look
    assert rendered[0] == RUNNING and rendered[-1] == FINISHED
