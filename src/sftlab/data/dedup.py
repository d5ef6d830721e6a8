"""Duplicates and conflicting answers (``sftlab data dedup``), on the near-duplicate engine (``near_dup``).

- Duplicates: every exact or near-duplicate cluster keeps its first sample, in input order; the others
  are removed and listed with the sample they duplicate.
- Conflicts: kept samples (so their answers are not duplicates of each other) with the same normalised
  non-empty prompt, and, with near-duplicate search on, with a near-same prompt: the same system
  prompt, prompt similarity >= ``conflict_threshold`` (0.9), not identical. They are listed for review,
  not removed. Near-same prompts are grouped around an anchor, never chained: a sample joins the group
  of the first earlier sample whose prompt it is near (LSH over the prompt signature alone), so prompts
  built from one long template cannot pull a whole dataset into one "conflict" through a chain of
  small differences.

Rows are read twice (find, then write) and never held; the output files appear together, only when complete.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

import numpy as np

from sftlab.data import near_dup
from sftlab.data.sources import Source, source_files
from sftlab.errors import SftlabError
from sftlab.files import check_outputs

CONFLICT_THRESHOLD = 0.9
# Near-same prompts differ by a word or two, so in at most this many shingles (a changed word of w characters
# changes about 2(w + 4)): a long template with a varying sentence has similar prompts that ask different things.
MAX_PROMPT_DIFFERENCE = 40


# ---------------------------------------------------------------- writing (dedup's and split's)


def sidecar(out: Path, suffix: str) -> Path:
    """``out``'s companion file: data/clean.jsonl, ".removed.jsonl" → data/clean.removed.jsonl."""
    return out.with_name(out.stem + suffix)


@contextmanager
def atomic_files(*paths: Path) -> Iterator[list[TextIO]]:
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


def json_line(value: object) -> str:
    """``value`` as one JSON Lines line; what JSON cannot hold is written as its str."""
    return json.dumps(value, ensure_ascii=False, default=str) + "\n"


def dedup_outputs(out: Path) -> list[Path]:
    """What ``dedup`` and its report write for ``out``: the kept rows, the removed and conflict lists, the page, its plot."""
    return [out, *(sidecar(out, s) for s in (".removed.jsonl", ".conflicts.jsonl", ".report.html", ".cluster_sizes.png"))]


def two_passes(on_bytes: Callable[[int], None] | None) -> Callable[[int], None] | None:
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
          on_bytes: Callable[[int], None] | None = None, conflict_threshold: float = CONFLICT_THRESHOLD, force: bool = False) -> DedupResult:
    """Write ``out`` (JSONL: the raw rows kept, in input order), ``<stem>.removed.jsonl`` (ref, kind, duplicate_of,
    similarity) and ``<stem>.conflicts.jsonl`` (match "same" or "near", prompt, n_samples, samples: ref, answer, and
    for "near" each sample's prompt and its similarity to the first), all atomically. ``near=False``: exact duplicates
    and same-prompt conflicts only; ``conflict_threshold=1``: no near-same prompt groups. ``on_bytes`` gets the
    progress of both reads, halved.

    Raises SftlabError for a threshold outside (0, 1], an output (report included) that is an input or, unless ``force``,
    exists already, or a row that cannot be read.
    """
    for name, value, usual in (("threshold", threshold, "0.8 is usual, higher removes less"),
                               ("conflict threshold", conflict_threshold, "0.9 is usual; 1 lists identical prompts only")):
        if not 0 < value <= 1:
            raise SftlabError(f"{name} {value}: must be in (0, 1]; {usual}")
    if out.suffix not in (".jsonl", ".json"):
        raise SftlabError(f"{out}: the output is JSON Lines; name it .jsonl")
    removed_path, conflicts_path = sidecar(out, ".removed.jsonl"), sidecar(out, ".conflicts.jsonl")
    check_outputs(dedup_outputs(out), source_files(sources), force)
    progress = two_passes(on_bytes)
    table = near_dup.read(sources, near, progress)
    n = table.n
    root = near_dup.clusters(table, threshold)
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

    with atomic_files(out, removed_path, conflicts_path) as (kept_file, removed_file, conflicts_file):
        texts, conflicts = _write_kept(sources, progress, kind == 0, {i for m in largest.values() for i in m},
                                       groups, kept_file, conflicts_file)
        for i in np.flatnonzero(kind > 0).tolist():
            removed_file.write(json_line({"ref": table.refs[i], "kind": _MEMBER_KINDS[kind[i]],
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
            for i, (row, spec) in enumerate(near_dup.rows(sources, on_bytes)):
                if kept[i]:
                    kept_file.write(json_line(row.value))
                if i in wanted:
                    s = near_dup.sample(row, spec)
                    texts[i] = _clip(f"{s.prompt}\n→ {s.answer}", 600)
                if slot[i] >= 0:
                    s = near_dup.sample(row, spec)
                    offsets[slot[i]] = records.tell()
                    record = json_line({"ref": row.ref, "prompt": s.prompt, "answer": s.answer})
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


def _near_prompt_groups(table: near_dup.Table, kept: np.ndarray, conflict_threshold: float, threshold: float) -> _Groups:
    """Kept rows whose prompt is near-same (similarity >= ``conflict_threshold``, not identical; the same system prompt
    and numbers; at most ``MAX_PROMPT_DIFFERENCE`` shingles different) as an earlier kept row's, and whose answers are not near-duplicates (< ``threshold``; a lower --threshold already merged
    such pairs), grouped around their anchor: the first such earlier row found (LSH over prompt signatures).
    Each distinct prompt takes part through its first row; its other rows are in its same-prompt group."""
    n = table.n
    anchor, similarity = np.full(n, n, np.int64), np.zeros(n)
    candidates = np.flatnonzero(kept & (table.prompt != 0))
    ids = np.sort(candidates[np.unique(table.prompt[candidates], return_index=True)[1]])  # each prompt once (its first row)
    for u, v in near_dup.band_pairs(table, ids, near_dup.prompt_only()):
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
        out.write(json_line({"match": "near" if near else "same", "prompt": samples[0]["prompt"], "n_samples": hi - lo,
                              "samples": [{k: s[k] for k in keys} for s in samples]}))
        if g < preview:
            shown.append(Conflict(near, _clip(samples[0]["prompt"], 600), hi - lo,
                                  [ConflictSample(s["ref"], _clip(s["prompt"], 600), _clip(s["answer"], 300), s["similarity"])
                                   for s in samples[:8]]))
    return shown
