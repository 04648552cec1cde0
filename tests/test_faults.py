"""Fault suite (issue 21): a job SIGKILLed anywhere in any stage, two jobs on one run folder, two on one student.

Every case ends with a rerun and asserts that it produces what an uninterrupted run produced: the student's weights,
both adapters byte for byte (``--dp false``: DP noise is secret by design), the evaluation and the report's
accuracies; a DP case asserts the resumed run's ledger instead.

The jobs are real processes, forked from a fork server that imported ``peft_post`` once (a fresh interpreter costs
5 to 15 s of imports here; a fork costs nothing), each running ``peft-post`` under `tests/_fault_worker.py`, which
traces every file operation under the test's folder and, when told to, SIGKILLs its own process right before one
(a reproducible point). Kill points:

- *event kills*: before file operation k of a stage, k drawn with a seeded RNG from the operations the reference
  run made in that stage;
- *time kills*: SIGKILL sent by the test a seeded random delay (up to the stage's reference wall time) after the job
  entered the stage, so it lands anywhere, inside a C-level write too. Timing jitter moves where it lands, so the
  assertions hold wherever that is, and a failure names the job's last file operation.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import time

import pytest

import _fault_worker

STAGES = ("distill", "tune", "transfer", "evaluate")
STEPS = 5
# Five steps with --save_steps 2: checkpoints 2 and 4, then the final one, 5 (save_total_limit 2 keeps two).
FLAGS = ["--distill_max_steps", str(STEPS), "--tune_max_steps", str(STEPS), "--transfer_max_steps", str(STEPS),
         "--dp", "false"]
SEED = 21
JOB_TIMEOUT = 180
# Two bugs this suite found (issue 21), fixed by `peft_post.pipeline.checkpoints.resume_checkpoint`; each keeps its
# own test below. Set a flag back to True only to study a regression: the seeded event kills then skip its window,
# and its tests become strict expected failures.
#
# A: a job killed while the Trainer wrote a checkpoint left a newest checkpoint without trainer_state.json, which
#    the stage resumed from, so every later run failed (FileNotFoundError .../checkpoint-4/trainer_state.json).
INCOMPLETE_CHECKPOINT_BUG = False
# B: a job killed after the final checkpoint (checkpoint-5 of 5 steps) and before the stage was published resumed
#    from it and trained one step more (6): the transfer published a different prompt, the tuning's record said 6
#    steps, and under DP the ledger composed 6 steps at the σ calibrated for 5 (ε 9.09 for a target of 8).
FINAL_CHECKPOINT_BUG = False


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["_fault_worker", "peft_post.cli", "peft_post.pipeline"])
    return ctx


class Job:
    """One `peft-post` process: `argv` under `_fault_worker` with `kill`/`pause`; its trace and log are files."""

    def __init__(self, ctx, root, name, argv, cache, kill=None, pause=None):
        self.name, self.trace, self.log = name, os.path.join(root, f"{name}.trace"), os.path.join(root, f"{name}.log")
        spec = {"roots": [str(root)], "trace": self.trace, "kill": kill, "pause": pause}
        env = {"PEFT_POST_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1"}
        open(self.trace, "w").close()
        self.process = ctx.Process(target=_fault_worker.run, args=(spec, list(argv), env, self.log))
        self.process.start()

    def wait(self, timeout=JOB_TIMEOUT) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            pytest.fail(f"{self.name} did not finish in {timeout} s\n{self.describe()}")
        return self.process.exitcode

    def events(self) -> list:
        with open(self.trace, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def output(self) -> str:
        return open(self.log, encoding="utf-8").read() if os.path.exists(self.log) else ""

    def wait_for(self, predicate, timeout=JOB_TIMEOUT) -> bool:
        """Poll the trace until `predicate(events)` holds (True) or the job ends (False)."""
        end = time.time() + timeout
        while time.time() < end:
            if predicate(self.events()):
                return True
            if not self.process.is_alive():
                return predicate(self.events())
            time.sleep(0.02)
        pytest.fail(f"{self.name}: timed out waiting\n{self.describe()}")

    def describe(self) -> str:
        ops = [e for e in self.events() if "stage" in e]
        last = ops[-1] if ops else None
        where = "none" if last is None else f"{last['stage']} #{last['index']} {last['event']} {last['path']}"
        return (f"[{self.name}] exit {self.process.exitcode}; last file operation: {where}\n"
                f"--- log tail ---\n{self.output()[-3000:]}")


def stage_events(events: list, stage: str) -> list:
    return [e for e in events if e.get("stage") == stage]


def checkpoint_windows(events: list) -> set:
    """Indices of a stage's file operations made while a Trainer checkpoint is incomplete: from the checkpoint
    folder's first mkdir to the opening of its trainer_state.json (written last), both included."""
    inside, window = None, set()
    for e in events:
        parts = e["path"].split(os.sep)
        name = next((p for p in parts if p.startswith("checkpoint-")), None)
        if name is not None and e["event"] in ("os.mkdir", "open") and inside is None and \
                e["path"].rstrip(os.sep).endswith(name):
            inside = name
        if inside is not None:
            window.add(e["index"])
            if e["event"] == "open" and e["path"].endswith(os.path.join(inside, "trainer_state.json")):
                inside = None
    return window


