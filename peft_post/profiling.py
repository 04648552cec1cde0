"""Measuring a pipeline stage: its wall time and the process's peak resident memory, as a `report.StageStats`.

`track_stage` times a block and records it in a list of `StageStats` (what `report.POSTResults.stages` holds);
`peak_rss_mb` reads the peak resident memory, which `track_stage` resets on entry (on Linux), so a stage record
written inside the block (`pipeline.store.finish_stage`) carries that stage's peak.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from .report import StageStats


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (since the last `track_stage` reset, on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not on Windows; imported here so this module itself works there

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _reset_peak_rss() -> bool:
    # Linux resets the high-water mark VmHWM when "5" is written to clear_refs; elsewhere the peak stays
    # process-wide (the peak since start), which is still an upper bound of the stage's.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextmanager
def track_stage(name: str, stages: list) -> Iterator[None]:
    """Time the block and record its peak resident memory as a `StageStats` appended to `stages`.

    On Linux the peak is that of the block (the process high-water mark is reset on entry); elsewhere it is the
    process peak so far. A stage that raises appends nothing.
    """
    _reset_peak_rss()
    start = time.perf_counter()
    yield  # a stage that raises is not recorded: it did not finish
    stages.append(StageStats(name=name, wall_time_s=time.perf_counter() - start,
                             peak_memory_mb=round(peak_rss_mb(), 1)))


def synchronize() -> None:
    """Wait for queued CUDA work (a no-op on the CPU), so a timer around it measures the work itself."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def training_stepper(trainer, num_steps: int):
    """A function that runs one optimizer step of `trainer` on its next training batch, as `Trainer.train`'s loop
    does it, and returns its seconds (CUDA work included): the step the benchmarks time, interleaved across
    trainers, without `train()`'s callbacks, logging and checkpoints. `num_steps` sizes the LR schedule."""
    import itertools

    trainer.create_optimizer_and_scheduler(num_training_steps=num_steps)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by `training_step`
    batches = itertools.cycle(trainer.get_train_dataloader())

    def step() -> float:
        batch = next(batches)
        synchronize()
        start = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad()
        synchronize()
        return time.perf_counter() - start

    return step
