"""The training objective: summed cross-entropy over trained tokens, computed only where labels exist."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from sftlab.data.render import IGNORE_INDEX


def _base(model: torch.nn.Module) -> PreTrainedModel:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class TokenLoss(torch.nn.Module):
    """Wraps a causal LM; ``forward`` returns (sum of token losses, number of trained tokens).

    The sum (not the mean) is returned so the loop can divide by the trained tokens of the whole
    optimizer step. The output head is applied only at trained positions, never to the full
    ``[batch, seq, vocab]`` logits, when the model allows it (a decoder plus a plain linear head).
    Being a module, it is what accelerate wraps (DDP/FSDP hooks see this forward).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        base = _base(model)
        cfg = base.config
        plain_head = not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        self.selective = plain_head and hasattr(base, "get_decoder") and base.get_output_embeddings() is not None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask, labels: [batch, seq]. Returns (loss_sum fp32 scalar, n_tokens int64 scalar)."""
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        if self.selective:
            base = _base(self.model)
            hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = base.get_output_embeddings()(hidden[:, :-1][mask])
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask]
        loss_sum = F.cross_entropy(logits.float(), targets[mask], reduction="sum")
        return loss_sum, mask.sum()
