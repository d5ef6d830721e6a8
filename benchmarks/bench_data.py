"""The benchmark's inputs, made offline and deterministically and cached on disk: a chat dataset with
a realistic length spread, and a tiny Llama for quick runs.

The text comes from the project's demo data (``examples/data/person_json_*.json``: sentences about
people in English and Chinese, and their ``{"name", "age", "city"}`` records). Each sample is one
user/assistant turn about several of these people — either "extract a JSON record per person" or
"write a sentence per record" — with as many people as fit a length drawn from a seeded log-normal
(median ~120 tokens with the chat template, ~7 % above 512, a long tail clipped just below
``cutoff_len``). No sample is longer than ``cutoff_len`` tokens as the model's chat template renders it.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parent.parent
DEMO_FILES = (REPO / "examples/data/person_json_train.json", REPO / "examples/data/person_json_test.json")
GENERATOR_VERSION = 1  # bump when the generated text changes, so cached files are not reused
MEDIAN_TOKENS = 120
SIGMA = 1.0  # of log(length): P(length > 512) = P(Z > ln(512 / 120)) ≈ 7 %
LONGEST = 0.97  # lengths are drawn at most this fraction of cutoff_len (rendering may add a few tokens)

EXTRACT = (
    'List every person described below as a JSON object with the keys "name", "age" and "city", one per line, in the order they appear.',
    "Read these notes and return one compact JSON record (name, age, city) per person.",
    "提取下面每个人的名字、年龄和所在城市，每人一行JSON。",
)
DESCRIBE = (
    "Write one short sentence about each of these people.",
    "Turn each JSON record below into a sentence someone might say about that person.",
    "用一句话介绍下面的每一个人。",
)


@dataclass(frozen=True)
class Person:
    description: str  # a sentence or two about the person
    record: str  # the same facts as one line of JSON
    tokens: int  # tokens of both, plus their separators


def load_people(tokenizer: PreTrainedTokenizerBase) -> list[Person]:
    """Every (input, output) pair of the demo data, with its token cost."""
    rows = [row for path in DEMO_FILES for row in json.loads(path.read_text(encoding="utf-8"))]
    counts = tokenizer([r["input"] for r in rows] + [r["output"] for r in rows], add_special_tokens=False)["input_ids"]
    n = len(rows)
    return [Person(r["input"], r["output"], len(counts[i]) + len(counts[n + i]) + 2) for i, r in enumerate(rows)]


def to_messages(task: str, instruction: str, people: list[Person]) -> list[dict[str, str]]:
    """One user/assistant exchange about ``people``: extract their records, or describe them."""
    descriptions = "\n".join(p.description for p in people)
    records = "\n".join(p.record for p in people)
    prompt, answer = (descriptions, records) if task == "extract" else (records, descriptions)
    return [{"role": "user", "content": f"{instruction}\n\n{prompt}"}, {"role": "assistant", "content": answer}]


def rendered_length(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> int:
    """Tokens of the conversation as the chat template renders it (the template writes any BOS itself)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate_chats(tokenizer: PreTrainedTokenizerBase, n: int, cutoff_len: int, seed: int) -> list[list[dict[str, str]]]:
    """``n`` single-turn conversations, each at most ``cutoff_len`` tokens; the same for the same arguments."""
    rng = random.Random(seed)
    people = load_people(tokenizer)
    overhead = rendered_length(tokenizer, to_messages("extract", "", []))
    chats = []
    for _ in range(n):
        target = min(rng.lognormvariate(math.log(MEDIAN_TOKENS), SIGMA), LONGEST * cutoff_len)
        task = rng.choice(("extract", "describe"))
        instruction = rng.choice(EXTRACT if task == "extract" else DESCRIBE)
        budget = target - overhead - len(tokenizer(instruction, add_special_tokens=False)["input_ids"])
        picked = [rng.choice(people)]
        while True:
            nxt = rng.choice(people)
            if sum(p.tokens for p in picked) + nxt.tokens > budget:
                break
            picked.append(nxt)
        messages = to_messages(task, instruction, picked)
        while rendered_length(tokenizer, messages) > cutoff_len:  # the per-person costs are estimates
            if len(picked) == 1:
                raise ValueError(f"cutoff_len {cutoff_len} is too short for even one person; use at least 128")
            picked.pop()
            messages = to_messages(task, instruction, picked)
        chats.append(messages)
    return chats


def length_stats(lengths: list[int]) -> dict[str, float]:
    """Median, 90th percentile, maximum and the share of samples longer than 512 tokens."""
    ordered = sorted(lengths)
    return {"n": len(ordered), "median": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "max": ordered[-1], "over_512": sum(n > 512 for n in ordered) / len(ordered)}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def dataset_file(tokenizer: PreTrainedTokenizerBase, cache: Path, n: int, cutoff_len: int, seed: int) -> tuple[Path, dict[str, float]]:
    """The JSONL dataset (OpenAI ``messages`` rows) for these arguments, generated once into ``cache``,
    and its length statistics in tokens."""
    path = cache / "data" / f"chat-v{GENERATOR_VERSION}-n{n}-cutoff{cutoff_len}-seed{seed}.jsonl"
    if path.is_file():
        chats = [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        chats = generate_chats(tokenizer, n, cutoff_len, seed)
        write_atomic(path, "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in chats))
    return path, length_stats([rendered_length(tokenizer, m) for m in chats])


def tiny_model_dir(tokenizer_dir: Path, cache: Path) -> Path:
    """The tests' tiny 2-layer Llama with the tokenizer of ``tokenizer_dir``, saved once into ``cache``."""
    from sftlab.model.assets import tiny_llama

    return tiny_llama(tokenizer_dir, cache / "tiny-llama-v1")
