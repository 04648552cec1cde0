"""Worker of tests/test_faults.py: `peft-post` in a subprocess that traces its file operations and, when told to,
SIGKILLs itself (or pauses) right before a chosen one.

    FAULT_SPEC='{"roots": [...], "trace": "...", "kill": {"stage": "tune", "index": 3}}' \
        python tests/_fault_worker.py run --run_dir ...

Every file operation under one of ``roots`` that changes the disk (an open for writing, a rename, a removal, a
mkdir, an rmtree: Python's audit events, so the trainer's and the pipeline's own writes alike) is one *event*. Each
event belongs to the stage that runs when it happens (the last `profiling.track_stage` entered; ``setup`` before the
first), and is numbered within it from 0. The worker appends one JSON line per event to ``trace`` (flushed, so a
killed worker's trace is complete up to the kill), plus ``{"enter": stage}`` lines.

``kill: {"stage": S, "index": k}`` sends SIGKILL to this process right before event k of stage S takes effect: a
real, uncatchable kill, at a point that is reproducible from run to run (unlike a timer). ``pause`` with the same
keys and ``until`` (a path) writes ``{"paused": ...}`` to the trace there instead and waits until ``until`` exists:
the concurrency tests hold a job inside a stage while another one starts. A pause may name ``path_suffix`` instead
of ``index``: it then waits before the stage's first event on a path ending so. Two jobs sharing a cache make
different numbers of events before a lock (who creates a shared folder first, how often a waiter polls a lock
file), so an index taken from a lone reference run can land before the lock in one of them.

Writes done in C without Python's file API (safetensors, `torch.save` to a path) raise no event: the test's
time-based kills, sent from outside, land anywhere, those included.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import contextmanager

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.rename": 0, "os.remove": 0, "os.rmdir": 0, "os.mkdir": 0, "shutil.rmtree": 0,
               "shutil.copyfile": 1, "shutil.move": 0, "os.truncate": 0}


def run(spec: dict, argv: list, env: dict, log: str = None) -> None:
    """Run `peft-post argv` in this process (a fresh fork of the test's fork server) under `spec`, with `env` added
    to the environment and stdout and stderr sent to the file `log`; exits with the command's status."""
    os.environ.update(env)
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        code = traced_main(spec, argv)
    except BaseException:  # noqa: B036 - a crash is a result the test reports, with its traceback
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def traced_main(spec: dict, argv: list) -> int:
    roots = tuple(os.path.abspath(r) + os.sep for r in spec["roots"])
    trace = open(spec["trace"], "a", buffering=1, encoding="utf-8")
    kill, pause = spec.get("kill"), spec.get("pause")
    state = {"stage": "setup", "counts": {}, "busy": False}

    def log(entry: dict) -> None:
        trace.write(json.dumps({**entry, "t": round(time.time(), 4), "pid": os.getpid()}) + "\n")
        trace.flush()

    def path_of(event: str, args: tuple):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
            if not writes:
                return None
        else:
            path = args[PATH_EVENTS[event]]
        if isinstance(path, int) or path is None:
            return None
        path = os.path.abspath(os.fsdecode(path))
        return path if path.startswith(roots) else None

    def hook(event: str, args: tuple) -> None:
        if (event != "open" and event not in PATH_EVENTS) or state["busy"]:
            return
        state["busy"] = True  # the trace's own writes raise events too
        try:
            path = path_of(event, args)
            if path is None:
                return
            stage = state["stage"]
            index = state["counts"].get(stage, 0)
            state["counts"][stage] = index + 1
            entry = {"stage": stage, "index": index, "event": event, "path": path}
            if kill and kill["stage"] == stage and kill["index"] == index:
                log({**entry, "killed": True})
                os.kill(os.getpid(), signal.SIGKILL)
            log(entry)
            if pause and pause["stage"] == stage and not state.get("paused") and (
                    pause.get("index") == index or ("path_suffix" in pause and path.endswith(pause["path_suffix"]))):
                state["paused"] = True
                log({**entry, "paused": True})
                while not os.path.exists(pause["until"]):
                    time.sleep(0.05)
        finally:
            state["busy"] = False

    import peft_post.profiling as profiling

    track_stage = profiling.track_stage

    @contextmanager
    def traced_stage(name: str, stages: list):
        state["stage"] = name
        log({"enter": name})
        with track_stage(name, stages):
            yield

    profiling.track_stage = traced_stage
    sys.addaudithook(hook)
    from peft_post.cli import main as cli_main

    return cli_main(list(argv))


if __name__ == "__main__":
    sys.exit(traced_main(json.loads(os.environ["FAULT_SPEC"]), sys.argv[1:]))
