"""From encoded samples to model inputs: padded batches, padding-free (flat) batches, and packing bins.

Padded: ``[batch, longest]`` with an attention mask. Flat: every sample of the micro-batch laid end
to end in one row ``[1, total]`` with ``position_ids`` restarting at 0 per sample and
``cu_seq_lens`` (cumulative sample lengths) telling the attention where samples start, so no pad
token is computed and no token attends across a sample boundary. The first label of every sample is
masked in the flat row: in a padded row nothing predicts it either (the loss shifts by one).
"""

from __future__ import annotations

import bisect

import torch

from sftlab.data.render import IGNORE_INDEX


def collate(rows: dict[str, list[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids/attention_mask/labels, [batch, longest]; padding is never trained."""
    longest = max(len(ids) for ids in rows["input_ids"])
    ids = torch.full((len(rows["input_ids"]), longest), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"])):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_flat(rows: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
    """Concatenate a batch into one row: input_ids/labels/position_ids [1, total], cu_seq_lens [n + 1] (int32)."""
    lengths = [len(x) for x in rows["input_ids"]]
    ids = torch.tensor([t for x in rows["input_ids"] for t in x], dtype=torch.long)
    labels = torch.tensor([IGNORE_INDEX if j == 0 else t for y in rows["labels"] for j, t in enumerate(y)], dtype=torch.long)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return {"input_ids": ids[None], "labels": labels[None], "position_ids": positions[None], "cu_seq_lens": cu}


def best_fit_decreasing(lengths: list[int], capacity: int, order: list[int] | None = None) -> list[list[int]]:
    """Pack sample indices into bins of at most ``capacity`` tokens: longest first, each into the
    fullest bin that still has room (best fit). ``order`` breaks ties between equal lengths (the
    number of bins does not depend on it). Samples longer than ``capacity`` get a bin of their own.
    """
    order = list(range(len(lengths))) if order is None else order
    items = sorted(order, key=lambda i: -lengths[i])  # stable: ties keep ``order``
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i in items:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            room, b = capacity - n, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins
