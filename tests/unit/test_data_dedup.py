"""sftlab data dedup / split and the leakage check, on planted duplicates, near-duplicates and conflicts."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash

from sftlab.data.dedup import dedup
from sftlab.data.near_dup import MinHasher, normalise, shingle_hashes
from sftlab.data.rows import iter_rows
from sftlab.data.sources import format_of, load_source, resolve_sources
from sftlab.data.split import leakage, split
from sftlab.errors import SftlabError
from conftest import sftlab_cli

_WORDS = ("the model learns from examples that show a task and its answer so every sample should be correct consistent "
          "and useful because repeated or wrong data teaches the wrong habit quickly while diverse prompts help it "
          "generalise to questions nobody wrote down before training started on a small budget").split()
_HANZI = "数据质量比数量更重要模型会从每一个样本中学习所以重复的样本会让它过度记住某些回答而矛盾的答案会让它困惑我们需要检查长度分布和多样性"


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _one_word_changed(text: str, at: int, word: str = "zebra") -> str:
    words = text.split()
    words[at] = word
    return " ".join(words)


def _sources(*paths: Path):
    return resolve_sources([str(p) for p in paths], "data")


# ---------------------------------------------------------------- building blocks


def test_minhash_equals_datasketch():
    """The numpy signatures are datasketch's MinHash (affine32, seed 1) over the same shingle hashes."""
    hasher = MinHasher()
    texts = ["hello world, this is a test", "a", "", _HANZI, "x" * 3000 + "y"]
    signatures = hasher(texts, chunk=500)  # the long text crosses chunks
    for text, signature in zip(texts, signatures):
        reference = MinHash(num_perm=128, seed=1, hashfunc=lambda h: h)
        reference.update_batch(shingle_hashes(text).tolist())
        assert np.array_equal(reference.hashvalues, signature), text[:20]


def test_normalise_folds_width_case_and_space_but_keeps_punctuation():
    assert normalise("ＡＢＣ１２３，  Hello\n\t WORLD\u3000中文 ") == "abc123, hello world 中文"
    assert normalise("2-2") != normalise("22")


# ---------------------------------------------------------------- dedup


def _planted(tmp_path: Path) -> tuple[Path, list[dict]]:
    rng = random.Random(0)
    long_answer = _text(rng, 80)
    hanzi_answer = _HANZI * 2
    boilerplate = "You are a careful assistant. " + _text(rng, 250)  # a long system prompt many samples share
    explain, prime, why = "Explain why data quality matters.", "Name a prime number.", "为什么数据质量重要？"
    rows = [
        {"instruction": explain, "input": "", "output": long_answer},                                        # 1
        {"instruction": prime, "input": "", "output": "7"},                                                  # 2
        {"instruction": "  EXPLAIN why data   quality matters. ", "input": "", "output": long_answer.upper()},  # 3 exact of 1
        {"instruction": explain, "input": "", "output": _one_word_changed(long_answer, 40)},                 # 4 near of 1
        {"instruction": why, "input": "", "output": hanzi_answer},                                           # 5
        {"instruction": why, "input": "", "output": hanzi_answer[:50] + "好" + hanzi_answer[51:]},            # 6 near of 5
        {"system": boilerplate, "instruction": "What is the capital of France?", "input": "", "output": "Paris."},  # 7
        {"system": boilerplate, "instruction": "What is the capital of Spain?", "input": "", "output": "Madrid."},  # 8 not a dup
        {"system": boilerplate, "instruction": "Is 7 a prime number?", "input": "", "output": "Yes."},             # 9
        {"system": boilerplate, "instruction": "Is 13 a prime number?", "input": "", "output": "Yes."},            # 10 not a dup
        {"instruction": prime, "input": "", "output": "Four is prime."},                                     # 11 conflicts with 2
    ]
    return _write(tmp_path / "data.jsonl", rows), rows


