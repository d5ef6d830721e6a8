"""Leak-free splits (``sftlab data split``) and leakage between two datasets (``sftlab data check --leakage``),
on the near-duplicate engine (``near_dup``): near-duplicates and samples with the same prompt never straddle splits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sftlab.data import near_dup
from sftlab.data.dedup import atomic_files, json_line, two_passes
from sftlab.data.rows import first_value, row_spec
from sftlab.data.sources import Source, read_dataset_info, source_files
from sftlab.errors import SftlabError
from sftlab.files import check_outputs


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
          on_bytes: Callable[[int], None] | None = None, force: bool = False) -> SplitResult:
    """Write ``out_dir``/train.jsonl, val.jsonl, test.jsonl (raw rows, input order; a split with fraction 0 is not
    written) and register them in ``out_dir``/dataset_info.json as ``<name>_train`` etc., ``<name>`` being the first
    source's file stem. Each near-duplicate cluster and each group of samples with the same prompt goes to one split,
    so nothing leaks; groups are assigned in a random order drawn from ``seed``, and val and test get as close to
    their fractions as whole groups allow (never over). Raises SftlabError for bad fractions, sources of different
    formats, a requested split left empty, a row that cannot be read, an output that is an input, or (unless ``force``)
    a split file or a dataset_info.json entry of the same name that exists already (other entries are kept).
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
    check_outputs([info_path], source_files(sources), force=True)  # updated, its other entries kept: only never an input
    check_outputs(files.values(), source_files(sources), force)
    info = _existing_info(info_path)
    names = {k: f"{name}_{k}" for k in files}
    if not force and (taken := [n for n in names.values() if n in info]):
        raise SftlabError(f"{info_path}: already names {', '.join(taken)}; pass --force to replace them, or split into another folder")

    progress = two_passes(on_bytes)
    table = near_dup.read(sources, True, progress)
    n = table.n
    root = near_dup.clusters(table, threshold)
    together = near_dup.prompt_groups(table)
    apart = np.flatnonzero(together != np.arange(n))
    near_dup.union(root, together[apart], apart)
    near_dup.compress(root)

    sizes = np.bincount(root, minlength=n)
    heads = np.flatnonzero(sizes)
    which, filled = _assign(sizes[heads].tolist(), [round(fractions[k] * n) for k in ("val", "test")], seed)
    for k, split_name in enumerate(SPLITS):
        if split_name in files and filled[k] == 0:
            raise SftlabError(f"--{split_name} {fractions[split_name]:g}: no group of samples fits in it ({n:,} samples in "
                              f"{len(heads):,} groups); use more data or a larger fraction")
    split_of = which[np.searchsorted(heads, root)]

    spec = specs[0]
    for k in files:
        entry = {"file_name": files[k].name, "formatting": spec.formatting, "columns": spec.columns}
        if spec.formatting in ("sharegpt", "openai"):
            entry["tags"] = spec.tags
        info[names[k]] = entry
    with atomic_files(*files.values(), info_path) as handles:
        out = {SPLITS.index(k): f for k, f in zip(files, handles)}
        for i, (row, _) in enumerate(near_dup.rows(sources, progress)):
            out[int(split_of[i])].write(json_line(row.value))
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


MAX_PAIRS = 500  # pairs a Leakage keeps
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
    table = near_dup.Table(near=True)
    table.add(sources_a, on_bytes)
    n_a = table.n
    table.add(sources_b, on_bytes)
    n_b = table.n - n_a
    b_rows = np.arange(n_a, table.n)

    partner = _first_match(table.exact[:n_a], table.exact[n_a:])
    kind = np.where(partner >= 0, 0, -1)
    similarity = np.where(partner >= 0, 1.0, 0.0)

    found_v, found_u, found_sim = [], [], []
    for u, v in near_dup.band_pairs(table, np.arange(table.n), near_dup.both_parts()):
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