def final_checkpoint_window(events: list) -> set:
    """Indices of a stage's file operations after its final checkpoint is complete and before its checkpoints are
    deleted (bug B's window)."""
    final = os.path.join(f"checkpoint-{STEPS}", "trainer_state.json")
    start = next((e["index"] for e in events if e["event"] == "open" and e["path"].endswith(final)), None)
    if start is None:
        return set()
    end = next((e["index"] for e in events if e["index"] > start and e["event"] == "shutil.rmtree"
                and e["path"].endswith(("checkpoints", ".partial"))), events[-1]["index"] + 1)
    return set(range(start + 1, end + 1))


def known_bug_windows(events: list) -> set:
    return (checkpoint_windows(events) if INCOMPLETE_CHECKPOINT_BUG else set()) | \
        (final_checkpoint_window(events) if FINAL_CHECKPOINT_BUG else set())


def known_bug_states(root) -> list:
    """What bugs A and B leave on disk after a kill: incomplete newest checkpoints, final checkpoints."""
    found = incomplete_checkpoints(root) if INCOMPLETE_CHECKPOINT_BUG else []
    if FINAL_CHECKPOINT_BUG:
        found += [folder for folder, dirs, _ in os.walk(root) if os.path.basename(folder) == f"checkpoint-{STEPS}"]
    return found


def incomplete_checkpoints(root) -> list:
    """Newest checkpoints under `root` without their trainer_state.json (what the known bug leaves)."""
    found = []
    for folder, dirs, _ in os.walk(root):
        ckpts = [d for d in dirs if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
        if ckpts:
            newest = max(ckpts, key=lambda d: int(d.split("-")[-1]))
            if not os.path.isfile(os.path.join(folder, newest, "trainer_state.json")):
                found.append(os.path.join(folder, newest))
    return found


def listing(root) -> list:
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        out += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files)]
    return out


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def student_dir(cache) -> str:
    students = os.path.join(cache, "students")
    entries = [d for d in os.listdir(students) if os.path.isdir(os.path.join(students, d))]
    assert len(entries) == 1, f"one student expected in {students}, found {entries}"
    return os.path.join(students, entries[0])


def outputs(run_dir, cache) -> dict:
    """What an uninterrupted run produces (non-DP, so byte for byte): the comparison of every case."""
    student = student_dir(cache)
    evaluation = load_json(os.path.join(run_dir, "evaluation.json"))
    return {
        # Steps taken: a resumed stage that trains once more can leave its weights unchanged (lr 0 after the
        # schedule's end) and still count, under DP, in its ledger.
        "steps": {"distill": load_json(os.path.join(student, "stage.json"))["steps"],
                  "tune": load_json(os.path.join(run_dir, "private", "tune.json"))["steps"],
                  "transfer": load_json(os.path.join(run_dir, "transferred_prompt", "stage.json"))["steps"]},
        "student": sha256(os.path.join(student, "model.safetensors")),
        "source_prompt": sha256(os.path.join(run_dir, "source_prompt", "adapter_model.safetensors")),
        "transferred_prompt": sha256(os.path.join(run_dir, "transferred_prompt", "adapter_model.safetensors")),
        "evaluation": evaluation["results"], "num_test_examples": evaluation["num_test_examples"],
        "accuracy": load_json(os.path.join(run_dir, "report.json"))["accuracy"],
        # Published folders hold exactly what an uninterrupted run's hold, and nothing is left half-done.
        "student_files": listing(student),
        "run_files": [f for f in listing(run_dir) if f != ".lock"],
    }


