"""The POST losses as pure functions of tensors. No model, trainer or data code lives here."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    # Half-precision softmax over a 50k vocabulary loses the small probabilities the KL is made of.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def class_scores(logits: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Class score = mean label-word logit.

    logits: (B, V) vocabulary logits at the label position; index: (C, K) label-word token ids per class
    (padded); weight: (C, K) with 1/|V_c| on real entries and 0 on padding. Returns (B, C), in float32 at least
    (the mean of K low-precision logits would round again).
    """
    logits = _at_least_float32(logits)
    gathered = logits[:, index.reshape(-1)].reshape(logits.shape[0], *index.shape)
    return (gathered * weight.to(logits.dtype)).sum(-1)


def verbalizer_loss(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the class scores (the prompt-tuning loss of POST stage 2), in float32 whatever the logits'
    dtype."""
    return F.cross_entropy(class_scores(logits, index, weight).float(), labels, reduction=reduction)


def continuation_log_probs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised log-probability of each row's continuation under teacher forcing.

    logits: (N, K, V) vocabulary logits at the K positions that predict the continuation's tokens; targets: (N, K)
    the tokens; mask: (N, K) True on real tokens (at least one per row). Returns (N,) the mean over real tokens of
    log softmax(logits)[target], in float32 at least. A one-token continuation gives that token's log-probability.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(f"continuation_log_probs needs (N, K, V) logits with (N, K) targets and mask, got "
                         f"{tuple(logits.shape)}, {tuple(targets.shape)} and {tuple(mask.shape)}.")
    mask = mask.to(torch.bool)
    if not mask.any(-1).all():
        raise ValueError("Every continuation needs at least one real token in `mask`.")
    token_log_probs = F.log_softmax(_at_least_float32(logits), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # Masked positions may hold anything (padding predicted from padding): zeroed, not multiplied, so -inf stays out.
    token_log_probs = torch.where(mask, token_log_probs, torch.zeros_like(token_log_probs))
    return token_log_probs.sum(-1) / mask.sum(-1).to(token_log_probs.dtype)


# ---- Stage 1: distillation (DistilBERT recipe). `mask` is (B, L) bool: the non-padding positions to average over.


def _masked_rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, L, ...) -> (N, ...) rows at the mask's True positions (all positions when mask is None)."""
    if mask is None:
        return x.reshape(-1, *x.shape[2:])
    if mask.shape != x.shape[:2]:
        raise ValueError(f"`mask` must have shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}.")
    return x[mask.bool()]


def distillation_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), summed over the vocabulary and averaged over the masked positions."""
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    s = _masked_rows(student_logits, mask).float() / temperature
    t = _masked_rows(teacher_logits, mask).float() / temperature
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=-1))).sum(-1)
    return kl.mean() * temperature**2


def topk_distillation_kl_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor,
                              teacher_indices: torch.Tensor, temperature: float = 2.0,
                              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`distillation_kl_loss` against a teacher known only by its top-k logits (values, indices: (B, L, k)).

    The teacher distribution is the softmax of its k largest logits, renormalised over those k tokens (the tail
    mass is dropped); the student keeps its full-vocabulary softmax. Exact when the teacher's tail mass is zero.
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    s = _masked_rows(student_logits, mask).float() / temperature
    values = _masked_rows(teacher_values, mask).float() / temperature
    indices = _masked_rows(teacher_indices, mask).long()
    log_p_t = F.log_softmax(values, dim=-1)
    log_q = F.log_softmax(s, dim=-1).gather(-1, indices)
    return (log_p_t.exp() * (log_p_t - log_q)).sum(-1).mean() * temperature**2


def cosine_hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over masked positions of 1 − cos(h_t, h_s) between last hidden states (B, L, d)."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"Student and teacher hidden states must have the same shape (same hidden size), got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}."
        )
    s = _masked_rows(student_hidden, mask).float()
    t = _masked_rows(teacher_hidden, mask).float()
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Token cross-entropy, mean over labels != -100. ``causal``: position i predicts labels[i + 1] (CLM);
    otherwise each position predicts its own label (MLM: only masked positions carry one)."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                      mask: torch.Tensor, *, causal: bool, alpha_ce: float = 5.0, alpha_lm: float = 2.0,
                      alpha_cos: float = 1.0, temperature: float = 2.0,
                      student_hidden: Optional[torch.Tensor] = None, teacher_hidden: Optional[torch.Tensor] = None,
                      teacher_topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                      alpha_label_slot: float = 0.0, label_slot_mask: Optional[torch.Tensor] = None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """α_ce·T²·KL + α_lm·LM + α_cos·(1 − cos) + α_label_slot·T²·KL_slot: the stage-1 loss. Terms with weight 0 are
    not computed.

    The KL terms take either full ``teacher_logits`` or ``teacher_topk=(values, indices)``. KL_slot is the same KL
    averaged over the ``label_slot_mask`` positions only (the label slots of templated texts); it is 0 for a batch
    without any. Returns the total and the detached unweighted terms ({"kl", "lm", "cos", "label_slot"}) for logging.
    """
    total = student_logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, torch.Tensor] = {}

    def kl_at(positions):
        if teacher_topk is not None:
            return topk_distillation_kl_loss(student_logits, *teacher_topk, temperature=temperature, mask=positions)
        if teacher_logits is not None:
            return distillation_kl_loss(student_logits, teacher_logits, temperature, positions)
        raise ValueError("alpha_ce > 0 or alpha_label_slot > 0 needs `teacher_logits` or `teacher_topk`.")

    if alpha_ce:
        kl = kl_at(mask)
        total = total + alpha_ce * kl
        parts["kl"] = kl.detach()
    if alpha_label_slot:
        if label_slot_mask is None:
            raise ValueError("alpha_label_slot > 0 needs `label_slot_mask`.")
        slots = label_slot_mask.bool() if mask is None else label_slot_mask.bool() & mask.bool()
        slot_kl = kl_at(slots) if slots.any() else total.new_zeros(())
        total = total + alpha_label_slot * slot_kl
        parts["label_slot"] = slot_kl.detach()
    if alpha_lm:
        lm = lm_loss(student_logits, labels, causal)
        total = total + alpha_lm * lm
        parts["lm"] = lm.detach()
    if alpha_cos:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError("alpha_cos > 0 needs `student_hidden` and `teacher_hidden`.")
        cos = cosine_hidden_loss(student_hidden, teacher_hidden, mask)
        total = total + alpha_cos * cos
        parts["cos"] = cos.detach()
    return total, parts


def temperature_kl(student_logits: torch.Tensor, reference_logits: torch.Tensor, temperature: float = 2.0,
                   reduction: str = "mean") -> torch.Tensor:
    """KL_T(u, v) = T² · KL(softmax(v/T) ‖ softmax(u/T)) over the last dimension, `v` the reference (POST Eq. 3).

    Both softmaxes run over the same last dimension, so on a restricted token set (a gathered (B, M) slice) this
    is the KL of the two distributions renormalised over that set. reduction: "mean" (over the batch), "sum" or
    "none" (one value per row).
    """
    if student_logits.shape != reference_logits.shape:
        raise ValueError(
            f"student and reference logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(reference_logits.shape)}."
        )
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
    log_q = F.log_softmax(_at_least_float32(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(_at_least_float32(reference_logits) / temperature, dim=-1)
    p = log_p.exp()
    # A token the reference gives zero mass (a -inf logit) contributes 0, not 0 * inf = nan.
    per_row = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1) * temperature**2
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    if reduction == "none":
        return per_row
    raise ValueError(f"`reduction` must be 'mean', 'sum' or 'none', got {reduction!r}.")


def transfer_loss(target_logits: torch.Tensor, target_base_logits: torch.Tensor, source_logits: torch.Tensor,
                  source_base_logits: torch.Tensor, alpha: float, temperature: float = 2.0) -> torch.Tensor:
    """The POST transfer loss (paper Eqs. 3-5), a scalar averaged over the batch:

        (1 − α)·KL_T(a_t, a_s) + α·KL_T(a_t − b_t, a_s − b_s)

    with a_t = `target_logits` (prompted target, the only input that carries gradient in training), b_t =
    `target_base_logits` (unprompted target), a_s / b_s the prompted / unprompted source, all (B, V) logits at
    the label slot. The source side is the reference distribution of both terms. α = 0 only mimics the prompted
    source; α = 1 only transfers the change the source prompt makes.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}.")
    shapes = {tuple(t.shape) for t in (target_logits, target_base_logits, source_logits, source_base_logits)}
    if len(shapes) != 1 or target_logits.dim() != 2:
        raise ValueError(
            "transfer_loss needs four (B, V) tensors of one shape (target, target base, source, source base), got "
            f"{[tuple(t.shape) for t in (target_logits, target_base_logits, source_logits, source_base_logits)]}."
        )
    # In fp32 from the start: the differences a − b of the direction term would round in bf16 before any softmax.
    target_logits, target_base_logits, source_logits, source_base_logits = (
        _at_least_float32(t) for t in (target_logits, target_base_logits, source_logits, source_base_logits))
    # Skipping a term with zero weight is not only faster: 0 * inf (a -inf logit) would turn the loss into nan.
    loss = target_logits.new_zeros(())
    if alpha < 1:
        loss = loss + (1 - alpha) * temperature_kl(target_logits, source_logits, temperature)
    if alpha > 0:
        loss = loss + alpha * temperature_kl(target_logits - target_base_logits, source_logits - source_base_logits,
                                             temperature)
    return loss
