"""The processes of one `peft-post` job launched with ``accelerate launch`` (or torchrun): who writes, who waits.

Every process of the job runs the whole pipeline, so the training stages train together (DDP, and DP-SGD's global
step). Everything that touches the run folder or the student cache (stage records, released folders, the report,
the locks) is done by the main process alone through `on_main_process`, which hands its result, or its error, to the
others: a refusal on the main process stops every process with the same message instead of leaving them waiting.
Under one process all of this is a plain call.

The waits use the process group's timeout (`PipelineConfig.ddp_timeout` on GPUs, 30 minutes by default; gloo's 30
minutes on CPU processes): a non-main process waits that long at most for the main one to finish a step it runs
alone, such as the evaluation.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, ContextManager

import torch

from ..modeling import on_main_process as on_main_process  # re-exported: it lives in modeling (trainers use it too)
from ..modeling import process_rank_and_count


def launched_world_size() -> int:
    """The number of processes of this job, as its launcher set it (``WORLD_SIZE``; 1 for a plain ``python``)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with accelerate launch "
                         "or torchrun, which set it.") from None


def per_process_batch(batch_size: int, name: str) -> int:
    """The per-process share of a global batch: ``batch_size / launched_world_size()``, so a run's batches, and hence
    its results, settings keys and DP ledger, do not depend on how many processes run it. `name` is the field, for
    the error when it does not divide."""
    world = launched_world_size()
    if batch_size % world:
        raise ValueError(f"`{name}` ({batch_size}) is the global batch and must be divisible by the {world} processes "
                         f"of this launch: pick a multiple of {world}, or launch a number of processes that divides it.")
    return batch_size // world


def start_processes(cpu: bool, timeout_s: float) -> None:
    """Join the job's process group (accelerate's `PartialState`) with `timeout_s` as its timeout, if nothing has yet;
    a no-op under one process. On GPUs this also makes each process's ``"cuda"`` its own device (``LOCAL_RANK``).

    Building a `PipelineConfig` usually joins it first: its stage configs are `TrainingArguments`, which join with
    ``ddp_timeout`` on GPUs and with gloo's default (30 minutes) on CPU processes.
    """
    if launched_world_size() == 1 or process_rank_and_count()[1] > 1:
        return
    from datetime import timedelta

    from accelerate import PartialState

    PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_s))


def num_processes() -> int:
    """The processes of the job's process group once joined (1 under one process)."""
    return process_rank_and_count()[1]


def is_main_process() -> bool:
    """Whether this process writes: rank 0 of the job, or the only process."""
    return process_rank_and_count()[0] == 0


def wait_for_everyone() -> None:
    """A barrier across the job's processes (nothing under one)."""
    if num_processes() > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def held_by_main_process(lock: Callable[[], ContextManager]):
    """Enter the context ``lock()`` (a file lock) on the main process only, for the whole job: the other processes
    are part of the job that holds it. Failing to take it stops every process (`on_main_process`)."""
    with contextlib.ExitStack() as stack:

        def take() -> None:
            stack.enter_context(lock())

        on_main_process(take)
        yield