@pytest.fixture(scope="module")
def reference(forkserver, tiny_run_inputs, tmp_path_factory):
    """The uninterrupted run (a job like the others, so it computes with the same threads): its outputs, its file
    operations per stage and each stage's wall time."""
    root = tmp_path_factory.mktemp("reference")
    run_dir, cache = str(root / "run"), str(root / "cache")
    job = Job(forkserver, root, "reference", ["run", *tiny_run_inputs(run_dir), *FLAGS], cache)
    assert job.wait() == 0, job.describe()
    events = job.events()
    enters = [(e["enter"], e["t"]) for e in events if "enter" in e]
    ends = [t for _, t in enters[1:]] + [events[-1]["t"]]
    return {"root": str(root), "run_dir": run_dir, "cache": cache, "outputs": outputs(run_dir, cache),
            "events": {s: stage_events(events, s) for s in STAGES},
            "seconds": {name: end - t for (name, t), end in zip(enters, ends)}}


def shared_student(reference, cache):
    """Copy the reference's student into `cache`: the provider distils once, and later runs reuse it."""
    shutil.copytree(os.path.join(reference["cache"], "students"), os.path.join(cache, "students"))


def event_kill_point(reference, stage, rng) -> int:
    events = reference["events"][stage]
    skip = known_bug_windows(events)
    return rng.choice([e["index"] for e in events if e["index"] not in skip])


def finish_and_compare(ctx, root, argv, run_dir, cache, reference, history):
    """The final rerun: it must succeed and give the reference's outputs."""
    job = Job(ctx, root, "final", argv, cache)
    rc = job.wait()
    ok = rc == 0 and outputs(run_dir, cache) == reference["outputs"]
    if not ok and any(h["known_bug_state"] for h in history):
        pytest.xfail(f"a time kill landed in a known bug's window (A or B, see the top of the file): {history}")
    assert rc == 0, f"the rerun failed after {history}\n{job.describe()}"
    assert not incomplete_checkpoints(root)
    assert outputs(run_dir, cache) == reference["outputs"], f"outputs differ after {history}"


@pytest.mark.parametrize("stage", STAGES)
def test_killed_twice_in_a_stage_then_rerun_gives_the_uninterrupted_outputs(stage, forkserver, reference,
                                                                          tiny_run_inputs, tmp_path):
    rng = random.Random(f"{SEED}-{stage}")
    index = event_kill_point(reference, stage, rng)
    delay = rng.uniform(0, reference["seconds"][stage])
    run_dir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    if stage != "distill":
        shared_student(reference, cache)
    argv = ["run", *tiny_run_inputs(run_dir), *FLAGS]
    history = []

    # 1. SIGKILL right before file operation `index` of the stage.
    job = Job(forkserver, tmp_path, "event-kill", argv, cache, kill={"stage": stage, "index": index})
    assert job.wait() == -signal.SIGKILL, f"the kill point {stage} #{index} was not reached\n{job.describe()}"
    killed = next(e for e in job.events() if e.get("killed"))
    history.append({"kill": f"{stage} #{index} before {killed['event']} {os.path.relpath(killed['path'], tmp_path)}",
                    "known_bug_state": known_bug_states(tmp_path), "left": listing(tmp_path / "run")})

    # 2. The rerun, SIGKILLed `delay` seconds after it enters the stage (or later, or not at all if it is done).
    job = Job(forkserver, tmp_path, "time-kill", argv, cache)
    if job.wait_for(lambda events: any(e.get("enter") == stage for e in events)):
        time.sleep(delay)
        if job.process.is_alive():
            os.kill(job.process.pid, signal.SIGKILL)
    rc = job.wait()
    assert rc in (0, -signal.SIGKILL), job.describe()
    history.append({"kill": f"{delay:.2f} s into {stage}: {job.describe().splitlines()[0]}",
                    "known_bug_state": known_bug_states(tmp_path)})

    finish_and_compare(forkserver, tmp_path, argv, run_dir, cache, reference, history)


