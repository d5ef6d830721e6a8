"""Bad input through the real CLI: one clear `error:` line naming the file (and line / sample / key)
and what to do, a non-zero exit code, and no traceback unless --debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ALPACA_ROWS, sftlab_cli, write_config


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "NO_COLOR": "1"}
    return sftlab_cli(*args, cwd=cwd, env=env)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The failure's message: non-zero exit, no traceback, and stderr ends with exactly one 'error: ' line."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def assert_names(line: str, *parts: str) -> None:
    for part in parts:
        assert part in line, f"{part!r} not in {line!r}"


# --- config errors (sftlab train: fails while reading the config, before any model is loaded)

def test_config_file_missing(tmp_path):
    line = error_line(run_cli("train", tmp_path / "nope.yaml", cwd=tmp_path))
    assert_names(line, str(tmp_path / "nope.yaml"), "not found", "check the path")


def test_config_errors_come_before_torch_is_imported(tmp_path):
    """A bad config is reported at once, without the seconds torch/transformers take to import."""
    code = ("import sys\nfrom sftlab.cli import main\nsys.argv = ['sftlab', 'train', 'nope.yaml']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], done.stdout + done.stderr
    assert "config file not found" in done.stderr


def test_config_yaml_malformed_names_the_line(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model_name_or_path: m\ndataset: a.json\nlearning_rate: 1e-4\n  cutoff_len: 512\n", encoding="utf-8")
    line = error_line(run_cli("train", cfg, cwd=tmp_path))
    assert_names(line, f"{cfg}:4", "not valid YAML", "fix that line")


def test_unknown_key_suggests_the_right_one(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", model_name_or_path="m", dataset="a.json", learning_rat=1e-4)
    line = error_line(run_cli("train", cfg, cwd=tmp_path))
    assert_names(line, str(cfg), "'learning_rat'", "did you mean 'learning_rate'")


def test_wrong_type(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", model_name_or_path="m", dataset="a.json", learning_rate="fast")
    line = error_line(run_cli("train", cfg, cwd=tmp_path))
    assert_names(line, str(cfg), "learning_rate", "'fast'", "number")


def test_override_with_unknown_key(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", model_name_or_path="m", dataset="a.json")
    line = error_line(run_cli("train", cfg, "num_train_epoch=2", cwd=tmp_path))
    assert_names(line, "override num_train_epoch=2", "'num_train_epoch'", "did you mean 'num_train_epochs'")
    assert str(cfg) not in line  # the key is not in the file: blame the override


def test_override_that_is_not_key_value(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", model_name_or_path="m", dataset="a.json")
    line = error_line(run_cli("train", cfg, "learning_rate", cwd=tmp_path))
    assert_names(line, "'learning_rate'", "key=value")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_fp16_without_cuda(tmp_path, alpaca_file):
    cfg = write_config(tmp_path / "cfg.yaml", model_name_or_path="m", dataset=str(alpaca_file), fp16=True)
    line = error_line(run_cli("train", cfg, cwd=tmp_path))
    assert_names(line, "fp16", "CUDA", "set fp16: false")


# --- data errors (sftlab data preview: loads only the tokenizer)

@pytest.fixture
def preview(tmp_path, tiny_model_dir):
    """preview(dataset=..., **more) → the CompletedProcess of `sftlab [flags] data preview cfg.yaml [options]`."""
    def run(flags=(), options=(), **values):
        cfg = write_config(tmp_path / "cfg.yaml", model_name_or_path=str(tiny_model_dir), **values)
        return run_cli(*flags, "data", "preview", cfg, *options, cwd=tmp_path)
    return run


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_data_file(tmp_path, preview):
    missing = tmp_path / "nope.json"
    line = error_line(preview(dataset=str(missing)))
    assert_names(line, str(missing), "not found", "check the path")


def test_malformed_jsonl_line(tmp_path, preview):
    rows = [json.dumps(r) for r in ALPACA_ROWS[:4]]
    rows[2] = '{"instruction": "broken", "output": '
    data = write_text(tmp_path / "bad.jsonl", "\n".join(rows) + "\n")
    line = error_line(preview(dataset=str(data)))
    assert_names(line, f"{data}:3:", "not valid JSON", "each line of a JSONL file must be one JSON object")


def test_malformed_json_array(tmp_path, preview):
    data = write_text(tmp_path / "bad.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d",},\n]\n')
    line = error_line(preview(dataset=str(data)))
    assert_names(line, f"{data}:3:", "not valid JSON", "fix that line")


def test_unknown_format(tmp_path, preview):
    data = write_text(tmp_path / "odd.json", json.dumps([{"foo": "x", "bar": "y"}]))
    line = error_line(preview(dataset=str(data)))
    assert_names(line, str(data), "unknown data format", "foo", "bar", "dataset_info.json")


def test_missing_columns(tmp_path, preview):
    data_dir = tmp_path / "data"
    write_text(data_dir / "qa.json", json.dumps([{"instruction": "Say hi", "output": "Hi!"}]))
    write_text(data_dir / "dataset_info.json", json.dumps({"qa": {"file_name": "qa.json", "columns": {"prompt": "question"}}}))
    line = error_line(preview(dataset="qa", dataset_dir=str(data_dir)))
    assert_names(line, str(data_dir / "qa.json"), "question", "map them with 'columns' in dataset_info.json")


@pytest.mark.parametrize("content", ["[]", ""], ids=["empty-array", "zero-bytes"])
def test_empty_dataset(tmp_path, preview, content):
    data = write_text(tmp_path / "empty.json", content)
    line = error_line(preview(dataset=str(data)))
    assert_names(line, str(data), "empty" if not content else "no samples", "add samples")


@pytest.mark.parametrize("key, user, assistant", [
    ("conversations", {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}),
    ("messages", {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}),
], ids=["sharegpt", "openai"])
def test_conversation_without_assistant_turn(tmp_path, preview, key, user, assistant):
    data = write_text(tmp_path / "chat.json", json.dumps([{key: [user, assistant]}, {key: [user]}, {key: [user, assistant]}]))
    line = error_line(preview(dataset=str(data)))
    assert_names(line, f"{data} sample 1", "no assistant turn", "fix or remove the sample")


@pytest.fixture
def registry(tmp_path, alpaca_file) -> Path:
    data_dir = tmp_path / "data"
    write_text(data_dir / "dataset_info.json", json.dumps({"demo": {"file_name": str(alpaca_file)}, "other": {"file_name": str(alpaca_file)}}))
    return data_dir


def test_unknown_dataset_name(preview, registry):
    line = error_line(preview(dataset="nope", dataset_dir=str(registry)))
    assert_names(line, "'nope'", str(registry / "dataset_info.json"), "demo, other")


def test_debug_shows_the_traceback(preview, registry):
    result = preview(flags=["--debug"], dataset="nope", dataset_dir=str(registry))
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "SftlabError" in result.stderr, result.stderr
    assert "dataset 'nope'" in result.stderr


def test_unknown_template(preview, alpaca_file):
    line = error_line(preview(dataset=str(alpaca_file), template="nope"))
    assert_names(line, "template", "'nope'", "chatml", "llama3", "qwen", "default")


# --- the happy path

def test_preview_json(preview, alpaca_file):
    result = preview(options=["--json", "--n", "3"], dataset=str(alpaca_file))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) > 0
        assert any(label != -100 for label in row["labels"])
        assert any(label == -100 for label in row["labels"])  # the prompt is not trained
