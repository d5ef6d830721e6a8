"""The near-duplicate engine under dedup, split and leakage: samples as normalised text, MinHash signatures,
LSH banding and union-find clusters.

Samples are compared as text: the prompt (every turn before the last answer, system prompt included)
and the answer (``rows.prompt_and_answer``), each normalised by ``normalise``.

- Exact duplicates share a 64-bit hash of the whole normalised sample.
- Near-duplicates: the prompt without its system message and the answer each get a MinHash signature
  over character 5-grams. Two samples are near-duplicates when their system prompts are the same and
  both the prompt and the answer have an estimated Jaccard similarity >= ``threshold``. Comparing the
  parts separately keeps samples that share a long system prompt or template but answer differently
  apart; a single signature of the whole sample would merge them. Candidates come from LSH banding
  over both signatures; the verified pairs are joined into clusters (union-find) and the first
  sample of each cluster, in input order, is its root.

Memory: per sample two 128-value uint32 signatures (1 KiB), three 64-bit keys and its ref (~50 bytes),
so about 1.1 GB for 1M samples; rows are read as a stream and never held.
"""

from __future__ import annotations

import re
import unicodedata
from array import array
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import xxhash
from datasketch import MinHash

from sftlab.data.formats import FormatSpec, RowError, to_text
from sftlab.data.rows import RawRow, conversation, first_value, iter_rows, prompt_and_answer, row_spec
from sftlab.data.sources import Source
from sftlab.errors import SftlabError

NUM_PERM = 128  # per part (prompt, answer): estimate's std at J=0.8 is sqrt(.8*.2/128) = 0.035
SHINGLE = 5  # characters: about one word of English, two or three of Chinese (which has no spaces)
BAND_ROWS = 4  # per part per band: 32 bands find a pair with both parts at J=0.8 with probability 0.997
PROMPT_BAND_ROWS = 8  # conflicts band the prompt alone: 16 bands find a pair at J=0.9 w.p. 0.9999, at J=0.5 w.p. 0.06
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
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
class Sample:
    """A row as the text that is compared (not yet normalised)."""

    row: RawRow
    system: str
    prompt: str  # the whole prompt, system included, as prompt_and_answer writes it
    body: str  # the prompt without the system message
    answer: str


def rows(sources: list[Source], on_bytes: Callable[[int], None] | None) -> Iterator[tuple[RawRow, FormatSpec]]:
    """Every row of ``sources``, streamed in input order, with its source's format."""
    for source in sources:
        spec = row_spec(source, first_value(source))
        for row in iter_rows(source, on_bytes):
            yield row, spec


def _samples(sources: list[Source], on_bytes: Callable[[int], None] | None) -> Iterator[Sample]:
    """Every row of ``sources`` as text. Raises SftlabError naming the first row that cannot be read."""
    for row, spec in rows(sources, on_bytes):
        yield sample(row, spec)


def sample(row: RawRow, spec: FormatSpec) -> Sample:
    """``row`` as text. Raises SftlabError naming the row when it cannot be read or has no conversation."""
    try:
        if spec.formatting == "text":  # pretraining text: all answer, no prompt
            if row.value is None:
                raise RowError(f"{row.problem}: {row.detail}")
            return Sample(row, "", "", "", to_text(row.value, spec))
        messages = conversation(row, spec)
    except RowError as e:
        raise SftlabError(f"{row.ref}: {e}; run `sftlab data check` on the data first and fix or drop such rows") from None
    prompt, answer = prompt_and_answer(messages)
    if messages[0]["role"] == "system":
        return Sample(row, messages[0]["content"], prompt, prompt_and_answer(messages[1:])[0], answer)
    return Sample(row, "", prompt, prompt, answer)


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


class Table:
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


def read(sources: list[Source], near: bool, on_bytes: Callable[[int], None] | None) -> Table:
    """One pass over ``sources``: the Table of every row (signatures only with ``near``)."""
    table = Table(near)
    table.add(sources, on_bytes)
    return table


# ---------------------------------------------------------------- clustering


def compress(parent: np.ndarray) -> None:
    """Point every row of the union-find forest ``parent`` straight at its root, in place."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Join the components of each pair; every root stays the smallest index of its component."""
    while len(u):
        compress(parent)
        ru, rv = parent[u], parent[v]
        apart = ru != rv
        if not apart.any():
            return
        u, v, ru, rv = u[apart], v[apart], ru[apart], rv[apart]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))


def both_parts() -> list[list[int]]:
    """LSH bands over the prompt and the answer signature together: a pair must match in both parts."""
    return [list(range(s, s + BAND_ROWS)) + list(range(NUM_PERM + s, NUM_PERM + s + BAND_ROWS)) for s in range(0, NUM_PERM, BAND_ROWS)]


def prompt_only() -> list[list[int]]:
    """LSH bands over the prompt signature alone (near-same prompts, whatever the answers)."""
    return [list(range(s, s + PROMPT_BAND_ROWS)) for s in range(0, NUM_PERM, PROMPT_BAND_ROWS)]


def band_pairs(table: Table, ids: np.ndarray, bands: list[list[int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
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


def clusters(table: Table, threshold: float) -> np.ndarray:
    """Each row's cluster root: the first row (input order) of its exact or near-duplicate cluster."""
    _, first, inverse = np.unique(table.exact, return_index=True, return_inverse=True)
    parent = first[inverse.reshape(-1)].astype(np.int64)
    if table.near and table.n:
        reps = np.flatnonzero(parent == np.arange(table.n))
        for u, v in band_pairs(table, reps, both_parts()):
            compress(parent)
            todo = parent[u] != parent[v]
            u, v = u[todo], v[todo]
            match = table.similarity(u, v) >= threshold
            union(parent, u[match], v[match])
    compress(parent)
    return parent


def prompt_groups(table: Table) -> np.ndarray:
    """Each row's first row with the same normalised non-empty prompt (itself when its prompt is empty)."""
    keys = table.prompt
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    group = first[inverse.reshape(-1)].astype(np.int64)
    return np.where(keys == 0, np.arange(table.n), group)