@pytest.mark.xfail(INCOMPLETE_CHECKPOINT_BUG, strict=True, reason=(
    "BUG A (issue 21): a kill while the Trainer writes a checkpoint leaves a newest checkpoint without "
    "trainer_state.json, which stages.last_checkpoint picks: every rerun fails with FileNotFoundError"))
@pytest.mark.parametrize("stage", ["distill", "tune", "transfer"])
def test_a_kill_while_a_checkpoint_is_written_is_resumed(stage, forkserver, reference, tiny_run_inputs, tmp_path):
    # The last moment of the window: checkpoint-4 holds the adapter, optimizer and RNG state; trainer_state.json,
    # written last, is about to be opened.
    index = next(e["index"] for e in reference["events"][stage]
                 if e["event"] == "open" and e["path"].endswith(os.path.join("checkpoint-4", "trainer_state.json")))
    run_dir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    if stage != "distill":
        shared_student(reference, cache)
    argv = ["run", *tiny_run_inputs(run_dir), *FLAGS]
    job = Job(forkserver, tmp_path, "event-kill", argv, cache, kill={"stage": stage, "index": index})
    assert job.wait() == -signal.SIGKILL, job.describe()
    assert incomplete_checkpoints(tmp_path)
    job = Job(forkserver, tmp_path, "final", argv, cache)
    assert job.wait() == 0, job.describe()
    assert outputs(run_dir, cache) == reference["outputs"]


@pytest.mark.xfail(FINAL_CHECKPOINT_BUG, strict=True, reason=(
    "BUG B (issue 21): resumed from its final checkpoint, a stage trains one step more (6 of 5): its record "
    "counts 6 steps, and the transfer publishes a different prompt"))
@pytest.mark.parametrize("stage", ["tune", "transfer"])
def test_a_kill_after_the_final_checkpoint_is_resumed_without_an_extra_step(stage, forkserver, reference,
                                                                          tiny_run_inputs, tmp_path):
    # Right after checkpoint-5 (of 5 steps) is complete: training is over, the stage is not published yet.
    index = min(final_checkpoint_window(reference["events"][stage]))
    run_dir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    shared_student(reference, cache)
    argv = ["run", *tiny_run_inputs(run_dir), *FLAGS]
    job = Job(forkserver, tmp_path, "event-kill", argv, cache, kill={"stage": stage, "index": index})
    assert job.wait() == -signal.SIGKILL, job.describe()
    job = Job(forkserver, tmp_path, "final", argv, cache)
    assert job.wait() == 0, job.describe()
    assert outputs(run_dir, cache) == reference["outputs"]


DP = ["--dp", "true", "--dp_target_epsilon", "8"]


def dp_tune(ctx, tiny_run_inputs, root, name, run_dir, cache, kill=None):
    argv = ["tune", *tiny_run_inputs(str(root / run_dir)), *FLAGS, *DP]
    return Job(ctx, root, name, argv, cache, kill=kill)


def ledger(run_dir) -> dict:
    folder = os.path.join(run_dir, "source_prompt")
    record = load_json(os.path.join(run_dir, "private", "tune.json"))
    return {"record": record["privacy"], "steps": record["steps"],
            "released": load_json(os.path.join(folder, "post_config.json")).get("privacy"),
            "accountant": load_json(os.path.join(folder, "dp_accountant.json"))}