def test_dedup_removes_planted_duplicates_and_lists_conflicts(tmp_path):
    path, rows = _planted(tmp_path)
    seen = []
    result = dedup(_sources(path), tmp_path / "clean.jsonl", on_bytes=seen.append)

    ref = lambda line: f"{path}:{line}"  # noqa: E731
    removed = [json.loads(line) for line in (tmp_path / "clean.removed.jsonl").read_text().splitlines()]
    assert [(r["ref"], r["kind"], r["duplicate_of"]) for r in removed] == [
        (ref(3), "exact", ref(1)), (ref(4), "near", ref(1)), (ref(6), "near", ref(5))]
    assert removed[0]["similarity"] == 1.0
    assert 0.8 <= removed[1]["similarity"] < 1 and 0.8 <= removed[2]["similarity"] < 1
    kept = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text(encoding="utf-8").splitlines()]
    assert kept == [rows[i - 1] for i in (1, 2, 5, 7, 8, 9, 10, 11)]  # unchanged raw rows, input order
    assert (result.n_rows, result.n_exact, result.n_near, result.n_clusters, result.n_kept) == (11, 1, 2, 2, 8)
    assert sorted(result.cluster_sizes.tolist()) == [2, 3]

    conflicts = [json.loads(line) for line in (tmp_path / "clean.conflicts.jsonl").read_text().splitlines()]
    assert conflicts == [{"match": "same", "prompt": "user: Name a prime number.", "n_samples": 2,
                          "samples": [{"ref": ref(2), "answer": "7"}, {"ref": ref(11), "answer": "Four is prime."}]}]
    assert (result.n_conflicts, result.n_near_conflicts) == (1, 0)  # France/Spain share only the system prompt
    assert result.conflicts[0].samples[1].ref == ref(11) and result.conflicts[0].samples[1].answer == "Four is prime."
    size, members = result.largest[0]
    assert size == 3 and [(m.ref, m.kind) for m in members] == [(ref(1), "kept"), (ref(3), "exact"), (ref(4), "near")]
    assert sum(seen) == pytest.approx(path.stat().st_size)  # two passes, scaled to end at the file size


def _jaccard(a: str, b: str) -> float:
    x, y = set(shingle_hashes(normalise(a)).tolist()), set(shingle_hashes(normalise(b)).tolist())
    return len(x & y) / len(x | y)


def _changed(text: str, at: list[int], words: str) -> str:
    for i, word in zip(at, words.split()):
        text = _one_word_changed(text, i, word)
    return text


def test_near_same_prompts_with_different_answers_are_conflicts(tmp_path):
    rng = random.Random(3)
    q0 = "Please answer carefully: " + _text(rng, 60)
    q1, q3 = _changed(q0, [10], "zebra"), _changed(q0, [20], "koala")
    assert _jaccard(q0, q1) > 0.94 and _jaccard(q0, q3) > 0.94  # exact similarities, well above 0.9
    system = "You are a careful assistant. " + _text(rng, 50)
    rows = [
        {"instruction": q0, "input": "", "output": "Yes, always, as the guide says."},  # 1 anchor
        {"instruction": q1, "input": "", "output": "No, never do that."},                               # 2 near 1: conflict
        {"instruction": q3, "input": "", "output": "Yes, always, as the guide says!"},  # 3 near 1, same answer: a duplicate
        {"instruction": q3, "input": "", "output": "Only on Sundays, and briefly."},                    # 4 near 1: conflict
        {"system": system, "instruction": q1, "input": "", "output": "Something else entirely."},      # 5 other system: no
        {"instruction": "Short one?", "input": "", "output": "A"},                                      # 6
        {"instruction": "Short two?", "input": "", "output": "B"},                                      # 7 short prompts differ
    ]
    path = _write(tmp_path / "near.jsonl", rows)
    result = dedup(_sources(path), tmp_path / "clean.jsonl")
    ref = lambda line: f"{path}:{line}"  # noqa: E731
    assert result.n_near == 1  # row 3: near-same prompt and answer, removed, so it cannot be a conflict
    lines = [json.loads(line) for line in (tmp_path / "clean.conflicts.jsonl").read_text().splitlines()]
    assert [(g["match"], g["n_samples"], [s["ref"] for s in g["samples"]]) for g in lines] == [
        ("near", 3, [ref(1), ref(2), ref(4)])]
    samples = lines[0]["samples"]
    assert samples[0]["similarity"] == 1.0 and all(0.9 <= s["similarity"] < 1 for s in samples[1:])
    assert [(s["prompt"], s["answer"]) for s in samples] == [
        (f"user: {q0}", "Yes, always, as the guide says."), (f"user: {q1}", "No, never do that."), (f"user: {q3}", "Only on Sundays, and briefly.")]
    assert (result.n_conflicts, result.n_near_conflicts) == (0, 1)
    assert "0 prompts, 1 groups of near-same prompts (similarity >= 0.9)" in "\n".join(result.lines())
    assert result.conflicts[0].near and result.conflicts[0].samples[1].prompt == f"user: {q1}"
    from sftlab.report.dedup_report import difference, write_dedup_report

    page = write_dedup_report(result)[-1].read_text(encoding="utf-8")
    shown = difference(f"user: {q0}", f"user: {q1}")  # q1's changed word with 30 characters each side
    assert shown.startswith("…") and shown.endswith("…") and "zebra" in shown and len(shown) < 80
    assert shown in page and "Only on Sundays, and briefly." in page and "groups of near-same" not in page

    strict = dedup(_sources(path), tmp_path / "strict.jsonl", conflict_threshold=1.0)  # identical prompts only
    assert strict.n_near_conflicts == 0 and (tmp_path / "strict.conflicts.jsonl").read_text() == ""
    assert dedup(_sources(path), tmp_path / "exact.jsonl", near=False).n_near_conflicts == 0
    with pytest.raises(SftlabError, match="conflict threshold 0: must be in"):
        dedup(_sources(path), tmp_path / "x.jsonl", conflict_threshold=0)


