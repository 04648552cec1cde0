"""The private dataset as every stage reads it: `private_splits` and `private_split`.

A private dataset holds a training and a test split (`PipelineConfig.private_train_split`, `private_test_split`).
One without a test split (a single CSV file loads as ``train`` only) is split here when ``private_test_size`` is
set: its training split becomes a seeded, label-stratified train/test pair (`assets.stratified_split`). Every stage
that reads private data (the preflight and its overlap check, tuning, the evaluation) goes through these two
functions, so they all see the same split.
"""

from __future__ import annotations

from .config import PipelineConfig
from .loading import random_subset

SPLIT_ROLES = ("train", "test")


def private_splits(cfg: PipelineConfig):
    """Every split of `cfg.private_dataset` as a `DatasetDict`, with the test split cut from the training split when
    the dataset has none and ``cfg.private_test_size`` is set. Errors name the argument to fix."""
    from ..assets import load_text_dataset, stratified_split

    try:
        splits = load_text_dataset(cfg.private_dataset)
    except ValueError as err:
        raise ValueError(f"`--private_dataset` {cfg.private_dataset!r}: {err}") from None
    size = cfg.private_test_size
    if size is None:
        return splits
    train_name, test_name = cfg.private_train_split, cfg.private_test_split
    if test_name in splits:
        raise ValueError(
            f"`--private_test_size` {size!r} is set, but `--private_dataset` {cfg.private_dataset!r} already has a "
            f"split {test_name!r} (its splits: {sorted(splits)}). Drop `--private_test_size` to use that split, or "
            "give a dataset without one.")
    if train_name not in splits:
        raise ValueError(f"`--private_dataset` {cfg.private_dataset!r} has no split {train_name!r} to cut "
                         f"`--private_test_size` from (its splits: {sorted(splits)}); set `--private_train_split`.")
    train = splits[train_name]
    if cfg.target_column not in train.column_names:
        flag = "answer_column" if cfg.task_kind == "generation" else "label_column"
        raise ValueError(f"`--private_dataset` {cfg.private_dataset!r} split {train_name!r} has no "
                         f"{flag.split('_')[0]} column {cfg.target_column!r} (columns: {train.column_names}); set "
                         f"`--{flag}`.")
    n = len(train)
    count = size if isinstance(size, int) else int(round(size * n))
    if not 0 < count < n:
        raise ValueError(f"`--private_test_size` {size!r} leaves {count} of the {n} examples of `--private_dataset` "
                         f"split {train_name!r} for the test split; it must leave between 1 and {n - 1}.")
    train_idx, test_idx = stratified_split(list(train[cfg.target_column]), count, cfg.seed)
    splits = dict(splits)
    splits[train_name], splits[test_name] = train.select(train_idx), train.select(test_idx)
    from datasets import DatasetDict

    return DatasetDict(splits)


def private_split(cfg: PipelineConfig, which: str):
    """The private training (``which="train"``) or test (``"test"``) split of `cfg`, as every stage reads it."""
    if which not in SPLIT_ROLES:
        raise ValueError(f"`which` must be one of {SPLIT_ROLES}, got {which!r}.")
    name = cfg.private_train_split if which == "train" else cfg.private_test_split
    splits = private_splits(cfg)
    if name not in splits:
        raise ValueError(missing_split_message(cfg, which, sorted(splits)))
    return splits[name]


def private_examples(cfg: PipelineConfig, which: str):
    """The examples a run uses of the private training or test split: `private_split`, capped at
    `max_train_examples` / `max_test_examples` by a draw seeded with `cfg.seed` (the same draw in every stage)."""
    cap = cfg.max_train_examples if which == "train" else cfg.max_test_examples
    return random_subset(private_split(cfg, which), cap, cfg.seed)


def missing_split_message(cfg: PipelineConfig, which: str, present: list) -> str:
    """What to do when the private dataset lacks its training or test split: the flags and the layouts that work."""
    name = cfg.private_train_split if which == "train" else cfg.private_test_split
    flag = "--private_train_split" if which == "train" else "--private_test_split"
    hint = (f" Cut one from the training split with `--private_test_size 0.2` (a seeded, stratified 20%), or name "
            f"another split with `{flag}`." if which == "test" else f" Name the split to tune on with `{flag}`.")
    return (f"`--private_dataset` {cfg.private_dataset!r} has no {which} split {name!r} (its splits: {present})."
            f"{hint} Layouts that give both splits: a folder holding train.csv and test.csv; a `datasets` "
            "save_to_disk folder with 'train' and 'test'; a Hub id with both splits (docs/pipeline.md, 'Your own "
            "data').")