@pytest.fixture(scope="module")
def dp_reference(forkserver, reference, tiny_run_inputs, tmp_path_factory):
    """An uninterrupted DP tuning (the user's stage alone; the student comes from the cache): its ledger and file
    operations. DP outputs differ from run to run by design (secret noise); the ledger must not."""
    root = tmp_path_factory.mktemp("dp-reference")
    cache = str(root / "cache")
    shared_student(reference, cache)
    job = dp_tune(forkserver, tiny_run_inputs, root, "uninterrupted", "run", cache)
    assert job.wait() == 0, job.describe()
    expected = ledger(str(root / "run"))
    assert expected["record"] is not None and expected["released"] is not None and expected["steps"] == STEPS
    return {"ledger": expected, "events": stage_events(job.events(), "tune")}


def dp_resumed_ledger(ctx, reference, tiny_run_inputs, root, index) -> dict:
    """The ledger of a DP tuning killed before its file operation `index`, then resumed."""
    cache = str(root / "cache")
    shared_student(reference, cache)
    job = dp_tune(ctx, tiny_run_inputs, root, "killed", "run", cache, kill={"stage": "tune", "index": index})
    assert job.wait() == -signal.SIGKILL, job.describe()
    assert os.listdir(root / "run" / "private" / "tune.partial" / "checkpoints"), "the rerun resumes a checkpoint"
    job = dp_tune(ctx, tiny_run_inputs, root, "resumed", "run", cache)
    assert job.wait() == 0, job.describe()
    return ledger(str(root / "run"))


def test_a_dp_run_killed_and_resumed_keeps_the_uninterrupted_ledger(forkserver, reference, dp_reference,
                                                                   tiny_run_inputs, tmp_path):
    events = dp_reference["events"]
    # After the first complete checkpoint, so the rerun resumes (accountant history and noise key included).
    first = next(e["index"] for e in events if e["path"].endswith("trainer_state.json"))
    skip = known_bug_windows(events)
    index = random.Random(f"{SEED}-dp").choice([e["index"] for e in events
                                               if e["index"] > first and e["index"] not in skip])
    assert dp_resumed_ledger(forkserver, reference, tiny_run_inputs, tmp_path, index) == dp_reference["ledger"]


@pytest.mark.xfail(FINAL_CHECKPOINT_BUG, strict=True, reason=(
    "BUG B (issue 21): a DP tuning resumed from its final checkpoint takes one step more (6) than the ledger of an "
    "uninterrupted run (5)"))
def test_a_dp_run_killed_after_its_final_checkpoint_keeps_the_uninterrupted_ledger(forkserver, reference,
                                                                                   dp_reference, tiny_run_inputs,
                                                                                   tmp_path):
    index = min(final_checkpoint_window(dp_reference["events"]))
    assert dp_resumed_ledger(forkserver, reference, tiny_run_inputs, tmp_path, index) == dp_reference["ledger"]


def test_two_runs_on_one_run_folder_one_is_refused_and_the_other_finishes(forkserver, reference, tiny_run_inputs,
                                                                         tmp_path):
    run_dir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    shared_student(reference, cache)
    argv = ["run", *tiny_run_inputs(run_dir), *FLAGS]
    release = str(tmp_path / "release")
    # Both start at once; whichever gets the folder holds it at its first tuning write until the other has ended.
    jobs = [Job(forkserver, tmp_path, f"job{i}", argv, cache, pause={"stage": "tune", "index": 0, "until": release})
            for i in range(2)]
    end = time.time() + JOB_TIMEOUT
    while not any(j.process.exitcode is not None for j in jobs) and time.time() < end:
        time.sleep(0.05)
    refused = next(j for j in jobs if j.process.exitcode is not None)
    winner = next(j for j in jobs if j is not refused)
    assert refused.wait() == 2, refused.describe()
    assert "Another job is using the run folder" in refused.output() and "Traceback" not in refused.output()
    # It wrote nothing: its only file operations were on the folder itself and the lock it failed to take.
    touched = {os.path.relpath(e["path"], run_dir) for e in refused.events() if "stage" in e}
    assert touched <= {".", ".lock"}, touched
    assert winner.wait_for(lambda events: any(e.get("paused") for e in events)), winner.describe()
    open(release, "w").close()
    assert winner.wait() == 0, winner.describe()
    assert outputs(run_dir, cache) == reference["outputs"]


