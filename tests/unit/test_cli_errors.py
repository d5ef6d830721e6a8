"""Mistakes on the command line, through the real entry point: one `error:` line that says what to do, exit code 2,
no traceback and no rich panel. Each case fails while the command line is parsed, before torch is imported."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from conftest import sftlab_cli

BOX = set("╭╮╰╯│─")  # the frame of typer's rich error panels and tracebacks


def run_cli(*args, cwd) -> subprocess.CompletedProcess:
    return sftlab_cli(*args, cwd=cwd, timeout=60, env={**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"})


def one_error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and not BOX & set(result.stderr), result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, parts", [
    (["trian"], ["no such command 'trian'", "Did you mean 'train'?", "sftlab --help"]),
    (["train", "cfg.yaml", "--max_steps=3"], ["--max_steps", "written without dashes: max_steps=3"]),
    (["estimate", "cfg.yaml", "--learning-rate", "1e-4"], ["written without dashes: learning_rate=1e-4"]),
    (["serve", "--port", "abc"], ["'--port'", "integer", "sftlab serve --help"]),
    (["data", "preview"], ["missing argument", "sftlab data preview --help"]),
    (["data", "previw", "cfg.yaml"], ["no such command 'previw'", "Did you mean 'preview'?"]),
    (["data", "check", "d.jsonl", "--max-error", "3"], ["no such option: --max-error", "--max-errors"]),
    (["eval", "cfg.yaml", "--batch-size", "0"], ["'--batch-size'", "greater than or equal to 1", "sftlab eval --help"]),
    (["suggest", "d.jsonl"], ["missing option '--model'", "sftlab suggest --help"]),
    (["export", "--bogus"], ["no such option: --bogus", "sftlab export --help"]),
], ids=lambda v: "-".join(v) if isinstance(v, list) and v and v[0].isidentifier() else None)
def test_usage_errors_are_one_line(tmp_path, args, parts):
    line = one_error_line(run_cli(*args, cwd=tmp_path))
    for part in parts:
        assert part in line, f"{part!r} not in {line!r}"
    assert "Possible options: --master-port" not in line  # for a config key, click's guess points away from the fix


def test_a_verb_without_arguments_prints_its_help(tmp_path):
    result = run_cli("data", cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "preview" in result.stdout and "dedup" in result.stdout


@pytest.mark.parametrize("verb", [["webui"], ["serve", "--model", "no-such-model"]], ids=["webui", "serve"])
def test_a_busy_port_is_one_line_before_anything_loads(tmp_path, verb):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_error_line(run_cli(*verb, "--port", port, cwd=tmp_path))
    assert f"--port {port}" in line and "already in use" in line and f"--port {port + 1}" in line, line


@pytest.mark.parametrize("args, parts", [
    (["webui", "--port", "70000"], ["--port 70000: must be from 1 to 65535"]),
    (["webui", "--port", "0"], ["--port 0: must be from 1 to 65535"]),
    (["serve", "--model", "no-such-model", "--host", "no-such-host.invalid", "--api-key", "k"], ["--host no-such-host.invalid: not an address"]),
    (["serve", "--model", "no-such-model", "--host", "192.0.2.1", "--api-key", "k"], ["--host 192.0.2.1: not an address of this machine"]),
], ids=["port-over", "port-zero", "host-unknown", "host-not-here"])
def test_a_port_or_host_that_cannot_be_listened_on_is_one_line(tmp_path, args, parts):
    line = one_error_line(run_cli(*args, cwd=tmp_path))
    for part in parts:
        assert part in line, f"{part!r} not in {line!r}"