def test_prompts_that_ask_different_things_are_not_conflicts(tmp_path):
    """A long template with a varying sentence, and prompts that differ only in their numbers, are similar prompts
    whose answers should differ: not conflicts, though their similarity is above the threshold."""
    rng = random.Random(5)
    template = "Extract the name, age and city of the person as JSON. " + _text(rng, 700) + " Text: "
    people = [("Alice Martin lives in Lyon and turned thirty last spring", "Alice"),
              ("Bob Chen moved to Shanghai after finishing his degree", "Bob")]
    sums = ["Compute the sum and explain each step of the method: 1234 + 5678", "Compute the sum and explain each step of the method: 1234 + 5679"]
    assert _jaccard(template + people[0][0], template + people[1][0]) > 0.9 and _jaccard(*sums) > 0.9
    rows = ([{"instruction": template + text, "input": "", "output": f'{{"name": "{name}"}}'} for text, name in people]
            + [{"instruction": q, "input": "", "output": a} for q, a in zip(sums, ("6912", "6913"))])
    result = dedup(_sources(_write(tmp_path / "d.jsonl", rows)), tmp_path / "clean.jsonl")
    assert (result.n_kept, result.n_conflicts, result.n_near_conflicts) == (4, 0, 0)


def test_near_same_prompts_are_not_chained(tmp_path):
    """p1 is near p0, p2 is near p1 but not near p0: two groups, anchored at p0 and p1, never one chain."""
    rng = random.Random(3)
    p0 = "Please answer: " + _text(rng, 14)
    p1, p2 = _changed(p0, [4], "zebra"), _changed(p0, [4, 10], "zebra tapir")
    assert min(_jaccard(p0, p1), _jaccard(p1, p2)) > 0.81 and _jaccard(p0, p2) < 0.7  # threshold 0.78 between
    same = {"instruction": p0, "input": "", "output": "Another answer to the first prompt."}
    path = _write(tmp_path / "chain.jsonl", [{"instruction": p, "input": "", "output": f"Answer number {k}."}
                                             for k, p in enumerate((p0, p1, p2))] + [same])
    result = dedup(_sources(path), tmp_path / "clean.jsonl", conflict_threshold=0.78)
    ref = lambda line: f"{path}:{line}"  # noqa: E731
    lines = [json.loads(line) for line in (tmp_path / "clean.conflicts.jsonl").read_text().splitlines()]
    assert [(g["match"], [s["ref"] for s in g["samples"]]) for g in lines] == [
        ("same", [ref(1), ref(4)]),  # the same prompt comes first on a tie
        ("near", [ref(1), ref(2)]),
        ("near", [ref(2), ref(3)]),
    ]
    assert (result.n_conflicts, result.n_near_conflicts) == (1, 2)


def test_exact_only_keeps_near_duplicates(tmp_path):
    path, _ = _planted(tmp_path)
    result = dedup(_sources(path), tmp_path / "clean.jsonl", near=False)
    assert (result.n_exact, result.n_near, result.n_kept) == (1, 0, 10)
    assert "not looked for" in "\n".join(result.lines())


