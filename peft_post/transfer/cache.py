"""The frozen side of the POST transfer loss, computed once per public example.

Φ_s, p_s and Φ_t are frozen during transfer, so of the four label-slot logits of the loss only a_t = z_t(p_t ⊕ x)
changes: a_s = z_s(p_s ⊕ x), b_s = z_s(x) and b_t = z_t(x) are computed here once and looked up by example index,
which turns the reference code's four forwards per step into one prompted forward + backward of the target.

Storage is the full vocabulary by default (exact). With ``top_k`` each example keeps a fixed-size token set S
(see `select_support`) and only the logits on S; the loss then compares distributions renormalised over S.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..modeling import base_model_of, label_logits


def _device_of(model) -> torch.device:
    return base_model_of(model).get_input_embeddings().weight.device


@torch.no_grad()
def frozen_logits(source_model, target_model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_s, b_s, b_t): prompted source, plain source and plain target label logits of a collated batch.

    The three no-grad forwards of the uncached path and of cache building; the results lie on the target's device.
    """
    keys = ("input_ids", "attention_mask", "label_positions")
    src_dev, tgt_dev = _device_of(source_model), _device_of(target_model)
    src = {k: batch[k].to(src_dev) for k in keys}
    tgt = {k: batch[k].to(tgt_dev) for k in keys}
    a_s = label_logits(source_model, **src, prompt="auto").to(tgt_dev)
    b_s = label_logits(source_model, **src, prompt=None).to(tgt_dev)
    b_t = label_logits(target_model, **tgt, prompt=None)
    return a_s, b_s, b_t


def support_size(vocab_size: int, top_k: int, num_label_tokens: int) -> int:
    return min(vocab_size, 2 * top_k + num_label_tokens)


def select_support(
    source_logits: torch.Tensor, source_base_logits: torch.Tensor, label_token_ids: Sequence[int], top_k: int
) -> torch.Tensor:
    """The kept token set S of each row, as (B, M) ascending token ids with M = min(V, 2k + #label tokens).

    S = the label words ∪ the top-k tokens of a_s (the imitation term's reference mass) ∪ the top-k tokens of
    a_s − b_s (the direction term's reference mass, which can sit on tokens a_s alone ranks low), then filled up
    to M with the next-highest tokens of a_s so that every row has the same size. Ties break by token id.
    """
    batch, vocab = source_logits.shape
    label_ids = torch.as_tensor(list(label_token_ids), dtype=torch.long, device=source_logits.device)
    size = support_size(vocab, top_k, len(label_ids))
    if size == vocab:
        return torch.arange(vocab, device=source_logits.device).expand(batch, vocab).clone()
    k = min(top_k, vocab)
    keep = torch.zeros(batch, vocab, dtype=torch.bool, device=source_logits.device)
    keep[:, label_ids] = True
    keep.scatter_(1, source_logits.topk(k, dim=-1).indices, True)
    keep.scatter_(1, (source_logits - source_base_logits).topk(k, dim=-1).indices, True)
    order = source_logits.argsort(dim=-1, descending=True, stable=True)
    free = ~keep.gather(1, order)
    missing = size - keep.sum(-1, keepdim=True)
    fill = free & (free.long().cumsum(-1) <= missing)
    keep.scatter_(1, order, keep.gather(1, order) | fill)
    return keep.nonzero()[:, 1].reshape(batch, size)


@dataclass
class TransferCache:
    """Frozen label logits of every public example, indexed by example position.

    ``support`` is None for the full vocabulary; otherwise (N, M) token ids and every logits tensor is (N, M),
    holding the values at those ids.
    """

    source_logits: torch.Tensor
    source_base_logits: torch.Tensor
    target_base_logits: torch.Tensor
    support: Optional[torch.Tensor] = None
    top_k: Optional[int] = None

    def __len__(self) -> int:
        return self.source_logits.shape[0]

    @property
    def nbytes(self) -> int:
        tensors = [self.source_logits, self.source_base_logits, self.target_base_logits]
        if self.support is not None:
            tensors.append(self.support)
        return sum(t.numel() * t.element_size() for t in tensors)

    def lookup(self, example_index: torch.Tensor, device) -> dict[str, Optional[torch.Tensor]]:
        idx = example_index.to(self.source_logits.device)
        out = {
            "source_logits": self.source_logits[idx].to(device, non_blocking=True),
            "source_base_logits": self.source_base_logits[idx].to(device, non_blocking=True),
            "target_base_logits": self.target_base_logits[idx].to(device, non_blocking=True),
            "support": None,
        }
        if self.support is not None:
            out["support"] = self.support[idx].to(device, non_blocking=True)
        return out


def build_transfer_cache(
    source_model,
    target_model,
    dataloader,
    num_examples: int,
    label_token_ids: Sequence[int],
    top_k: Optional[int] = None,
    storage_device="cpu",
) -> TransferCache:
    """Run the three frozen forwards once over a dataloader of collated batches carrying ``example_index``.

    Both models are put in eval mode for the duration (dropout would make the "frozen" logits random) and restored.
    """
    modes = (source_model.training, target_model.training)
    source_model.eval()
    target_model.eval()
    parts: dict[str, Optional[torch.Tensor]] = {}
    seen = torch.zeros(num_examples, dtype=torch.bool)
    try:
        for batch in dataloader:
            a_s, b_s, b_t = frozen_logits(source_model, target_model, batch)
            support = select_support(a_s, b_s, label_token_ids, top_k) if top_k is not None else None
            if support is not None:
                a_s, b_s, b_t = (x.gather(1, support) for x in (a_s, b_s, b_t))
            idx = batch["example_index"].cpu()
            values = {"source_logits": a_s, "source_base_logits": b_s, "target_base_logits": b_t, "support": support}
            for name, value in values.items():
                if value is None:
                    parts[name] = None
                    continue
                if name not in parts:
                    parts[name] = torch.empty((num_examples, value.shape[1]), dtype=value.dtype, device=storage_device)
                parts[name][idx] = value.to(storage_device)
            seen[idx] = True
    finally:
        source_model.train(modes[0])
        target_model.train(modes[1])
    if not bool(seen.all()):
        raise ValueError(f"The cache dataloader skipped {int((~seen).sum())} of {num_examples} public examples.")
    return TransferCache(
        source_logits=parts["source_logits"],
        source_base_logits=parts["source_base_logits"],
        target_base_logits=parts["target_base_logits"],
        support=parts.get("support"),
        top_k=top_k,
    )
