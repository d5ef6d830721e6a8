"""The HTML reports open in a real headless Chromium, offline: every plot renders, nothing is fetched."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import sftlab_cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="needs Debian's chromium (apt-get install chromium)")

ROWS = [
    {"instruction": "Extract the person as JSON.", "input": f"{name} is {age} and lives in {city}.",
     "output": json.dumps({"name": name, "age": age, "city": city})}
    for name, age, city in [("Ann", 31, "Oslo"), ("Bo", 45, "Lima"), ("Cy", 27, "Pune"), ("Di", 52, "Kyiv"), ("Ed", 38, "Rome")]
] + [
    {"instruction": "提取人物信息为JSON。", "input": "王芳今年29岁，住在成都。", "output": '{"name": "王芳", "age": 29, "city": "成都"}'},
    {"instruction": "extract the person as json.", "input": "ann is 31 and lives in oslo.", "output": '{"name": "ann", "age": 31, "city": "oslo"}'},
]


def _sftlab(*args, cwd):
    done = sftlab_cli("data", *args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done


def _open_offline(page_path: Path) -> dict:
    """Open ``page_path`` in headless Chromium with the network cut off; what a reader would see."""
    requests = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.route("http*://**", lambda route: route.abort())  # a report must not need the network
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])")
            seen = {"title": page.title(), "text": page.inner_text("body"), "images": images,
                    "tables": page.locator("table").count(), "requests": requests}
        finally:
            browser.close()
    return seen


def test_stats_and_dedup_reports_render_offline(tmp_path, smol_dir):
    data = tmp_path / "people.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    _sftlab("stats", data, "--model", smol_dir, "--cutoff-len", "64", "-o", tmp_path / "stats", cwd=tmp_path)
    _sftlab("dedup", data, "-o", tmp_path / "clean" / "people.jsonl", cwd=tmp_path)

    stats = _open_offline(tmp_path / "stats" / "stats.html")
    assert len(stats["images"]) >= 3 and stats["tables"] >= 2
    assert all(done and w > 100 and h > 100 and alt for done, w, h, alt in stats["images"]), stats["images"]
    assert "cutoff_len" in stats["text"] and "7" in stats["text"]
    assert [u for u in stats["requests"] if not u.startswith(("file:", "data:"))] == []

    dedup = _open_offline(tmp_path / "clean" / "people.report.html")
    assert dedup["images"] and all(done and w > 100 for done, w, *_ in dedup["images"])
    assert "exact" in dedup["text"].lower() and "oslo" in dedup["text"].lower()  # the planted duplicate is shown
    assert [u for u in dedup["requests"] if not u.startswith(("file:", "data:"))] == []


def test_training_report_renders_offline_with_its_diagnosis(tmp_path):
    """A run that overfits: the report shows the curves and names the problem, offline."""
    import math

    from sftlab.report.training_report import write_training_report

    out = tmp_path / "run"
    out.mkdir()
    records = []
    for step in range(10, 610, 10):
        record = {"step": step, "epoch": round(step / 200, 4), "loss": 2.0 * math.exp(-step / 120) + 0.05 + 0.01 * math.sin(step),
                  "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 150.0, "peak_memory_gb": 4.2}
        if step % 100 == 0:
            record["eval_loss"] = 0.6 + (0.001 * (200 - step) if step <= 200 else 0.0012 * (step - 200))  # lowest at step 200
        records.append(record)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (out / "config.yaml").write_text("finetuning_type: lora\nlearning_rate: 0.0001\nnum_train_epochs: 3\n", encoding="utf-8")
    files, findings = write_training_report(out)
    assert "overfitting" in [f.rule for f in findings]

    seen = _open_offline(out / "report.html")
    assert len(seen["images"]) >= 4 and all(done and w > 100 and h > 100 for done, w, h, _ in seen["images"])
    assert "Overfitting" in seen["text"] or "overfitting" in seen["text"]
    assert "step 200" in seen["text"] and [u for u in seen["requests"] if not u.startswith(("file:", "data:"))] == []


def test_live_report_reloads_itself_in_the_browser_until_the_run_ends(tmp_path):
    """`report --watch` pages carry a reload while the run goes on: an open tab shows new steps by itself."""
    import time

    from sftlab.report.training_report import write_training_report

    out = tmp_path / "run"
    out.mkdir()
    record = lambda step, **extra: json.dumps({"step": step, "epoch": step / 100, "loss": 2.0 / step, "lr": 1e-4, **extra}) + "\n"  # noqa: E731
    (out / "metrics.jsonl").write_text(record(1) + record(2))
    write_training_report(out, refresh=1)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto((out / "report.html").as_uri(), wait_until="load")
            assert "Live: this page reloads every 1 s" in page.inner_text("body")
            steps = page.locator("td.num").first.inner_text()
            assert steps == "2"
            # the run goes on and finishes; the watcher re-renders; the open tab follows without a click
            (out / "metrics.jsonl").write_text(record(1) + record(2) + record(3, train_runtime=5.0))
            write_training_report(out, refresh=1)
            deadline = time.time() + 15
            while page.locator("td.num").first.inner_text() != "3" and time.time() < deadline:
                time.sleep(0.3)
            assert page.locator("td.num").first.inner_text() == "3"
            assert "Live:" not in page.inner_text("body")  # finished: no more reloading
        finally:
            browser.close()
    assert "http-equiv=\"refresh\"" not in (out / "report.html").read_text()