def test_two_distillations_of_one_student_one_waits_and_reuses_it(forkserver, reference, tiny_run_inputs, tmp_path):
    cache = str(tmp_path / "cache")
    release = str(tmp_path / "release")
    # The student's .partial folder is made under the student's lock: the job that pauses there holds it. (Paused by
    # path, not by a reference run's event index: the two jobs' event counts before the lock differ from it.)
    jobs = [Job(forkserver, tmp_path, f"distill{i}", ["distill", *tiny_run_inputs(str(tmp_path / f"run{i}")), *FLAGS],
                cache, pause={"stage": "distill", "path_suffix": ".partial", "until": release}) for i in range(2)]
    # Exactly one gets the lock and pauses; the other waits for it, says so, and distils nothing.
    end = time.time() + JOB_TIMEOUT
    while time.time() < end and not (any("waiting" in j.output() for j in jobs) and
                                      any(any(e.get("paused") for e in j.events()) for j in jobs)):
        assert all(j.process.is_alive() for j in jobs), "\n".join(j.describe() for j in jobs)
        time.sleep(0.05)
    waiting = next(j for j in jobs if "waiting" in j.output())
    distilling = next(j for j in jobs if j is not waiting)
    open(release, "w").close()
    for job in jobs:
        assert job.wait() == 0, job.describe()
    assert not [e for e in waiting.events() if ".partial" in e.get("path", "")]
    student = student_dir(cache)
    assert {"stage.json", "model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(student))
    assert not [d for d in os.listdir(os.path.dirname(student)) if d.endswith(".partial")]
    assert sha256(os.path.join(student, "model.safetensors")) == reference["outputs"]["student"]
    assert listing(student) == reference["outputs"]["student_files"]
    assert distilling.events() and load_json(os.path.join(student, "stage.json"))["steps"] == 5
    # The next stage works on the cached student (and tunes the reference's prompt).
    run0 = str(tmp_path / "run0")
    job = Job(forkserver, tmp_path, "tune", ["tune", *tiny_run_inputs(run0), *FLAGS], cache)
    assert job.wait() == 0, job.describe()
    assert sha256(os.path.join(run0, "source_prompt", "adapter_model.safetensors")) == \
        reference["outputs"]["source_prompt"]


def test_a_distillation_killed_while_another_waits_is_finished_by_the_waiting_one(forkserver, reference,
                                                                                  tiny_run_inputs, tmp_path):
    cache = str(tmp_path / "cache")
    release = str(tmp_path / "release")
    events = reference["events"]["distill"]
    pause_at = next(e["index"] for e in events if e["path"].endswith(".partial"))
    skip = known_bug_windows(events)
    kill_at = random.Random(f"{SEED}-handover").choice([e["index"] for e in events
                                                        if e["index"] > pause_at and e["index"] not in skip])
    first = Job(forkserver, tmp_path, "first", ["distill", *tiny_run_inputs(str(tmp_path / "run0")), *FLAGS], cache,
                pause={"stage": "distill", "index": pause_at, "until": release},
                kill={"stage": "distill", "index": kill_at})
    assert first.wait_for(lambda events: any(e.get("paused") for e in events)), first.describe()
    second = Job(forkserver, tmp_path, "second", ["distill", *tiny_run_inputs(str(tmp_path / "run1")), *FLAGS], cache)
    end = time.time() + JOB_TIMEOUT
    while "waiting" not in second.output() and time.time() < end:
        assert second.process.is_alive(), second.describe()
        time.sleep(0.05)
    open(release, "w").close()
    assert first.wait() == -signal.SIGKILL, first.describe()
    # The lock died with its holder: the waiting job takes over, resumes the distillation and publishes it.
    assert second.wait() == 0, second.describe()
    student = student_dir(cache)
    assert sha256(os.path.join(student, "model.safetensors")) == reference["outputs"]["student"], \
        f"killed at distill #{kill_at}"
    assert listing(student) == reference["outputs"]["student_files"]
