"""The data and plan verbs never write over their inputs, and replace an existing output only with --force.

Each refusal comes before the data is read a second time or a model is loaded (the models named here do not exist)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sftlab.cli import app
from sftlab.errors import SftlabError
from sftlab.files import check_outputs

ROWS = [{"instruction": f"question {i} about topic {i * 7}", "output": f"answer {i} " * (i % 5 + 1)} for i in range(64)]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(result, *parts: str) -> str:
    """The command failed with a SftlabError naming ``parts``; returns its message."""
    assert isinstance(result.exception, SftlabError), result.output + repr(result.exception)
    message = str(result.exception)
    assert "\n" not in message and all(p in message for p in parts), message
    return message


def test_check_outputs(tmp_path, data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    check_outputs([tmp_path / "new.jsonl", tmp_path / "empty"], [data])
    with pytest.raises(SftlabError, match="is one of the input files"):
        check_outputs([tmp_path / "sub" / ".." / "d.jsonl"], [data], force=True)  # another spelling, even with force
    with pytest.raises(SftlabError, match="already exists; .* pass --force"):
        check_outputs([data], [])
    with pytest.raises(SftlabError, match="folder is not empty; .* pass --force"):
        check_outputs([tmp_path / "full"], [data])
    check_outputs([data, tmp_path / "full"], [], force=True)


def test_sample_onto_its_input_is_refused(data):
    before = data.read_bytes()
    refused(invoke("data", "sample", data, "--n", 5, "-o", data, "--force"), str(data), "is one of the input files")
    assert data.read_bytes() == before  # 64 rows, not 5


def test_sample_replaces_an_output_only_with_force(tmp_path, data):
    out = tmp_path / "s.jsonl"
    out.write_text("keep\n")
    refused(invoke("data", "sample", data, "--n", 5, "-o", out), str(out), "already exists", "--force")
    assert out.read_text() == "keep\n"
    assert invoke("data", "sample", data, "--n", 5, "-o", out, "--force").exit_code == 0
    assert len(out.read_text().splitlines()) == 5


def test_convert(tmp_path, data):
    before = data.read_bytes()
    refused(invoke("data", "convert", data, data, "--to", "messages"), "is one of the input files")
    assert data.read_bytes() == before
    out = tmp_path / "m.jsonl"
    assert invoke("data", "convert", data, out, "--to", "messages").exit_code == 0
    refused(invoke("data", "convert", data, out, "--to", "alpaca"), str(out), "already exists", "--force")
    assert "messages" in out.read_text().splitlines()[0]
    assert invoke("data", "convert", data, out, "--to", "alpaca", "--force").exit_code == 0
    assert "instruction" in out.read_text().splitlines()[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "m.jsonl"]  # no temporary left


def test_dedup_never_writes_over_an_input_beside_its_output(tmp_path, data):
    removed = tmp_path / "clean.removed.jsonl"  # what dedup -o clean.jsonl writes beside it
    removed.write_bytes(data.read_bytes())
    refused(invoke("data", "dedup", removed, "-o", tmp_path / "clean.jsonl", "--force"), str(removed), "is one of the input files")
    assert removed.read_bytes() == data.read_bytes()


def test_dedup_replaces_its_outputs_only_with_force(tmp_path, data):
    out = tmp_path / "clean.jsonl"
    assert invoke("data", "dedup", data, "-o", out, "--exact-only").exit_code == 0
    report = tmp_path / "clean.report.html"
    report.write_text("mine")
    out.unlink()
    refused(invoke("data", "dedup", data, "-o", out, "--exact-only"), str(tmp_path / "clean.removed.jsonl"), "already exists", "--force")
    assert not out.exists() and report.read_text() == "mine"
    assert invoke("data", "dedup", data, "-o", out, "--exact-only", "--force").exit_code == 0
    assert out.is_file() and report.read_text() != "mine"


def test_split_replaces_split_files_only_with_force(tmp_path, data):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("mine\n")
    refused(invoke("data", "split", data, "-o", out), str(out / "train.jsonl"), "already exists", "--force")
    assert (out / "train.jsonl").read_text() == "mine\n" and not (out / "dataset_info.json").exists()
    assert invoke("data", "split", data, "-o", out, "--force").exit_code == 0
    assert len((out / "train.jsonl").read_text().splitlines()) > 40
    for name in ("train", "val", "test"):  # their dataset_info.json entries stay: a second split would replace them
        (out / f"{name}.jsonl").unlink()
    refused(invoke("data", "split", data, "-o", out), str(out / "dataset_info.json"), "d_train", "--force")


def test_split_into_the_folder_of_its_input_is_refused(tmp_path, data):
    train = tmp_path / "train.jsonl"
    train.write_bytes(data.read_bytes())
    refused(invoke("data", "split", train, "-o", tmp_path, "--force"), str(train), "is one of the input files")
    assert train.read_bytes() == data.read_bytes()


def test_stats_refuses_a_folder_that_is_not_empty_before_loading_the_model(tmp_path, data):
    refused(invoke("data", "stats", data, "--model", tmp_path / "no-model", "-o", tmp_path), str(tmp_path), "not empty", "--force")
    refused(invoke("data", "stats", data, "--model", tmp_path / "no-model", "-o", data, "--force"), str(data), "is one of the input files")


def test_suggest_refuses_an_existing_config_before_reading_the_model(tmp_path, data):
    out = tmp_path / "train.yaml"
    out.write_text("model_name_or_path: mine\n")
    refused(invoke("suggest", data, "--model", tmp_path / "no-model", "-o", out), str(out), "already exists", "--force")
    assert out.read_text() == "model_name_or_path: mine\n"
    refused(invoke("suggest", data, "--model", tmp_path / "no-model", "-o", data, "--force"), "is one of the input files")
