"""How much of a "public" text set is the user's private data: the measurement behind the pipeline's preflight.

POST's privacy rests on the provider using public data only: the transfer set and the distillation text must not
hold the private task's sentences. A private sentence in the transfer set is trained on without any DP noise (its
effect on the transferred prompt is not covered by the ledger), and a private *test* sentence there inflates the
report. Comparing dataset names catches the obvious mistake; this module catches the rest, copies of the same
sentences under another name (the VADER movie snippets are 98.6% Rotten Tomatoes sentences,
`benchmarks/results/assets_overlap.json`).

Texts are compared after `peft_post.assets.normalize_text` (lowercase alphanumerics only), so quoting, spacing and
dash differences between two copies of a sentence do not hide the overlap. Near-duplicates (a few words changed)
are not counted: exact normalised matches are cheap enough to check on every run, and they are what a copied or
re-split dataset produces.

The functions are pure (texts in, numbers out). They read private text, so only the user, who holds it, runs them.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

from .assets import normalize_text


@dataclass(frozen=True)
class Overlap:
    """How many of `num_texts` checked texts are private texts."""

    num_texts: int
    num_private: int

    @property
    def fraction(self) -> float:
        """Share of the checked texts found in the private data (0 when nothing was checked)."""
        return self.num_private / self.num_texts if self.num_texts else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction}


def text_keys(texts: Iterable[str]) -> set[str]:
    """The normalised keys of `texts`, the private side of a comparison. Texts without any letter or digit have an
    empty key and are left out: an empty string would otherwise match every punctuation-only public text."""
    return {key for key in map(normalize_text, texts) if key}


def measure_overlap(texts: Iterable[str], private_keys: set[str]) -> Overlap:
    """How many of `texts` (each counted, duplicates included: they are trained on as often) are private texts,
    i.e. have their normalised key in `private_keys` (from `text_keys`)."""
    num_texts = num_private = 0
    for text in texts:
        num_texts += 1
        key = normalize_text(text)
        num_private += bool(key) and key in private_keys
    return Overlap(num_texts=num_texts, num_private=num_private)


def sample_indices(num_rows: int, max_rows: Optional[int], seed: int = 0) -> list[int]:
    """Up to `max_rows` row indices of a dataset of `num_rows` rows, drawn without replacement with `seed`, sorted
    (every row when `max_rows` is None or not smaller). A uniform sample estimates the overlap fraction of a large
    corpus (a 1% overlap shows as about 50 of 5000 texts) at a fixed cost, where checking every row of a corpus of
    millions would not be cheap enough to run before every pipeline run."""
    if num_rows < 0:
        raise ValueError(f"`num_rows` must be >= 0, got {num_rows!r}.")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"`max_rows` must be None or >= 1, got {max_rows!r}.")
    if max_rows is None or num_rows <= max_rows:
        return list(range(num_rows))
    return sorted(random.Random(seed).sample(range(num_rows), max_rows))


def sample_texts(texts: Sequence[str], max_rows: Optional[int], seed: int = 0) -> list[str]:
    """`sample_indices` applied to a sequence of texts."""
    return [texts[i] for i in sample_indices(len(texts), max_rows, seed)]


def same_dataset(a: str, b: str) -> bool:
    """Whether two dataset arguments name the same data: the same name, or two spellings of one local file or
    folder (``data/x.csv`` and ``./data/x.csv``, a symlink). Different data under different names is what
    `measure_overlap` is for."""
    a, b = str(a).strip(), str(b).strip()
    if a == b:
        return True
    a, b = os.path.expanduser(a), os.path.expanduser(b)
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
