"""The POST losses as pure functions of tensors. No model, trainer or data code lives here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_scores(logits: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Class score = mean label-word logit.

    logits: (B, V) vocabulary logits at the label position; index: (C, K) label-word token ids per class
    (padded); weight: (C, K) with 1/|V_c| on real entries and 0 on padding. Returns (B, C).
    """
    gathered = logits[:, index.reshape(-1)].reshape(logits.shape[0], *index.shape)
    return (gathered * weight.to(logits.dtype)).sum(-1)


def verbalizer_loss(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the class scores (the prompt-tuning loss of POST stage 2)."""
    return F.cross_entropy(class_scores(logits, index, weight).float(), labels, reduction=reduction)
