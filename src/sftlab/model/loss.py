"""The training objective: summed cross-entropy over trained tokens, computed only where labels exist."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from sftlab.data.render import IGNORE_INDEX

LOGITS_PER_CHUNK = 2**25  # logits held at once by the chunked loss (128 MiB in fp32): rows = this ÷ vocab


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model itself (inside a PEFT wrapper, its base)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(t.device.type) if torch.is_autocast_enabled(t.device.type) else t.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i · weightᵀ, target_i), computed ``chunk`` rows at a time.

    The gradients are computed in the forward pass, chunk by chunk, so at most one chunk of
    logits ever exists (in fp32) and nothing of size ``[tokens, vocab]`` is kept for backward —
    the fused linear cross-entropy of Liger/torchtune, in plain PyTorch. The matmuls run in the
    autocast dtype when autocast is on, like the ``nn.Linear`` they replace.

    A second output (no gradient) carries two by-products of the same logits: how many targets
    are the argmax (token accuracy) and the summed entropy of the predicted distributions.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        dtype = _matmul_dtype(hidden)
        w = weight.to(dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 at least
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        stats = torch.zeros(2, dtype=acc, device=hidden.device)  # [targets that are the argmax, summed entropy]
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(dtype)
                logits = (h @ w.T).to(acc)
                lse = torch.logsumexp(logits, dim=-1)
                t = targets[s : s + chunk]
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                stats[0] += (logits.argmax(-1) == t).sum()
                logits.sub_(lse[:, None])  # log-probabilities, in place of the logits
                if not need_h:  # no gradient to take the entropy from (evaluation): one more pass over the vocabulary
                    stats[1] += entropy_sum(logits)
                if need_h or need_w:
                    d = torch.exp_(logits)  # softmax, in place
                    d[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    d = d.to(dtype)
                    if need_h:
                        g = d @ w
                        grad_h[s : s + chunk] = g
                        # entropy = lse − Σ p·z, and Σ p·z = h·(p @ W) = h·(g + w[t]): nearly free, from the gradient
                        stats[1] += (lse - (h.to(acc) * (g.to(acc) + w[t].to(acc))).sum(-1)).sum()
                    if need_w:
                        grad_w += (d.T @ h).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, grad_stats: torch.Tensor | None = None):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def entropy_sum(log_probs: torch.Tensor) -> torch.Tensor:
    """Σ over rows of −Σ p·log p, an eighth of the rows at a time (no second full-size tensor)."""
    rows = max(1, log_probs.shape[0] // 8)
    total = torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)
    for r in range(0, log_probs.shape[0], rows):
        lp = log_probs[r : r + rows]
        total -= (lp.exp() * lp).sum()
    return total


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``hidden [n, d] @ weight[vocab, d]ᵀ`` against ``targets [n]``, chunked;
    and (no gradient) [targets that are the argmax, summed entropy of the predictions]."""
    chunk = chunk or max(64, LOGITS_PER_CHUNK // weight.shape[0])
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)


class TokenLoss(torch.nn.Module):
    """Wraps a causal LM; ``forward`` returns (sum of token losses, number of trained tokens, stats),
    stats = [trained tokens predicted right (argmax), summed prediction entropy] (no gradient).

    The sum (not the mean) is returned so the loop can divide by the trained tokens of the whole
    optimizer step. The decoder runs on the whole batch; the output head only at trained positions,
    in chunks (``linear_cross_entropy``), never as full ``[batch, seq, vocab]`` logits — when the
    model allows it (a decoder plus a plain linear head without bias or logit scaling).
    Being a module, it is what accelerate wraps (DDP/FSDP hooks see this forward).

    Batches are padded (``attention_mask``) or flat (one row, ``position_ids`` restarting per
    sample and ``cu_seq_lens``: see ``sftlab.data.batching``).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        base = base_model(model)
        cfg = base.config
        head = base.get_output_embeddings()
        plain_head = not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        self.selective = (plain_head and hasattr(base, "get_decoder") and isinstance(head, torch.nn.Linear)
                          and head.bias is None)

    def head_weight(self) -> torch.Tensor:
        return base_model(self.model).get_output_embeddings().weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, labels (and attention_mask or position_ids): [batch, seq].
        Returns (loss_sum fp32 scalar, n_tokens int64 scalar, stats fp32 [correct, entropy_sum])."""
        inputs: dict = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if cu_seq_lens is not None:
            longest = int(cu_seq_lens.diff().max())
            # All ones: transformers builds no mask (attention is split by cu_seq_lens instead).
            inputs.update(attention_mask=torch.ones_like(input_ids), cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
                          max_length_q=longest, max_length_k=longest)
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        if self.selective:
            base = base_model(self.model)
            hidden = base.get_decoder()(**inputs).last_hidden_state
            loss_sum, stats = linear_cross_entropy(hidden[:, :-1][mask], self.head_weight(), targets[mask])
        else:
            logits = self.model(**inputs).logits[:, :-1][mask].float()
            loss_sum = F.cross_entropy(logits, targets[mask], reduction="sum")
            with torch.no_grad():
                stats = torch.stack([(logits.argmax(-1) == targets[mask]).sum().float(), entropy_sum(logits.log_softmax(-1))])
        return loss_sum, mask.sum(), stats
