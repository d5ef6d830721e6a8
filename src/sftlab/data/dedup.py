"""Duplicates, near-duplicates and conflicting answers; leak-free splits; leakage between two datasets.

Samples are compared as text: the prompt (every turn before the last answer, system prompt included)
and the answer (``rows.prompt_and_answer``), each normalised by ``normalise``.

- Exact duplicates share a 64-bit hash of the whole normalised sample.
- Near-duplicates: the prompt without its system message and the answer each get a MinHash signature
  over character 5-grams. Two samples are near-duplicates when their system prompts are the same and
  both the prompt and the answer have an estimated Jaccard similarity >= ``threshold``. Comparing the
  parts separately keeps samples that share a long system prompt or template but answer differently
  apart; a single signature of the whole sample would merge them. Candidates come from LSH banding
  over both signatures; the verified pairs are joined into clusters (union-find) and the first
  sample of each cluster, in input order, is the one kept.
- Conflicts: kept samples (so their answers are not duplicates of each other) with the same normalised
  non-empty prompt, and, with near-duplicate search on, with a near-same prompt: the same system
  prompt, prompt similarity >= ``conflict_threshold`` (0.9), not identical. They are listed for review,
  not removed. Near-same prompts are grouped around an anchor, never chained: a sample joins the group
  of the first earlier sample whose prompt it is near (LSH over the prompt signature alone), so prompts
  built from one long template cannot pull a whole dataset into one "conflict" through a chain of
  small differences.

Memory: per sample two 128-value uint32 signatures (1 KiB), three 64-bit keys and its ref (~50 bytes),
so about 1.1 GB for 1M samples; rows are read twice (find, then write) and never held.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

import numpy as np
import xxhash
from datasketch import MinHash

from sftlab.data.formats import FormatSpec, RowError, to_text
from sftlab.data.rows import RawRow, conversation, first_value, iter_rows, prompt_and_answer, row_spec
from sftlab.data.sources import Source, read_dataset_info
from sftlab.errors import SftlabError

NUM_PERM = 128  # per part (prompt, answer): estimate's std at J=0.8 is sqrt(.8*.2/128) = 0.035
SHINGLE = 5  # characters: about one word of English, two or three of Chinese (which has no spaces)
BAND_ROWS = 4  # per part per band: 32 bands find a pair with both parts at J=0.8 with probability 0.997
PROMPT_BAND_ROWS = 8  # conflicts band the prompt alone: 16 bands find a pair at J=0.9 w.p. 0.9999, at J=0.5 w.p. 0.06
CONFLICT_THRESHOLD = 0.9
# Near-same prompts differ by a word or two, so in at most this many shingles (a changed word of w characters
# changes about 2(w + 4)): a long template with a varying sentence has similar prompts that ask different things.
MAX_PROMPT_DIFFERENCE = 40
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
MAX_PAIRS = 500  # pairs a Leakage keeps
_BLOCK = 1 << 16  # signature rows per storage block (no reallocation as rows stream in)
_BATCH = 256  # samples signed together
_P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the shingle polynomial hash


# ---------------------------------------------------------------- text → keys and signatures


def normalise(text: str) -> str:
    """NFKC, casefold, whitespace runs → one space, stripped.

    NFKC folds full-width Latin and digits (common in Chinese text) and ligatures; punctuation is kept
    because in SFT data it carries meaning (``2-2`` vs ``22``, code), and a stray comma still leaves
    a near-duplicate.
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _hash(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


def shingle_hashes(text: str) -> np.ndarray:
    """32-bit hashes of the character ``SHINGLE``-grams of (normalised) ``text``; a shorter text is one shingle.

    Character n-grams work the same for every script, spaces or not, and for code.
    """
    c = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32).astype(np.uint64)
    if len(c) < SHINGLE:
        c = np.pad(c, (0, SHINGLE - len(c)))
    m = len(c) - SHINGLE + 1
    h = c[:m].copy()
    for k in range(1, SHINGLE):
        h = h * _P + c[k:k + m]
    return (h ^ (h >> np.uint64(32))).astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finaliser, as datasketch's affine32 scheme applies it before permuting."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _mix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: folds band values into one bucket key."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


class MinHasher:
    """MinHash signatures equal to datasketch's ``MinHash(num_perm, seed, scheme="affine32")`` updated with
    ``shingle_hashes`` as its hash values, computed with numpy over all shingles of a text at once (datasketch >= 2.0)."""

    def __init__(self, num_perm: int = NUM_PERM, seed: int = 1) -> None:
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        # (num_perm, 1): the shingle axis is the contiguous one, so the minimum runs along memory
        self.a, self.b = a.astype(np.uint32)[:, None], b.astype(np.uint32)[:, None]
        self.num_perm = num_perm

    def __call__(self, texts: list[str], chunk: int = 8192) -> np.ndarray:
        """One ``num_perm`` uint32 row per text; temporaries stay under ``chunk`` shingles x ``num_perm``."""
        out = np.empty((len(texts), self.num_perm), np.uint32)
        for i, text in enumerate(texts):
            h = _fmix32(shingle_hashes(text))
            row = None
            for k in range(0, len(h), chunk):
                m = self.a * h[None, k:k + chunk]
                m += self.b
                row = m.min(axis=1) if row is None else np.minimum(row, m.min(axis=1))
            out[i] = row
        return out


