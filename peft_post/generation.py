"""The generation task kind: a template with ``{text}`` followed by a free-form answer.

Training (prompt tuning, DP prompt tuning, the POST transfer) scores answers under teacher forcing: each row is the
rendered template followed by its answer tokens (and EOS), and `label_logits` returns the logits at the positions
that predict them. Evaluation generates greedily through PEFT's ``generate`` and scores the answers with exact match
and token F1 (shipped `evaluate` modules, which load offline).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .losses import continuation_log_probs
from .modeling import input_device, label_logits
from .tasks import TaskTemplate, VerbalizerCollator, check_text_dataset



def answer_token_ids(tokenizer, answer: str, max_answer_tokens: int, append_eos: bool = True) -> list[int]:
    """The tokens of ``" " + answer`` (it follows the template's last token, as a label word does), cut to
    `max_answer_tokens` - 1, then EOS (when the tokenizer has one and ``append_eos``): what the model learns to say,
    and to stop after."""
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"An answer must be a non-empty string, got {answer!r}.")
    ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if append_eos else None
    keep = max_answer_tokens - (eos is not None)
    return ids[: max(keep, 1)] + ([eos] if eos is not None else [])


def append_answers(input_ids: torch.Tensor, attention_mask: torch.Tensor, label_positions: torch.Tensor,
                   answers: torch.Tensor, answer_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row b followed by its answer ``answers[b]`` right after its label slot (its last real token), for
    teacher-forced scoring.

    input_ids, attention_mask: (B, L), right- or left-padded; label_positions: (B,); answers, answer_mask: (B, K).
    Returns ``input_ids`` / ``attention_mask`` (B, L + K), ``label_positions`` (B, K): the positions whose
    next-token logits predict answer token j (the label slot, then each answer token but the last), and ``targets``
    / ``target_mask`` (B, K).
    """
    batch, k = answers.shape
    device = input_ids.device
    answers, answer_mask = answers.to(device), answer_mask.to(device=device, dtype=torch.bool)
    ids = torch.cat([input_ids, input_ids.new_zeros(batch, k)], dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_zeros(batch, k)], dim=1)
    positions = label_positions.to(device).unsqueeze(1) + torch.arange(k, device=device)
    rows = torch.arange(batch, device=device).unsqueeze(1).expand_as(positions)
    # Answer token j sits at slot + 1 + j; the padded tail of a short answer stays padding, masked out.
    written = positions + 1
    ids[rows[answer_mask], written[answer_mask]] = answers[answer_mask]
    mask[rows[answer_mask], written[answer_mask]] = 1
    return {"input_ids": ids, "attention_mask": mask, "label_positions": positions, "targets": answers,
            "target_mask": answer_mask}


