"""Classification as text infilling: templates, verbalizers, label positions and the collator."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .config import POSTConfig

MULTI_TOKEN_POLICIES = ("sequence", "first", "error")


class Verbalizer:
    """Maps each class to label words and scores classes.

    A word's tokens are those of ``" word"`` (with a leading space, as it follows the template's last token).

    - **Single-token verbalizer** (every word is one token): a class score is the mean logit of its words' tokens
      at the label slot (`class_scores`), from one forward whose head runs at that slot only.
    - **Multi-token words** (``multi_token="sequence"``, the default): a word's score is its length-normalised
      log-probability, the mean over its tokens of log p(token | text, earlier tokens of the word), scored with
      teacher forcing (`peft_post.scoring.class_scores_of`), and a class score is the mean over its words. A
      verbalizer that holds one multi-token word scores every word that way (log-probabilities, not logits, so
      that words of different lengths compare).
    - ``multi_token="first"`` keeps only a word's first token (with a warning); ``"error"`` refuses such words.

    Empty words, words that map to the unknown or a special token, and one token sequence shared by two classes
    raise `ValueError`. Two classes may share a first token only under ``"sequence"``.
    """

    def __init__(self, tokenizer, label_words: Sequence[Sequence[str]], multi_token: str = "sequence"):
        if multi_token not in MULTI_TOKEN_POLICIES:
            raise ValueError(f"`multi_token` must be one of {MULTI_TOKEN_POLICIES}, got {multi_token!r}.")
        if len(label_words) < 2:
            raise ValueError(f"`label_words` must list at least two classes, got {label_words!r}.")
        special = set(tokenizer.all_special_ids)
        self.label_words = [list(ws) for ws in label_words]
        self.token_ids: list[list[int]] = []
        # One entry per distinct word of each class: its tokens and its class.
        self.word_token_ids: list[list[int]] = []
        self.word_classes: list[int] = []
        owner: dict[tuple, int] = {}
        for c, words in enumerate(self.label_words):
            if not words:
                raise ValueError(f"`label_words[{c}]` is empty: every class needs at least one label word.")
            sequences = [self._word_tokens(tokenizer, word, c, special, multi_token) for word in words]
            for seq, w in zip(sequences, words):
                # Single-token verbalizers compare first tokens (their class score reads one slot); multi-token ones
                # compare whole sequences.
                key = tuple(seq) if multi_token == "sequence" else (seq[0],)
                if key in owner and owner[key] != c:
                    raise ValueError(
                        f"Label word {w!r} of class {c} maps to token(s) {list(key)}, already used by class "
                        f"{owner[key]}; classes need distinct label tokens."
                    )
                owner[key] = c
            for seq in dict.fromkeys(tuple(s) for s in sequences):
                self.word_token_ids.append(list(seq))
                self.word_classes.append(c)
            self.token_ids.append(list(dict.fromkeys(seq[0] for seq in sequences)))
        width = max(len(ids) for ids in self.token_ids)
        index = torch.zeros(len(self.token_ids), width, dtype=torch.long)
        weight = torch.zeros(len(self.token_ids), width)
        for c, ids in enumerate(self.token_ids):
            index[c, : len(ids)] = torch.tensor(ids)
            weight[c, : len(ids)] = 1.0 / len(ids)
        self.index, self.weight = index, weight
        longest = max(len(seq) for seq in self.word_token_ids)
        # (W, K) continuations padded with 0 and their mask, and the (W, C) averaging of word scores into classes.
        self.continuations = torch.zeros(len(self.word_token_ids), longest, dtype=torch.long)
        self.continuation_mask = torch.zeros(len(self.word_token_ids), longest, dtype=torch.bool)
        self.word_to_class = torch.zeros(len(self.word_token_ids), len(self.token_ids))
        for w, (seq, c) in enumerate(zip(self.word_token_ids, self.word_classes)):
            self.continuations[w, : len(seq)] = torch.tensor(seq)
            self.continuation_mask[w, : len(seq)] = True
            self.word_to_class[w, c] = 1.0 / self.word_classes.count(c)

    @staticmethod
    def _word_tokens(tokenizer, word: str, c: int, special: set, multi_token: str) -> list[int]:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"`label_words[{c}]` holds an empty word {word!r}.")
        ids = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"Label word {word!r} (class {c}) encodes to no token.")
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError(f"Label word {word!r} (class {c}) maps to the unknown token; choose a word in the vocabulary.")
        if any(i in special for i in ids):
            raise ValueError(f"Label word {word!r} (class {c}) maps to a special token ({ids}); choose another word.")
        if len(ids) > 1 and multi_token != "sequence":
            pieces = tokenizer.convert_ids_to_tokens(ids)
            msg = (
                f"Label word {word!r} (class {c}) is {len(ids)} tokens {pieces}, not one; its class score would use "
                f"only the first piece {pieces[0]!r}."
            )
            if multi_token == "error":
                raise ValueError(msg + " Choose a single-token word, or pass multi_token='sequence' to score all its "
                                 "tokens.")
            warnings.warn(msg)
            return ids[:1]
        return ids

    @classmethod
    def from_config(cls, config: POSTConfig, tokenizer, multi_token: str = "sequence") -> "Verbalizer":
        return cls(tokenizer, config.label_words, multi_token=multi_token)

    @property
    def num_classes(self) -> int:
        return len(self.token_ids)

    @property
    def is_single_token(self) -> bool:
        """Whether every label word is one token: then one label slot scores every class (`class_scores`)."""
        return self.continuations.shape[1] == 1

    @property
    def all_token_ids(self) -> list[int]:
        """The first tokens of every label word (what the label slot's distribution says about the classes)."""
        return sorted({i for ids in self.token_ids for i in ids})

    def class_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) class scores from (B, V) label-slot logits; single-token verbalizers only (for multi-token words
        use `peft_post.scoring.class_scores_of`, which runs the teacher-forced forward)."""
        from .losses import class_scores

        if not self.is_single_token:
            raise ValueError("This verbalizer has multi-token label words: one label slot's logits cannot score them. "
                             "Use peft_post.scoring.class_scores_of(model, batch, verbalizer).")
        return class_scores(logits, self.index.to(logits.device), self.weight.to(logits.device))


class TaskTemplate:
    """Renders ``template`` around a text and tokenizes it so the label slot survives ``max_length``.

    The whole rendered string is tokenized at once (so the tokens are exactly those of the full string) and,
    when too long, tokens lying wholly inside the text are dropped from the left: the template and the label
    slot at its end are never cut. Causal LMs keep a leading BOS if the tokenizer adds one but never a trailing
    EOS (the label is predicted after the last real token); masked LMs keep their CLS/SEP tokens.
    """

    def __init__(self, tokenizer, template: str, max_length: int, masked_lm: bool):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("TaskTemplate needs a fast tokenizer (offset mapping); load it with use_fast=True.")
        if template.count("{text}") != 1:
            raise ValueError(f"`template` must contain '{{text}}' exactly once, got {template!r}.")
        self.tokenizer = tokenizer
        self.masked_lm = masked_lm
        self.max_length = max_length
        prefix, suffix = template.split("{text}")
        if masked_lm:
            if tokenizer.mask_token is None:
                raise ValueError("A masked-LM template needs a tokenizer with a mask token; this one has none.")
            if (prefix + suffix).count("{mask}") != 1:
                raise ValueError(f"A masked-LM `template` must contain '{{mask}}' exactly once, got {template!r}.")
            prefix = prefix.replace("{mask}", tokenizer.mask_token)
            suffix = suffix.replace("{mask}", tokenizer.mask_token)
        elif "{mask}" in template:
            raise ValueError("A causal-LM `template` must not contain '{mask}': it ends at the label slot.")
        self.prefix, self.suffix = prefix, suffix
        self.template = template

    @classmethod
    def from_config(cls, config: POSTConfig, tokenizer) -> "TaskTemplate":
        return cls(tokenizer, config.template, config.max_length, masked_lm=config.task_type == "FEATURE_EXTRACTION")

    def render(self, text: str) -> str:
        return self.prefix + text + self.suffix

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"Expected a text string, got {type(text).__name__}: {text!r}.")
        tok = self.tokenizer
        rendered = self.render(text)
        enc = tok(rendered, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if not self.masked_lm and tok.eos_token_id is not None and len(ids) > 1 and ids[-1] == tok.eos_token_id:
            if not rendered.endswith(tok.eos_token or "\0"):
                ids, offsets = ids[:-1], offsets[:-1]
        excess = len(ids) - self.max_length
        if excess > 0:
            start, end = len(self.prefix), len(self.prefix) + len(text)
            inside = [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]
            if len(inside) < excess:
                raise ValueError(
                    f"`max_length`={self.max_length} is too short: the template alone needs "
                    f"{len(ids) - len(inside)} tokens. Raise max_length or shorten the template."
                )
            drop = set(inside[:excess])
            ids = [t for i, t in enumerate(ids) if i not in drop]
        return ids


def label_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_token_id: Optional[int] = None,
    num_virtual_tokens: int = 0,
) -> torch.Tensor:
    """Index of the label slot in each row, shifted by ``num_virtual_tokens`` for a prompted model.

    Causal LMs (``mask_token_id=None``): the last real token, for right or left padding. Masked LMs: the single
    mask token of each row (a row with none, or several, raises `ValueError`).
    """
    if mask_token_id is None:
        length = attention_mask.shape[1]
        last = length - 1 - attention_mask.flip(-1).long().argmax(-1)
        if (attention_mask.sum(-1) == 0).any():
            raise ValueError("A row of `attention_mask` has no real token.")
        return last + num_virtual_tokens
    is_mask = (input_ids == mask_token_id) & attention_mask.bool()
    counts = is_mask.sum(-1)
    if (counts != 1).any():
        bad = int((counts != 1).nonzero()[0])
        raise ValueError(f"Row {bad} holds {int(counts[bad])} mask tokens; a masked-LM example needs exactly one.")
    return is_mask.long().argmax(-1) + num_virtual_tokens


@dataclass
class VerbalizerCollator:
    """Tokenizes raw rows through the template and pads them into a batch for `label_logits`.

    Returns ``input_ids``, ``attention_mask``, ``label_positions`` (unprompted indices) and, when rows carry a
    label, ``labels``. Use with ``remove_unused_columns=False`` in `TrainingArguments`.
    """

    template: TaskTemplate
    text_column: str = "text"
    label_column: Optional[str] = "label"
    padding_side: str = "right"

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {self.padding_side!r}.")
        tok = self.template.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first.")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("Cannot collate an empty batch.")
        encoded = [self.template.encode(row[self.text_column]) for row in rows]
        width = max(len(e) for e in encoded)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(encoded):
            sl = slice(0, len(ids)) if self.padding_side == "right" else slice(width - len(ids), width)
            input_ids[i, sl] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, sl] = 1
        mask_id = self.template.tokenizer.mask_token_id if self.template.masked_lm else None
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "label_positions": label_positions(input_ids, attention_mask, mask_id),
        }
        if self.label_column is not None and self.label_column in rows[0]:
            batch["labels"] = torch.tensor([int(row[self.label_column]) for row in rows], dtype=torch.long)
        return batch


def check_text_dataset(dataset, text_column: str, name: str) -> list[str]:
    """Raise `ValueError` when a dataset is empty or has no `text_column`; returns its column names."""
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"`{name}` is empty; it needs at least one example.")
    columns = getattr(dataset, "column_names", None) or list(dataset[0].keys())
    if text_column not in columns:
        raise ValueError(f"`{name}` has no text column {text_column!r} (columns: {columns}); set `text_column`.")
    return columns


def check_classification_dataset(dataset, text_column: str, label_column: Optional[str], num_classes: int, name: str):
    """Raise `ValueError` before any work when a dataset is empty, lacks its columns, or has out-of-range labels."""
    columns = check_text_dataset(dataset, text_column, name)
    if label_column is None:
        return
    if label_column not in columns:
        raise ValueError(f"`{name}` has no label column {label_column!r} (columns: {columns}); set `label_column`.")
    problem = label_problem(dataset[label_column], num_classes)
    if problem:
        raise ValueError(f"`{name}` {problem}")


def label_problem(labels, num_classes: int) -> Optional[str]:
    """What is wrong with a label column, as the end of a sentence about the dataset, or None when every label is a
    class index in ``0..num_classes - 1``. Non-integers (strings, floats such as a CSV column with an empty cell
    gives, None) are reported apart from integers out of range."""
    labels = list(labels)
    not_int = [y for y in labels if not (isinstance(y, int) or hasattr(y, "__index__"))]
    if not_int:
        return (f"has {len(not_int)} label(s) that are not integer class indices (e.g. {not_int[0]!r}, a "
                f"{type(not_int[0]).__name__}); labels must be ints 0..{num_classes - 1}, one per class of "
                "label_words in order (a CSV column with an empty cell reads as floats).")
    outside = [y for y in labels if not 0 <= int(y) < num_classes]
    if outside:
        return (f"has labels outside 0..{num_classes - 1} (e.g. {outside[0]!r}); label_words define {num_classes} "
                "classes.")
    return None


def dataset_fingerprint(dataset, text_column: str) -> str:
    """A sha256 over the texts, to name exactly which data a prompt saw without storing the data."""
    h = hashlib.sha256()
    for text in dataset[text_column]:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