# ---------------------------------------------------------------- reading samples


@dataclass
class _Sample:
    row: RawRow
    system: str
    prompt: str  # the whole prompt, system included, as prompt_and_answer writes it
    body: str  # the prompt without the system message
    answer: str


def _rows(sources: list[Source], on_bytes: Callable[[int], None] | None) -> Iterator[tuple[RawRow, FormatSpec]]:
    for source in sources:
        spec = row_spec(source, first_value(source))
        for row in iter_rows(source, on_bytes):
            yield row, spec


def _samples(sources: list[Source], on_bytes: Callable[[int], None] | None) -> Iterator[_Sample]:
    """Every row of ``sources`` as text. Raises SftlabError naming the first row that cannot be read."""
    for row, spec in _rows(sources, on_bytes):
        yield _sample(row, spec)


def _sample(row: RawRow, spec: FormatSpec) -> _Sample:
    try:
        if spec.formatting == "text":  # pretraining text: all answer, no prompt
            if row.value is None:
                raise RowError(f"{row.problem}: {row.detail}")
            return _Sample(row, "", "", "", to_text(row.value, spec))
        messages = conversation(row, spec)
    except RowError as e:
        raise SftlabError(f"{row.ref}: {e}; run `sftlab data check` on the data first and fix or drop such rows") from None
    prompt, answer = prompt_and_answer(messages)
    if messages[0]["role"] == "system":
        return _Sample(row, messages[0]["content"], prompt, prompt_and_answer(messages[1:])[0], answer)
    return _Sample(row, "", prompt, prompt, answer)


class _Refs:
    """Every row's ref, packed in one buffer (a Python list of 1M strings would cost ~100 MB)."""

    def __init__(self) -> None:
        self.buf, self.ends = bytearray(), array("Q")

    def add(self, ref: str) -> None:
        self.buf += ref.encode("utf-8", "surrogatepass")
        self.ends.append(len(self.buf))

    def __getitem__(self, i: int) -> str:
        start = self.ends[i - 1] if i else 0
        return self.buf[start:self.ends[i]].decode("utf-8", "surrogatepass")


class _Table:
    """Per row, in input order: its ref, 64-bit keys of the whole normalised sample (``exact``), of its prompt
    (``prompt``; 0: empty), of its system prompt (``system``; 0: none) and of the numbers in its prompt without
    the system prompt (``numbers``), that prompt's shingle count (``shingles``), and its two signatures (``near`` only)."""

    def __init__(self, near: bool) -> None:
        self.near = near
        self.refs = _Refs()
        self.exact = self.prompt = self.system = self.numbers = self.shingles = np.zeros(0, np.uint64)
        self.blocks: list[np.ndarray] = []  # (_BLOCK, 2 * NUM_PERM) uint32: prompt signature, answer signature
        self.n = 0
        self.hasher = MinHasher() if near else None

    def add(self, sources: list[Source], on_bytes: Callable[[int], None] | None) -> None:
        keys = (array("Q"), array("Q"), array("Q"), array("Q"), array("Q"))
        bodies: list[str] = []
        answers: list[str] = []
        for s in _samples(sources, on_bytes):
            self.refs.add(s.row.ref)
            prompt, answer = normalise(s.prompt), normalise(s.answer)
            body = normalise(s.body) if s.system else prompt
            keys[0].append(_hash(f"{prompt}\x00{answer}"))
            keys[1].append(_hash(prompt) if prompt else 0)
            keys[2].append(_hash(normalise(s.system)) if s.system else 0)
            keys[3].append(_hash(" ".join(_NUMBER.findall(body))))
            keys[4].append(max(1, len(body) - SHINGLE + 1))
            if self.near:
                bodies.append(body)
                answers.append(answer)
                if len(bodies) == _BATCH:
                    self._sign(bodies, answers)
                    bodies, answers = [], []
        if bodies:
            self._sign(bodies, answers)
        self.exact, self.prompt, self.system, self.numbers, self.shingles = (
            np.concatenate([old, np.array(new, np.uint64)])
            for old, new in zip((self.exact, self.prompt, self.system, self.numbers, self.shingles), keys))
        self.n = len(self.refs.ends)

    def _sign(self, bodies: list[str], answers: list[str]) -> None:
        rows = np.concatenate([self.hasher(bodies), self.hasher(answers)], axis=1)
        start = self.n
        while len(rows):
            block, at = divmod(start, _BLOCK)
            if block == len(self.blocks):
                self.blocks.append(np.empty((_BLOCK, 2 * NUM_PERM), np.uint32))
            take = min(len(rows), _BLOCK - at)
            self.blocks[block][at:at + take] = rows[:take]
            rows, start = rows[take:], start + take
        self.n = start

    def columns(self, cols: list[int]) -> np.ndarray:
        """Signature columns ``cols`` of every row, (n, len(cols))."""
        full = [b[:, cols] for b in self.blocks]
        return np.concatenate(full)[:self.n] if full else np.zeros((0, len(cols)), np.uint32)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), 2 * NUM_PERM), np.uint32)
        block, at = np.divmod(idx, _BLOCK)
        for b in np.unique(block):
            m = block == b
            out[m] = self.blocks[b][at[m]]
        return out

    def similarity(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """min(prompt, answer) estimated Jaccard of each pair (u[k], v[k]); 0 where system prompts differ."""
        return np.minimum(*self.part_similarity(u, v))

    def part_similarity(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Estimated Jaccard of the prompts and of the answers of each pair (u[k], v[k]); 0 where system prompts differ."""
        prompt, answer = np.empty(len(u)), np.empty(len(u))
        for k in range(0, len(u), 8192):
            eq = self.rows(u[k:k + 8192]) == self.rows(v[k:k + 8192])
            prompt[k:k + 8192], answer[k:k + 8192] = eq[:, :NUM_PERM].mean(1), eq[:, NUM_PERM:].mean(1)
        same_system = self.system[u] == self.system[v]
        return np.where(same_system, prompt, 0.0), np.where(same_system, answer, 0.0)


def _read(sources: list[Source], near: bool, on_bytes: Callable[[int], None] | None) -> _Table:
    table = _Table(near)
    table.add(sources, on_bytes)
    return table


# ---------------------------------------------------------------- clustering


def _compress(parent: np.ndarray) -> None:
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def _union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Join the components of each pair; every root stays the smallest index of its component."""
    while len(u):
        _compress(parent)
        ru, rv = parent[u], parent[v]
        apart = ru != rv
        if not apart.any():
            return
        u, v, ru, rv = u[apart], v[apart], ru[apart], rv[apart]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))


