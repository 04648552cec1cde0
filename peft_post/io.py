"""File output: atomic writes (a reader never sees a half-written file, and an interrupted write leaves the old one),
and what a released folder must not keep."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def drop_training_arguments(folder: str) -> None:
    """Remove the ``training_args.bin`` that `Trainer.save_model` pickles beside an adapter: it holds the run's seed
    and local paths, which a folder handed to someone else does not carry."""
    from transformers.trainer import TRAINING_ARGS_NAME

    path = os.path.join(folder, TRAINING_ARGS_NAME)
    if os.path.isfile(path):
        os.remove(path)


def read_json_object(path: str, fix: str) -> dict:
    """The JSON object in `path`; a file that is not one raises a ValueError naming it, followed by `fix`."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}). {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object. {fix}")
    return value
