"""Which Trainer checkpoint a stage resumes from, and the check that it is intact.

A job killed at any moment must resume to the outputs an uninterrupted job makes. Two checkpoints must never be
resumed from:

- an incomplete one: the Trainer writes ``checkpoint-N/`` file by file and ``trainer_state.json`` last, so a kill
  while it saves leaves a folder without it, from which `Trainer.train` fails on every later run;
- the one saved at the last step: the Trainer (transformers 5.25) resumed from it trains one step past
  ``max_steps``, which changes the prompt, and under DP spends budget σ was not calibrated for.

`resume_checkpoint` returns the newest checkpoint that is neither, and removes the newer ones (incomplete saves, or
the finished one: resuming from the checkpoint before it redoes the last steps exactly, DP noise included, since
every step's batch and noise come from the step's own keyed generator). `check_checkpoints` refuses, naming the
file, a complete checkpoint whose files were damaged afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

from .processes import on_main_process

TRAINER_STATE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME, written last in a checkpoint
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(checkpoint: str) -> Optional[int]:
    """The global step a checkpoint was saved at, or None when it is incomplete (no readable trainer state)."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoints_newest_first(folder: str) -> list[str]:
    """The ``checkpoint-N`` folders in `folder`, highest N first (none when `folder` does not exist)."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := _CHECKPOINT.match(name))
             and os.path.isdir(os.path.join(folder, name))]
    return [os.path.join(folder, name) for _, name in sorted(found, reverse=True)]


def resumable_checkpoint(folder: str, max_steps: int) -> Optional[str]:
    """The checkpoint in `folder` a `max_steps` run resumes from: the newest complete one saved before the last step
    (None: start from step 0)."""
    for checkpoint in checkpoints_newest_first(folder):
        step = checkpoint_step(checkpoint)
        if step is not None and step < max_steps:
            return checkpoint
    return None


def resume_checkpoint(folder: str, max_steps: int) -> Optional[str]:
    """`resumable_checkpoint`, after removing the checkpoints newer than it (incomplete or finished), so that the
    Trainer saves them again from the resumed state. Under several processes the main one chooses and removes, and
    every process resumes from its choice."""
    def choose() -> Optional[str]:
        chosen = resumable_checkpoint(folder, max_steps)
        for checkpoint in checkpoints_newest_first(folder):
            if checkpoint == chosen:
                break
            shutil.rmtree(checkpoint)
        if chosen is not None:
            print(f"Resuming from {chosen}", flush=True)
        return chosen

    return on_main_process(choose)


def check_checkpoints(folder: str, max_steps: int, stage: str, fix: str) -> None:
    """Refuse, naming the file, a damaged file (a truncated safetensors file, JSON that does not parse) in the
    checkpoint a `max_steps` run would resume from, before the stage resumes and fails deep inside the Trainer. The
    checkpoints `resume_checkpoint` discards (incomplete or finished ones) are not checked."""
    from safetensors import SafetensorError, safe_open

    checkpoint = resumable_checkpoint(folder, max_steps)
    if checkpoint is None:
        return
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, "pt"):
                    pass
            elif name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    json.load(f)
        except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is damaged ({err}): the {stage} stage cannot resume from it. Delete "
                             f"{checkpoint} to resume from the checkpoint before it, or {fix}") from None