def _both_parts() -> list[list[int]]:
    """LSH bands over the prompt and the answer signature together: a pair must match in both parts."""
    return [list(range(s, s + BAND_ROWS)) + list(range(NUM_PERM + s, NUM_PERM + s + BAND_ROWS)) for s in range(0, NUM_PERM, BAND_ROWS)]


def _prompt_only() -> list[list[int]]:
    return [list(range(s, s + PROMPT_BAND_ROWS)) for s in range(0, NUM_PERM, PROMPT_BAND_ROWS)]


def _band_pairs(table: _Table, ids: np.ndarray, bands: list[list[int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per LSH band (signature columns), candidate pairs (u < v) among rows ``ids`` (ascending) that share the
    band's bucket and system prompt: each member with its bucket's first member and with the member before it
    (linear in bucket size)."""
    system = table.system[ids]
    for start, cols in enumerate(bands):
        values = table.columns(cols)[ids].astype(np.uint64)
        key = _mix64(system ^ np.uint64(start))
        for c in range(values.shape[1]):
            key = _mix64(key ^ values[:, c])
        order = np.argsort(key, kind="stable")
        k, members = key[order], ids[order]
        first = np.r_[True, k[1:] != k[:-1]]
        head = members[np.maximum.accumulate(np.where(first, np.arange(len(k)), 0))]
        later = ~first
        after_second = later & np.r_[False, later[:-1]]
        yield (np.concatenate([head[later], members[np.flatnonzero(after_second) - 1]]),
               np.concatenate([members[later], members[after_second]]))


def _clusters(table: _Table, threshold: float) -> np.ndarray:
    """Each row's cluster root: the first row (input order) of its exact or near-duplicate cluster."""
    _, first, inverse = np.unique(table.exact, return_index=True, return_inverse=True)
    parent = first[inverse.reshape(-1)].astype(np.int64)
    if table.near and table.n:
        reps = np.flatnonzero(parent == np.arange(table.n))
        for u, v in _band_pairs(table, reps, _both_parts()):
            _compress(parent)
            todo = parent[u] != parent[v]
            u, v = u[todo], v[todo]
            match = table.similarity(u, v) >= threshold
            _union(parent, u[match], v[match])
    _compress(parent)
    return parent


def _prompt_groups(table: _Table) -> np.ndarray:
    """Each row's first row with the same normalised non-empty prompt (itself when its prompt is empty)."""
    keys = table.prompt
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    group = first[inverse.reshape(-1)].astype(np.int64)
    return np.where(keys == 0, np.arange(table.n), group)


# ---------------------------------------------------------------- writing


def sidecar(out: Path, suffix: str) -> Path:
    """``out``'s companion file: data/clean.jsonl, ".removed.jsonl" → data/clean.removed.jsonl."""
    return out.with_name(out.stem + suffix)


@contextmanager
def _atomic_files(*paths: Path) -> Iterator[list[TextIO]]:
    """Text files written to temporaries and moved into place together, only if the block succeeds."""
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    tmps = [p.with_name(f".{p.name}.tmp") for p in paths]
    files = [open(t, "w", encoding="utf-8") for t in tmps]
    try:
        yield files
    except BaseException:
        for f, t in zip(files, tmps):
            f.close()
            t.unlink(missing_ok=True)
        raise
    for f, t, p in zip(files, tmps, paths):
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(t, p)


def _json_line(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, default=str) + "\n"


def _not_an_input(path: Path, sources: list[Source]) -> None:
    inputs = {f.resolve() for s in sources for f in s.files}
    if path.resolve() in inputs:
        raise SftlabError(f"{path}: is one of the input files; write the output to a new file")


def _two_passes(on_bytes: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """Progress over two reads of the data, scaled so that it ends at the data's size."""
    return (lambda n: on_bytes(n / 2)) if on_bytes else None


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + "…"


# ---------------------------------------------------------------- dedup


@dataclass
class Member:
    ref: str
    kind: str  # "kept", "exact" or "near"
    similarity: float  # to the kept sample
    text: str  # prompt and answer, truncated


@dataclass
class ConflictSample:
    ref: str
    prompt: str  # for a near-same prompt group: this sample's own prompt
    answer: str
    similarity: float  # of its prompt to the group's first (1.0 in a same-prompt group)


@dataclass
class Conflict:
    near: bool  # grouped by near-same prompts (else the same prompt)
    prompt: str  # the first sample's prompt
    n_samples: int
    samples: list[ConflictSample]  # the first few, clipped


@dataclass
class DedupResult:
    """What ``dedup`` found and wrote. Counts are samples unless named otherwise."""

    n_rows: int
    n_exact: int  # removed: the same normalised text as the kept sample of its cluster
    n_near: int  # removed: near-duplicates
    n_clusters: int  # clusters of two or more samples
    n_conflicts: int  # groups of kept samples with one prompt and different answers
    n_near_conflicts: int  # groups of kept samples with near-same prompts and different answers
    n_kept: int
    threshold: float
    near: bool
    out: Path
    removed_path: Path
    conflicts_path: Path
    conflict_threshold: float
    cluster_sizes: np.ndarray  # size of every cluster of two or more
    largest: list[tuple[int, list[Member]]] = field(default_factory=list)  # largest clusters: size, first members

    conflicts: list[Conflict] = field(default_factory=list)  # the first conflict groups

    def lines(self) -> list[str]:
        return [
            f"rows: {self.n_rows:,}",
            f"exact duplicates: {self.n_exact:,}",
            f"near duplicates (similarity >= {self.threshold:g}): {self.n_near:,}" if self.near
            else "near duplicates: not looked for (--exact-only)",
            f"duplicate clusters: {self.n_clusters:,}",
            f"conflicting answers: {self.n_conflicts:,} prompts" + (
                f", {self.n_near_conflicts:,} groups of near-same prompts (similarity >= {self.conflict_threshold:g})"
                if self.near and self.conflict_threshold < 1 else "") + f" (kept; review them in {self.conflicts_path})",
            f"kept: {self.n_kept:,} → {self.out}",
            f"removed: {self.n_exact + self.n_near:,} → {self.removed_path}",
        ]


def dedup(sources: list[Source], out: Path, threshold: float = 0.8, near: bool = True,
          on_bytes: Callable[[int], None] | None = None, conflict_threshold: float = CONFLICT_THRESHOLD) -> DedupResult:
    """Write ``out`` (JSONL: the raw rows kept, in input order), ``<stem>.removed.jsonl`` (ref, kind, duplicate_of,
    similarity) and ``<stem>.conflicts.jsonl`` (match "same" or "near", prompt, n_samples, samples: ref, answer, and
    for "near" each sample's prompt and its similarity to the first), all atomically. ``near=False``: exact duplicates
    and same-prompt conflicts only; ``conflict_threshold=1``: no near-same prompt groups. ``on_bytes`` gets the
    progress of both reads, halved.

    Raises SftlabError for a threshold outside (0, 1], an output that is an input, or a row that cannot be read.
    """
    for name, value, usual in (("threshold", threshold, "0.8 is usual, higher removes less"),
                               ("conflict threshold", conflict_threshold, "0.9 is usual; 1 lists identical prompts only")):
        if not 0 < value <= 1:
            raise SftlabError(f"{name} {value}: must be in (0, 1]; {usual}")
    if out.suffix not in (".jsonl", ".json"):
        raise SftlabError(f"{out}: the output is JSON Lines; name it .jsonl")
    removed_path, conflicts_path = sidecar(out, ".removed.jsonl"), sidecar(out, ".conflicts.jsonl")
    for p in (out, removed_path, conflicts_path):
        _not_an_input(p, sources)
    progress = _two_passes(on_bytes)
    table = _read(sources, near, progress)
    n = table.n
    root = _clusters(table, threshold)
    keys = table.exact
    kind = np.where(root == np.arange(n), 0, np.where(keys == keys[root], 1, 2)).astype(np.int8)  # _MEMBER_KINDS
    similarity = np.ones(n)
    near_rows = np.flatnonzero(kind == 2)
    similarity[near_rows] = table.similarity(near_rows, root[near_rows])
    sizes = np.bincount(root, minlength=n)
    cluster_roots = np.flatnonzero(sizes > 1)
    largest = {int(r): np.flatnonzero(root == r)[:6].tolist()
               for r in cluster_roots[np.argsort(-sizes[cluster_roots], kind="stable")[:10]]}
    groups = _same_prompt_groups(table.prompt, kind == 0)
    if near and conflict_threshold < 1:
        groups = groups.merged(_near_prompt_groups(table, kind == 0, conflict_threshold, threshold))

    with _atomic_files(out, removed_path, conflicts_path) as (kept_file, removed_file, conflicts_file):
        texts, conflicts = _write_kept(sources, progress, kind == 0, {i for m in largest.values() for i in m},
                                       groups, kept_file, conflicts_file)
        for i in np.flatnonzero(kind > 0).tolist():
            removed_file.write(_json_line({"ref": table.refs[i], "kind": _MEMBER_KINDS[kind[i]],
                                           "duplicate_of": table.refs[int(root[i])], "similarity": round(float(similarity[i]), 3)}))
    shown = [(int(sizes[r]), [Member(table.refs[i], _MEMBER_KINDS[kind[i]], float(similarity[i]), texts[i]) for i in members])
             for r, members in largest.items()]
    n_near_groups = int(groups.near.sum())
    return DedupResult(n, int((kind == 1).sum()), near_rows.size, len(cluster_roots), len(groups.near) - n_near_groups,
                       n_near_groups, int((kind == 0).sum()), threshold, near, out, removed_path, conflicts_path,
                       conflict_threshold, sizes[cluster_roots], shown, conflicts)


_MEMBER_KINDS = ("kept", "exact", "near")


def _write_kept(sources: list[Source], on_bytes: Callable[[int], None] | None, kept: np.ndarray, wanted: set[int],
                groups: _Groups, kept_file: TextIO, conflicts_file: TextIO) -> tuple[dict[int, str], list[Conflict]]:
    """The second read: write the kept rows and the conflict groups; return the texts of rows ``wanted`` (clipped)
    and the first conflict groups. Conflicting samples go to a scratch file first, as their groups interleave."""
    texts: dict[int, str] = {}
    in_groups = np.unique(groups.rows)
    slot = np.full(len(kept), -1)
    slot[in_groups] = np.arange(len(in_groups))
    offsets = np.zeros(len(in_groups), np.int64)
    scratch = Path(kept_file.name).with_suffix(".conflicts")
    try:
        with open(scratch, "w+b") as records:
            for i, (row, spec) in enumerate(_rows(sources, on_bytes)):
                if kept[i]:
                    kept_file.write(_json_line(row.value))
                if i in wanted:
                    s = _sample(row, spec)
                    texts[i] = _clip(f"{s.prompt}\n→ {s.answer}", 600)
                if slot[i] >= 0:
                    s = _sample(row, spec)
                    offsets[slot[i]] = records.tell()
                    record = _json_line({"ref": row.ref, "prompt": s.prompt, "answer": s.answer})
                    records.write(record.encode("utf-8", "surrogatepass"))
            return texts, _write_conflicts(records, offsets[slot[groups.rows]], groups, conflicts_file)
    finally:
        scratch.unlink(missing_ok=True)


@dataclass
class _Groups:
    """Conflict groups, flat: group g's members are ``rows[bounds[g]:bounds[g + 1]]`` in input order, the first being
    its anchor, with each member's prompt ``similarity`` to the anchor; ``near[g]``: grouped by near-same prompts."""

    rows: np.ndarray
    bounds: np.ndarray
    similarity: np.ndarray
    near: np.ndarray

    def merged(self, other: "_Groups") -> "_Groups":
        """Both sets of groups, ordered by their anchor row (same-prompt group first on a tie)."""
        sizes = np.diff(np.r_[self.bounds, other.bounds[1:] + self.bounds[-1]])
        rows, similarity = np.r_[self.rows, other.rows], np.r_[self.similarity, other.similarity]
        near = np.r_[self.near, other.near]
        starts = np.r_[self.bounds[:-1], other.bounds[:-1] + self.bounds[-1]]
        order = np.lexsort((near, rows[starts])) if len(starts) else np.zeros(0, np.int64)
        take = np.concatenate([np.arange(starts[g], starts[g] + sizes[g]) for g in order]) if len(order) else np.zeros(0, np.int64)
        return _Groups(rows[take], np.r_[0, np.cumsum(sizes[order])], similarity[take], near[order])


def _same_prompt_groups(prompt_keys: np.ndarray, kept: np.ndarray) -> _Groups:
    """Kept rows that share a non-empty prompt with another kept row, grouped, groups in order of their first row."""
    candidates = np.flatnonzero(kept & (prompt_keys != 0))
    _, inverse, counts = np.unique(prompt_keys[candidates], return_inverse=True, return_counts=True)
    rows = candidates[counts[inverse.reshape(-1)] > 1]
    _, first, inverse = np.unique(prompt_keys[rows], return_index=True, return_inverse=True)
    group = np.argsort(np.argsort(first))[inverse.reshape(-1)]  # groups numbered by their first row
    order = np.argsort(group, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(group, minlength=len(first)))]
    return _Groups(rows[order], bounds, np.ones(len(rows)), np.zeros(len(first), bool))


def _near_prompt_groups(table: _Table, kept: np.ndarray, conflict_threshold: float, threshold: float) -> _Groups:
    """Kept rows whose prompt is near-same (similarity >= ``conflict_threshold``, not identical; the same system prompt
    and numbers; at most ``MAX_PROMPT_DIFFERENCE`` shingles different) as an earlier kept row's, and whose answers are not near-duplicates (< ``threshold``; a lower --threshold already merged
    such pairs), grouped around their anchor: the first such earlier row found (LSH over prompt signatures).
    Each distinct prompt takes part through its first row; its other rows are in its same-prompt group."""
    n = table.n
    anchor, similarity = np.full(n, n, np.int64), np.zeros(n)
    candidates = np.flatnonzero(kept & (table.prompt != 0))
    ids = np.sort(candidates[np.unique(table.prompt[candidates], return_index=True)[1]])  # each prompt once (its first row)
    for u, v in _band_pairs(table, ids, _prompt_only()):
        u, v = u[u < anchor[v]], v[u < anchor[v]]
        prompt_sim, answer_sim = table.part_similarity(u, v)
        # |A xor B| = (1 - J) / (1 + J) * (|A| + |B|) for sets A, B of Jaccard similarity J
        differ = (1 - prompt_sim) / (1 + prompt_sim) * (table.shingles[u] + table.shingles[v]).astype(float)
        ok = ((prompt_sim >= conflict_threshold) & (answer_sim < threshold) & (differ <= MAX_PROMPT_DIFFERENCE)
              & (table.numbers[u] == table.numbers[v]))  # "2 + 3" and "2 + 4" ask different things
        u, v, sim = u[ok], v[ok], prompt_sim[ok]
        order = np.lexsort((u, v))  # per v, the smallest u first
        u, v, sim = u[order], v[order], sim[order]
        first = np.r_[True, v[1:] != v[:-1]] if len(v) else np.zeros(0, bool)
        better = u[first] < anchor[v[first]]
        anchor[v[first][better]], similarity[v[first][better]] = u[first][better], sim[first][better]
    members = np.flatnonzero(anchor < n)
    centres = np.unique(anchor[members])
    order = np.lexsort((members, anchor[members]))
    members = members[order]
    group = np.searchsorted(centres, anchor[members])
    sizes = np.bincount(group, minlength=len(centres)) + 1
    starts = np.cumsum(sizes) - sizes
    rows, sims = np.empty(len(members) + len(centres), np.int64), np.ones(len(members) + len(centres))
    rows[starts] = centres
    at = np.arange(len(members)) + group + 1  # after the anchor and the earlier members of its group
    rows[at], sims[at] = members, similarity[members]
    return _Groups(rows, np.r_[0, np.cumsum(sizes)], sims, np.ones(len(centres), bool))


def _write_conflicts(records, offsets: np.ndarray, groups: _Groups, out: TextIO, per_group: int = 50,
                     preview: int = 20) -> list[Conflict]:
    """One line per conflict group, members read from the scratch ``records`` (``offsets``: per member of
    ``groups.rows``); returns the first ``preview`` groups, clipped."""
    shown = []
    for g in range(len(groups.near)):
        lo, hi = int(groups.bounds[g]), int(groups.bounds[g + 1])
        near = bool(groups.near[g])
        samples = []
        for k in range(lo, min(hi, lo + per_group)):
            records.seek(int(offsets[k]))
            samples.append(json.loads(records.readline()) | {"similarity": round(float(groups.similarity[k]), 3)})
        keys = ("ref", "prompt", "similarity", "answer") if near else ("ref", "answer")
        out.write(_json_line({"match": "near" if near else "same", "prompt": samples[0]["prompt"], "n_samples": hi - lo,
                              "samples": [{k: s[k] for k in keys} for s in samples]}))
        if g < preview:
            shown.append(Conflict(near, _clip(samples[0]["prompt"], 600), hi - lo,
                                  [ConflictSample(s["ref"], _clip(s["prompt"], 600), _clip(s["answer"], 300), s["similarity"])
                                   for s in samples[:8]]))
    return shown


# ---------------------------------------------------------------- split


SPLITS = ("train", "val", "test")


@dataclass
class SplitResult:
    n_rows: int
    n_groups: int  # sets of samples that had to stay together (clusters, same prompt), singletons included
    sizes: dict[str, int]  # split → samples
    files: dict[str, Path]
    names: dict[str, str]  # split → its name in dataset_info.json
    info_path: Path

    def lines(self) -> list[str]:
        out = [f"{split}: {self.sizes[split]:,} samples ({self.sizes[split] / max(1, self.n_rows):.1%}) → {self.files[split]}"
               for split in self.files]
        out.append(f"{self.n_rows:,} samples in {self.n_groups:,} groups; near-duplicates and samples with the same prompt "
                   "are in the same split")
        out.append(f"registered in {self.info_path}: {', '.join(self.names.values())} "
                   f"(dataset: {self.names['train']} with dataset_dir: {self.info_path.parent})")
        return out


def split(sources: list[Source], out_dir: Path, val: float = 0.1, test: float = 0.1, seed: int = 42, threshold: float = 0.8,
          on_bytes: Callable[[int], None] | None = None) -> SplitResult:
    """Write ``out_dir``/train.jsonl, val.jsonl, test.jsonl (raw rows, input order; a split with fraction 0 is not
    written) and register them in ``out_dir``/dataset_info.json as ``<name>_train`` etc., ``<name>`` being the first
    source's file stem. Each near-duplicate cluster and each group of samples with the same prompt goes to one split,
    so nothing leaks; groups are assigned in a random order drawn from ``seed``, and val and test get as close to
    their fractions as whole groups allow (never over). Raises SftlabError for bad fractions, sources of different
    formats, a requested split left empty, or a row that cannot be read.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise SftlabError(f"--val {val} --test {test}: each must be in [0, 1) and together below 1")
    if not 0 < threshold <= 1:
        raise SftlabError(f"threshold {threshold}: must be in (0, 1]; 0.8 is usual")
    specs = [row_spec(s, first_value(s)) for s in sources]
    if any(spec != specs[0] for spec in specs):
        raise SftlabError("the datasets have different formats, and one split file holds one format; "
                          "split them one at a time (or convert them to one format first)")
    name = Path(sources[0].name).stem
    fractions = {"train": 1 - val - test, "val": val, "test": test}
    files = {k: out_dir / f"{k}.jsonl" for k in SPLITS if fractions[k] > 0}
    info_path = out_dir / "dataset_info.json"
    for p in [*files.values(), info_path]:
        _not_an_input(p, sources)
    info = _existing_info(info_path)

    progress = _two_passes(on_bytes)
    table = _read(sources, True, progress)
    n = table.n
    root = _clusters(table, threshold)
    together = _prompt_groups(table)
    apart = np.flatnonzero(together != np.arange(n))
    _union(root, together[apart], apart)
    _compress(root)

    sizes = np.bincount(root, minlength=n)
    heads = np.flatnonzero(sizes)
    which, filled = _assign(sizes[heads].tolist(), [round(fractions[k] * n) for k in ("val", "test")], seed)
    for k, split_name in enumerate(SPLITS):
        if split_name in files and filled[k] == 0:
            raise SftlabError(f"--{split_name} {fractions[split_name]:g}: no group of samples fits in it ({n:,} samples in "
                              f"{len(heads):,} groups); use more data or a larger fraction")
    split_of = which[np.searchsorted(heads, root)]

    names = {k: f"{name}_{k}" for k in files}
    spec = specs[0]
    for k in files:
        entry = {"file_name": files[k].name, "formatting": spec.formatting, "columns": spec.columns}
        if spec.formatting in ("sharegpt", "openai"):
            entry["tags"] = spec.tags
        info[names[k]] = entry
    with _atomic_files(*files.values(), info_path) as handles:
        out = {SPLITS.index(k): f for k, f in zip(files, handles)}
        for i, (row, _) in enumerate(_rows(sources, progress)):
            out[int(split_of[i])].write(_json_line(row.value))
        handles[-1].write(json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    return SplitResult(n, len(heads), {k: filled[SPLITS.index(k)] for k in files}, files, names, info_path)


def _assign(group_sizes: list[int], targets: list[int], seed: int) -> tuple[np.ndarray, list[int]]:
    """Each group's split (0 train, 1 val, 2 test) and the samples per split: groups in a seeded random order go
    to test, else val, while they fit in the target size (val, test), the rest to train."""
    which = np.zeros(len(group_sizes), np.int8)
    filled = [0, 0, 0]
    limit = [0, *targets]
    for g in np.random.default_rng(seed).permutation(len(group_sizes)).tolist():
        size = group_sizes[g]
        k = next((k for k in (2, 1) if filled[k] + size <= limit[k]), 0)
        which[g] = k
        filled[k] += size
    return which, filled


def _existing_info(path: Path) -> dict:
    """The entries already in ``path`` (kept beside the new ones), or {}."""
    return read_dataset_info(path) if path.is_file() else {}


# ---------------------------------------------------------------- leakage


_KINDS = ("exact", "near", "prompt")


@dataclass
class Leakage:
    """Samples of B (e.g. a test set) that also appear in A (e.g. the training set)."""

    n_a: int
    n_b: int
    n_b_leaked: int
    pairs: list[tuple[str, str, str, float]]  # (ref in A, ref in B, kind, similarity), the first MAX_PAIRS in B's order
    counts: dict[str, int] = field(default_factory=dict)  # kind → samples of B
    threshold: float = 0.8

    def lines(self, show: int = 20) -> list[str]:
        share = f" ({self.n_b_leaked / self.n_b:.1%})" if self.n_b else ""
        out = [f"leakage: {self.n_b_leaked:,} of {self.n_b:,} samples of B{share} also appear in A ({self.n_a:,} samples): "
               f"{self.counts.get('exact', 0):,} exact, "
               f"{self.counts.get('near', 0):,} near-duplicates (similarity >= {self.threshold:g}), "
               f"{self.counts.get('prompt', 0):,} the same prompt with another answer"]
        out += [f"  {kind:<6} {b}  ~  {a}  ({sim:.2f})" for a, b, kind, sim in self.pairs[:show]]
        if self.n_b_leaked > show:
            out.append(f"  ... {self.n_b_leaked - show:,} more")
        return out


def leakage(sources_a: list[Source], sources_b: list[Source], threshold: float = 0.8,
            on_bytes: Callable[[int], None] | None = None) -> Leakage:
    """Match each sample of B against A: "exact" (same normalised text), else "near" (near-duplicate, as in dedup),
    else "prompt" (same normalised non-empty prompt, another answer). Similarity is min(prompt, answer) estimated
    Jaccard, 1.0 for exact. Raises SftlabError for a threshold outside (0, 1] or a row that cannot be read."""
    if not 0 < threshold <= 1:
        raise SftlabError(f"threshold {threshold}: must be in (0, 1]; 0.8 is usual")
    table = _Table(near=True)
    table.add(sources_a, on_bytes)
    n_a = table.n
    table.add(sources_b, on_bytes)
    n_b = table.n - n_a
    b_rows = np.arange(n_a, table.n)

    partner = _first_match(table.exact[:n_a], table.exact[n_a:])
    kind = np.where(partner >= 0, 0, -1)
    similarity = np.where(partner >= 0, 1.0, 0.0)

    found_v, found_u, found_sim = [], [], []
    for u, v in _band_pairs(table, np.arange(table.n), _both_parts()):
        cross = (u < n_a) & (v >= n_a)
        u, v = u[cross], v[cross]
        todo = kind[v - n_a] < 0
        u, v = u[todo], v[todo]
        sim = table.similarity(u, v)
        match = sim >= threshold
        found_v.append(v[match])
        found_u.append(u[match])
        found_sim.append(sim[match])
    if found_v:
        v, u, sim = np.concatenate(found_v), np.concatenate(found_u), np.concatenate(found_sim)
        best = np.lexsort((-sim, v))  # per B row, the most similar A row first
        v, u, sim = v[best], u[best], sim[best]
        first = np.r_[True, v[1:] != v[:-1]] if len(v) else np.zeros(0, bool)
        rows = v[first] - n_a  # none of them exact: those were left out above
        partner[rows], kind[rows], similarity[rows] = u[first], 1, sim[first]

    same_prompt = _first_match(table.prompt[:n_a], table.prompt[n_a:])
    rows = np.flatnonzero((kind < 0) & (same_prompt >= 0) & (table.prompt[n_a:] != 0))
    partner[rows], kind[rows] = same_prompt[rows], 2
    similarity[rows] = table.similarity(partner[rows], b_rows[rows])

    leaked = np.flatnonzero(kind >= 0)
    pairs = [(table.refs[int(partner[r])], table.refs[int(n_a + r)], _KINDS[kind[r]], round(float(similarity[r]), 3))
             for r in leaked[:MAX_PAIRS].tolist()]
    counts = {k: int((kind == i).sum()) for i, k in enumerate(_KINDS)}
    return Leakage(n_a, n_b, len(leaked), pairs, counts, threshold)


def _first_match(a_keys: np.ndarray, b_keys: np.ndarray) -> np.ndarray:
    """For each key of B, the index of its first occurrence in A, or -1."""
    if not len(a_keys):
        return np.full(len(b_keys), -1)
    keys, first = np.unique(a_keys, return_index=True)
    pos = np.searchsorted(keys, b_keys).clip(max=len(keys) - 1)
    return np.where(keys[pos] == b_keys, first[pos], -1)