def test_dedup_names_the_unreadable_row_and_refuses_to_overwrite_input(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', encoding="utf-8")
    with pytest.raises(SftlabError, match=rf"{path}:2: malformed JSON.*sftlab data check"):
        dedup(_sources(path), tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob(".*.tmp"))
    no_answer = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(SftlabError, match=r"chat.jsonl:1: the conversation has no assistant turn.*sftlab data check"):
        dedup(_sources(no_answer), tmp_path / "out.jsonl")
    good, _ = _planted(tmp_path)
    with pytest.raises(SftlabError, match="is one of the input files"):
        dedup(_sources(good), good)
    with pytest.raises(SftlabError, match="threshold"):
        dedup(_sources(good), tmp_path / "out.jsonl", threshold=0)


# ---------------------------------------------------------------- split and leakage


def _clustered(tmp_path: Path, fmt: str = "alpaca") -> tuple[Path, list[list[int]]]:
    """150 unique samples, 10 clusters of 3 near-duplicates (one word changed in prompt and answer), 5 prompts with
    two different answers; shuffled. Returns the file and the 0-based rows of each cluster and prompt pair."""
    rng = random.Random(1)
    items, groups = [], []
    for i in range(150):
        items.append([(f"question {i}: " + _text(rng, 12), _text(rng, 40))])
    for c in range(10):
        prompt, answer = f"cluster {c}: " + _text(rng, 30), _text(rng, 60)
        items.append([(prompt, answer)] + [(_one_word_changed(prompt, 5 + k, "zebra"), _one_word_changed(answer, 20 + k, "zebra"))
                                            for k in range(2)])
    for p in range(5):
        prompt = f"pair {p}: " + _text(rng, 12)
        items.append([(prompt, _text(rng, 30)), (prompt, _text(rng, 30))])
    flat = [(g, sample) for g, item in enumerate(items) for sample in item]
    rng.shuffle(flat)
    groups = [[i for i, (g, _) in enumerate(flat) if g == group] for group in range(150, len(items))]

    def row(prompt: str, answer: str) -> dict:
        if fmt == "sharegpt":
            return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
        return {"instruction": prompt, "input": "", "output": answer}

    return _write(tmp_path / "qa.jsonl", [row(*sample) for _, sample in flat]), groups


def test_split_is_seeded_sized_and_keeps_groups_together(tmp_path):
    path, groups = _clustered(tmp_path)
    assert dedup(_sources(path), tmp_path / "d.jsonl").n_near == 20  # the planted clusters are near-duplicates
    result = split(_sources(path), tmp_path / "s1", val=0.1, test=0.1, seed=7)
    assert result.sizes == {"train": 152, "val": 19, "test": 19}
    assert result.names == {"train": "qa_train", "val": "qa_val", "test": "qa_test"}

    lines = path.read_text(encoding="utf-8").splitlines()
    where = {}
    for name in ("train", "val", "test"):
        split_lines = (tmp_path / "s1" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(split_lines) == result.sizes[name]
        assert [lines.index(x) for x in split_lines] == sorted(lines.index(x) for x in split_lines)  # input order
        where.update({lines.index(x): name for x in split_lines})
    assert sorted(where) == list(range(len(lines)))  # every row once
    for group in groups:
        assert len({where[i] for i in group}) == 1, group

    for name in ("val", "test"):
        leak = leakage(resolve_sources(["qa_train"], str(tmp_path / "s1")), resolve_sources([f"qa_{name}"], str(tmp_path / "s1")))
        assert (leak.n_a, leak.n_b, leak.n_b_leaked, leak.pairs) == (152, 19, 0, [])

    again = split(_sources(path), tmp_path / "s2", val=0.1, test=0.1, seed=7)
    other = split(_sources(path), tmp_path / "s3", val=0.1, test=0.1, seed=8)
    assert again.sizes == result.sizes
    for name in ("train", "val", "test"):
        assert (tmp_path / "s2" / f"{name}.jsonl").read_bytes() == (tmp_path / "s1" / f"{name}.jsonl").read_bytes()
    assert (tmp_path / "s3" / "test.jsonl").read_bytes() != (tmp_path / "s1" / "test.jsonl").read_bytes()
    assert other.sizes["test"] == 19


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt"])
def test_split_registers_datasets_that_load_as_training_reads_them(tmp_path, fmt):
    path, _ = _clustered(tmp_path, fmt)
    original = format_of(_sources(path)[0], load_source(_sources(path)[0]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dataset_info.json").write_text('{"mine": {"file_name": "x.jsonl"}}')
    result = split(_sources(path), tmp_path / "out", val=0.2, test=0, seed=1)
    assert set(result.files) == {"train", "val"} and not (tmp_path / "out" / "test.jsonl").exists()
    info = json.loads((tmp_path / "out" / "dataset_info.json").read_text())
    assert set(info) == {"mine", "qa_train", "qa_val"}  # existing entries kept
    for name in ("train", "val"):
        source = resolve_sources([f"qa_{name}"], str(tmp_path / "out"))[0]
        assert source.spec == original
        ds = load_source(source)
        assert len(ds) == result.sizes[name] == sum(1 for _ in iter_rows(source))
        assert format_of(source, ds) == original


def test_split_rejects_bad_fractions_and_mixed_formats(tmp_path):
    path, _ = _clustered(tmp_path)
    with pytest.raises(SftlabError, match="--val 0.6 --test 0.5"):
        split(_sources(path), tmp_path / "out", val=0.6, test=0.5)
    chat = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(SftlabError, match="different formats"):
        split(_sources(path, chat), tmp_path / "out")
    tiny = _write(tmp_path / "tiny.jsonl", [{"instruction": "q", "output": "a"}] * 3)  # one group of three
    with pytest.raises(SftlabError, match=r"--val 0.1: no group of samples fits in it \(3 samples in 1 groups\)"):
        split(_sources(tiny), tmp_path / "out", val=0.1, test=0)


def test_leakage_finds_exact_near_and_same_prompt_overlaps(tmp_path):
    rng = random.Random(3)
    a_rows = [{"instruction": f"task {i}: " + _text(rng, 20), "input": "", "output": _text(rng, 50)} for i in range(6)]
    b_rows = [
        {"instruction": "Something else entirely.", "input": "", "output": _text(rng, 40)},                        # 1 clean
        dict(a_rows[3], output=a_rows[3]["output"].upper()),                                                       # 2 exact of A4
        dict(a_rows[0], output=_one_word_changed(a_rows[0]["output"], 25)),                                        # 3 near of A1
        dict(a_rows[1], output="A completely different answer to the same question."),                            # 4 prompt of A2
        {"instruction": "Another new question?", "input": "", "output": _text(rng, 40)},                           # 5 clean
    ]
    a, b = _write(tmp_path / "train.jsonl", a_rows), _write(tmp_path / "test.jsonl", b_rows)
    leak = leakage(_sources(a), _sources(b))
    assert (leak.n_a, leak.n_b, leak.n_b_leaked) == (6, 5, 3)
    assert [(p[0], p[1], p[2]) for p in leak.pairs] == [(f"{a}:4", f"{b}:2", "exact"), (f"{a}:1", f"{b}:3", "near"),
                                                        (f"{a}:2", f"{b}:4", "prompt")]
    assert leak.pairs[0][3] == 1.0 and 0.8 <= leak.pairs[1][3] < 1 and leak.pairs[2][3] < 0.8
    assert leak.counts == {"exact": 1, "near": 1, "prompt": 1}
    lines = leak.lines()
    assert lines[0].startswith("leakage: 3 of 5 samples of B (60.0%) also appear in A (6 samples): 1 exact, 1 near")
    assert lines[1].split() == ["exact", f"{b}:2", "~", f"{a}:4", "(1.00)"]
    assert leakage(_sources(b), _sources(_write(tmp_path / "other.jsonl", [b_rows[0]]))).n_b_leaked == 1


# ---------------------------------------------------------------- the CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return sftlab_cli("data", *args, cwd=cwd, timeout=120)


def test_cli_dedup_and_split_end_to_end(tmp_path):
    path, _ = _planted(tmp_path)
    run = _cli("dedup", str(path), "-o", "out/clean.jsonl", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    for line in ("rows: 11", "exact duplicates: 1", "near duplicates (similarity >= 0.8): 2", "duplicate clusters: 2",
                 "conflicting answers: 1 prompts", "kept: 8"):
        assert line in run.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["clean.cluster_sizes.png", "clean.conflicts.jsonl", "clean.jsonl",
                                                     "clean.removed.jsonl", "clean.report.html"]
    page = (out / "clean.report.html").read_text(encoding="utf-8")
    assert '<img src="data:image/png;base64,' in page and "Four is prime." in page and "Largest clusters" in page
    assert (out / "clean.cluster_sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    exact = _cli("dedup", str(path), "-o", "exact.jsonl", "--exact-only", cwd=tmp_path)
    assert exact.returncode == 0 and "kept: 10" in exact.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    failed = _cli("dedup", str(bad), "-o", "bad_out.jsonl", cwd=tmp_path)
    assert failed.returncode == 2 and f"error: {bad}:2: malformed JSON" in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "bad_out.jsonl").exists()

    data, _ = _clustered(tmp_path)
    ran = _cli("split", str(data), "--val", "0.1", "--test", "0.1", "-o", "splits", "--seed", "3", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "train: 152 samples" in ran.stdout and "val: 19 samples" in ran.stdout and "test: 19 samples" in ran.stdout
    assert json.loads((tmp_path / "splits" / "dataset_info.json").read_text())["qa_test"]["file_name"] == "test.jsonl"