def pad_answers(answers: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) token ids padded with 0 and their (B, K) real-token mask."""
    width = max(len(a) for a in answers)
    ids = torch.zeros(len(answers), width, dtype=torch.long)
    mask = torch.zeros(len(answers), width, dtype=torch.bool)
    for i, a in enumerate(answers):
        ids[i, : len(a)] = torch.tensor(list(a), dtype=torch.long)
        mask[i, : len(a)] = True
    return ids, mask


@dataclass
class AnswerCollator:
    """Tokenizes rows through the template and appends each row's answer, for `answer_losses`.

    Returns ``input_ids`` / ``attention_mask`` (template + answer, right-padded), ``label_positions`` (B, K), ``targets``
    and ``target_mask`` (B, K), as `append_answers` builds them. The answer comes from ``answer_column`` (text) or,
    when a row holds ``answer_ids`` (token ids, e.g. a source model's own greedy answer), from those.
    """

    template: TaskTemplate
    text_column: str = "text"
    answer_column: str = "answer"
    max_answer_tokens: int = 16

    def __post_init__(self):
        self.prompts([{self.text_column: "x"}])  # the tokenizer pads (or says why not) before any work

    def prompts(self, rows: list[dict[str, Any]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """The rendered templates alone (no answer), padded: the inputs of generation (left) or of `append_answers`."""
        return VerbalizerCollator(self.template, self.text_column, None, padding_side)(rows)

    def answers_of(self, rows: list[dict[str, Any]]) -> list[list[int]]:
        tok = self.template.tokenizer
        return [list(row["answer_ids"]) if "answer_ids" in row else
                answer_token_ids(tok, row[self.answer_column], self.max_answer_tokens) for row in rows]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.prompts(rows)
        answers, answer_mask = pad_answers(self.answers_of(rows))
        return append_answers(batch["input_ids"], batch["attention_mask"], batch["label_positions"], answers,
                              answer_mask)


def answer_logits(model, batch: dict, prompt: Union[torch.Tensor, None, str] = "auto") -> torch.Tensor:
    """(B, K, V) logits at the positions that predict each row's answer tokens (an `AnswerCollator` batch)."""
    return label_logits(model, batch["input_ids"], batch["attention_mask"], batch["label_positions"], prompt=prompt)


def answer_losses(model, batch: dict, prompt: Union[torch.Tensor, None, str] = "auto") -> torch.Tensor:
    """(B,) mean token cross-entropy of each row's answer tokens (only those: the template and text carry no loss),
    in float32 at least. Per example, so DP clips each example's whole-sequence gradient."""
    logits = answer_logits(model, batch, prompt)
    targets, mask = batch["targets"].to(logits.device), batch["target_mask"].to(logits.device)
    return -continuation_log_probs(logits, targets, mask)


def check_generation_dataset(dataset, text_column: str, answer_column: Optional[str], name: str) -> None:
    """Raise `ValueError` before any work when a dataset is empty, lacks its columns, or holds empty answers."""
    columns = check_text_dataset(dataset, text_column, name)
    if answer_column is None:
        return
    if answer_column not in columns:
        raise ValueError(f"`{name}` has no answer column {answer_column!r} (columns: {columns}); set "
                         "`answer_column`.")
    bad = [i for i, a in enumerate(dataset[answer_column]) if not isinstance(a, str) or not a.strip()]
    if bad:
        raise ValueError(f"`{name}` has {len(bad)} empty or non-string answer(s) in column {answer_column!r} (first at "
                         f"row {bad[0]}); every example needs an answer text.")


# ---- greedy generation and its scores ----


def cut_answer(text: str) -> str:
    """A generated continuation up to its first line break: the answer the template asks for (a model that does not
    stop at EOS goes on with the next line)."""
    return text.strip().split("\n", 1)[0].strip()


@torch.no_grad()
def generate_answers(model, tokenizer, texts: Sequence[str], template: TaskTemplate, *, max_new_tokens: int = 16,
                     batch_size: int = 32, prompt: Union[torch.Tensor, None, str] = "auto", desc: str = "generate",
                     disable_progress: bool = True) -> list[list[int]]:
    """Greedy answers (token ids, without EOS) of `model` to each text rendered through `template`.

    ``prompt`` as in `label_logits`: "auto" (a `PeftModel`'s own prompt), None (unprompted: zero-shot) or an explicit
    (n, d) prompt. Each step runs the training forward (`label_logits`: the prompt prepended, positions counted over
    real tokens) on the texts and the tokens generated so far and appends the argmax, so a greedy answer is exactly
    the argmax of the forward the prompt was trained with. PEFT's prompt-tuning ``generate`` is not used: it drops
    position ids, and on GPT-2 under transformers 5 its second token already differs from that forward's argmax
    (`tests/test_generation.py`). Without a KV cache a step costs one forward over the whole row: cheap for the
    short answers this is for. Eval mode (restored after), batches of similar length, on the device of the model's
    input embeddings.
    """
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    encoded = [template.encode(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    answers: list[list[int]] = [[] for _ in texts]
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=disable_progress, leave=False):
            idx = order[start: start + batch_size]
            lengths = torch.tensor([len(encoded[i]) for i in idx], device=device)
            ids = torch.full((len(idx), int(lengths.max()) + max_new_tokens), pad, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i], device=device)
                mask[row, : len(encoded[i])] = 1
            rows = torch.arange(len(idx), device=device)
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                width = int(lengths.max()) + step
                logits = label_logits(model, ids[:, :width], mask[:, :width], lengths + step - 1, prompt=prompt)
                token = logits.argmax(-1).to(device)
                done |= token == eos if eos is not None else torch.zeros_like(done)
                ids[rows, lengths + step] = token
                mask[rows, lengths + step] = 1
                for row in (~done).nonzero().flatten().tolist():
                    answers[idx[row]].append(int(token[row]))
                if bool(done.all()):
                    break
    finally:
        model.train(was_training)
    return answers


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 between two normalised answers (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_report(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Exact match and token F1 (the shipped `evaluate` module ``answer_match``, means over examples), the per-example exact-match
    bits ("1011...", in the examples' order, for the paired bootstrap) and the predictions."""
    from .evaluation import shared_metric

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    if not predictions:
        raise ValueError("No predictions to score.")
    predictions, references = [cut_answer(p) for p in predictions], [r.strip() for r in references]
    scores = shared_metric("answer_match").compute(predictions=predictions, references=references)
    return {
        "exact_match": scores["exact_match"],
        "token_f1": scores["token_f1"],
        "num_examples": len(predictions),
        "per_example_correct": "".join("1" if normalize_answer(p) == normalize_answer(r) else "0"
                                       for p, r in zip(predictions, references)),
        "predictions": predictions,
    }


def evaluate_generation(model, tokenizer, dataset, config, *, text_column: str = "text",
                        answer_column: str = "answer", use_prompt: bool = True, batch_size: int = 32,
                        desc: str = "generate", disable_progress: bool = True) -> dict:
    """`generation_report` of `model`'s greedy answers (`generate_answers`, at most ``config.max_answer_tokens``
    new tokens) to `dataset`'s texts against its answers; ``use_prompt=False`` scores a `PeftModel`'s base model."""
    check_generation_dataset(dataset, text_column, answer_column, "dataset")
    template = TaskTemplate.from_config(config, tokenizer)
    answers = generate_answers(model, tokenizer, list(dataset[text_column]), template,
                               max_new_tokens=config.max_answer_tokens, batch_size=batch_size,
                               prompt="auto" if use_prompt else None, desc=desc, disable_progress=disable_progress)
    predictions = tokenizer.batch_decode(answers, skip_special_tokens=True)
    return generation_report(predictions, list(dataset[answer_column]))
