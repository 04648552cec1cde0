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
