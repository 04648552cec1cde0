"""Class scores and classification losses of a (prompted) model, for single-token and multi-token label words.

A single-token verbalizer is scored from one label slot (`label_logits`, then the mean label-word logit): the
path every stage used before multi-token words existed, kept exactly. A verbalizer with a multi-token word scores
each word by its length-normalised log-probability under teacher forcing: every example is repeated once per label
word, the word's tokens are appended after the label slot, and one batched forward returns the logits at the
positions that predict them.
"""

from __future__ import annotations

import functools
from typing import Callable, Union

import torch
import torch.nn.functional as F
from peft import PeftModel

from .generation import answer_losses, append_answers
from .losses import continuation_log_probs, verbalizer_loss
from .modeling import is_masked_lm, label_logits, prompt_parameter
from .tasks import Verbalizer


def require_scorable(verbalizer: Verbalizer, model) -> None:
    """Raise `ValueError` when `model` cannot score `verbalizer`'s words: multi-token words need a causal LM (a
    masked LM's template holds one mask, so one token per word)."""
    if not verbalizer.is_single_token and is_masked_lm(model):
        long_words = [w for w, seq in zip(_words(verbalizer), verbalizer.word_token_ids) if len(seq) > 1]
        raise ValueError(
            f"Label words {long_words} are several tokens, which a masked LM cannot score from its one '{{mask}}' "
            "slot. Choose single-token words for a masked LM, or use a causal LM."
        )


def _words(verbalizer: Verbalizer) -> list[str]:
    return [w for words in verbalizer.label_words for w in dict.fromkeys(words)]


def append_continuations(input_ids: torch.Tensor, attention_mask: torch.Tensor, label_positions: torch.Tensor,
                         continuations: torch.Tensor, continuation_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every row followed by every continuation, for teacher-forced scoring in one forward.

    input_ids, attention_mask: (B, L), right- or left-padded; label_positions: (B,) the last real token of each row
    (the label slot); continuations, continuation_mask: (W, K) token ids and their real-token mask. Row ``b * W + w``
    of the result is row b with continuation w written right after its label slot (over right padding, or in K new
    columns). Returns ``input_ids`` and ``attention_mask`` (B·W, L + K), ``label_positions`` (B·W, K): the positions
    whose next-token logits predict the continuation's tokens (the label slot, then each token but the last), and
    ``targets`` / ``target_mask`` (B·W, K).
    """
    batch = input_ids.shape[0]
    words = continuations.shape[0]
    return append_answers(input_ids.repeat_interleave(words, dim=0), attention_mask.repeat_interleave(words, dim=0),
                          label_positions.repeat_interleave(words), continuations.repeat(batch, 1),
                          continuation_mask.repeat(batch, 1))


def _expand_prompt(model, prompt, repeats: int):
    if isinstance(prompt, str):
        if prompt != "auto":
            raise ValueError(f"`prompt` must be 'auto', None or a tensor, got {prompt!r}.")
        return prompt_parameter(model) if isinstance(model, PeftModel) else None
    if prompt is not None and prompt.dim() == 3:
        # Per-example copies (DP): each example's W rows share its copy, so its gradient lands in that copy only.
        return prompt.repeat_interleave(repeats, dim=0)
    return prompt


def word_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_positions: torch.Tensor,
                   verbalizer: Verbalizer, prompt: Union[torch.Tensor, None, str] = "auto") -> torch.Tensor:
    """(B, W) length-normalised log-probability of each label word (`verbalizer.word_token_ids`) after each row's
    label slot, from one teacher-forced forward over B·W rows. ``prompt`` as in `label_logits`."""
    batch = input_ids.shape[0]
    words = verbalizer.continuations.shape[0]
    expanded = append_continuations(input_ids, attention_mask, label_positions, verbalizer.continuations,
                                    verbalizer.continuation_mask)
    logits = label_logits(model, expanded["input_ids"], expanded["attention_mask"], expanded["label_positions"],
                          prompt=_expand_prompt(model, prompt, words))
    targets, target_mask = expanded["targets"].to(logits.device), expanded["target_mask"].to(logits.device)
    return continuation_log_probs(logits, targets, target_mask).view(batch, words)


def class_scores_of(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_positions: torch.Tensor,
                    verbalizer: Verbalizer, prompt: Union[torch.Tensor, None, str] = "auto",
                    **_: object) -> torch.Tensor:
    """(B, C) class scores, float32 at least: the mean label-word logit at the label slot for a single-token
    verbalizer (exactly as before multi-token words), the mean over a class's words of their length-normalised
    log-probability otherwise. ``prompt`` as in `label_logits`; extra batch keys (labels) are ignored."""
    require_scorable(verbalizer, model)
    if verbalizer.is_single_token:
        return verbalizer.class_scores(label_logits(model, input_ids, attention_mask, label_positions, prompt=prompt))
    word_scores = word_log_probs(model, input_ids, attention_mask, label_positions, verbalizer, prompt)
    return word_scores @ verbalizer.word_to_class.to(device=word_scores.device, dtype=word_scores.dtype)


def classification_losses(model, batch: dict, verbalizer: Verbalizer,
                          prompt: Union[torch.Tensor, None, str] = "auto") -> torch.Tensor:
    """(B,) cross-entropy of each example's class scores against ``batch["labels"]``, in float32: the prompt-tuning
    loss of POST stage 2 (the single-token path is `verbalizer_loss` over the label-slot logits, unchanged)."""
    keys = (batch["input_ids"], batch["attention_mask"], batch["label_positions"])
    if verbalizer.is_single_token:
        require_scorable(verbalizer, model)
        logits = label_logits(model, *keys, prompt=prompt)
        index, weight = verbalizer.index.to(logits.device), verbalizer.weight.to(logits.device)
        return verbalizer_loss(logits, batch["labels"].to(logits.device), index, weight, reduction="none")
    scores = class_scores_of(model, *keys, verbalizer, prompt=prompt)
    return F.cross_entropy(scores.float(), batch["labels"].to(scores.device), reduction="none")


def example_losses(config, tokenizer) -> Callable:
    """The per-example training loss of `config`'s task, as ``losses(model, batch, prompt="auto") -> (B,)``: the
    class cross-entropy (`classification_losses`, with the task's verbalizer) or, for ``task_kind="generation"``, the
    answer tokens' mean cross-entropy (`peft_post.generation.answer_losses`)."""
    if config.task_kind == "generation":
        return answer_losses
    return functools.partial(classification_losses, verbalizer=Verbalizer.from_config(config, tokenizer))
