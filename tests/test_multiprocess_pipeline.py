"""`peft-post run` under `accelerate launch` with 2 CPU processes (gloo): one job, one set of stage folders.

The tiny pipeline (tests/conftest.py) is launched with 2 processes, DP on. It must distil, tune, transfer, evaluate
and report once, as one job: every stage folder finished and none left half-written, the report recording the 2
processes, the DP ledger of the global batch (q = tune_batch_size / N, not twice it), and the student cached under
the key one process computes (the batch sizes are global, so the world size is not part of any key). A second launch
reuses every stage, so does one process, and a launch whose settings differ is refused on both processes before any
work. A launch killed inside DP tuning resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from peft_post.pipeline import PipelineConfig
from peft_post.pipeline.store import STAGE_FILE, student_folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _launch(argv: list, cache: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "peft_post.cli", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PEFT_POST_CACHE": cache}
    start = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"2-process launch of {argv[0]}: {time.time() - start:.1f} s")
    return done


@pytest.fixture(scope="module")
def launched(tiny_run_inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("mp-pipeline")
    run_dir, cache = str(root / "run"), str(root / "cache")
    argv = ["run", *tiny_run_inputs(run_dir), "--dp", "true"]
    first = _launch(argv, cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    return {"run_dir": run_dir, "cache": cache, "argv": argv, "first": first}


def test_two_processes_run_the_pipeline_as_one_job(launched, monkeypatch):
    run_dir = launched["run_dir"]
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["num_processes"] == 2
    assert "- processes: 2" in open(os.path.join(run_dir, "report.md"), encoding="utf-8").read()
    assert {s["name"] for s in report["stages"]} == {"distill", "tune", "transfer", "evaluate"}
    assert not any(s["reused"] for s in report["stages"])
    # Each stage published once: finished folders, nothing half-written left beside them.
    for folder in ("source_prompt", "transferred_prompt"):
        assert os.path.isfile(os.path.join(run_dir, folder, "adapter_model.safetensors")), folder
    assert os.path.isfile(os.path.join(run_dir, "transferred_prompt", STAGE_FILE))
    assert not [name for name in os.listdir(run_dir) if name.endswith(".partial")]
    # The ledger of the global batch: q = tune_batch_size (8) / N (24) whatever the number of processes.
    ledger = report["privacy"]
    assert ledger["sample_rate"] == pytest.approx(8 / 24)
    assert ledger["steps"] == 3 and ledger["guarantee_holds"] and ledger["noise_source"] == "os_entropy"
    # The student is cached under the key a one-process run computes for the same settings.
    monkeypatch.setenv("PEFT_POST_CACHE", launched["cache"])
    cfg = PipelineConfig.from_run_dir(run_dir)
    from peft_post.assets import resolve_model

    student = student_folder(cfg, resolve_model(cfg.target_model))
    assert os.path.isfile(os.path.join(student, STAGE_FILE))
    assert sorted(os.listdir(os.path.dirname(student))) == sorted([os.path.basename(student),
                                                                   os.path.basename(student) + ".lock"])


def test_a_second_launch_reuses_every_stage_and_a_changed_one_is_refused_on_both_processes(launched, monkeypatch):
    run_dir = launched["run_dir"]
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        before = json.load(f)
    again = _launch(launched["argv"], launched["cache"])
    assert again.returncode == 0, again.stderr[-6000:]
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        after = json.load(f)
    assert all(s["reused"] for s in after["stages"])
    assert after["accuracy"] == before["accuracy"] and after["privacy"] == before["privacy"]

    # The world size is in no key: one process reuses every stage the two made.
    from peft_post.cli import main

    monkeypatch.setenv("PEFT_POST_CACHE", launched["cache"])
    assert main(launched["argv"]) == 0
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        alone = json.load(f)
    assert all(s["reused"] for s in alone["stages"]) and alone["num_processes"] == 1
    assert alone["accuracy"] == before["accuracy"]

    changed = _launch([*launched["argv"], "--tune_learning_rate", "0.5"], launched["cache"])
    assert changed.returncode != 0
    # Refused by the main process's check, and the other process stops with the same message instead of waiting.
    output = changed.stdout + changed.stderr
    assert output.count("tune_learning_rate") >= 2, output[-4000:]
    assert "The main process of this job refused" in output, output[-4000:]


def test_a_killed_two_process_launch_resumes_dp_tuning_from_its_checkpoint(launched, tiny_run_inputs, tmp_path):
    run_dir = str(tmp_path / "run")
    # 40 DP steps with checkpoints every 2: the job is killed at the first one, long before the stage ends. The student
    # is the one the module's first launch cached.
    argv = ["run", *tiny_run_inputs(run_dir), "--dp", "true", "--tune_max_steps", "40"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "peft_post.cli", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PEFT_POST_CACHE": launched["cache"]}
    checkpoint = os.path.join(run_dir, "private", "tune.partial", "checkpoints", "checkpoint-2")
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
            assert job.poll() is None and time.time() < deadline, "the launch ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        # The launcher and both workers, uncatchable (torch's elastic agent starts the workers in sessions of their
        # own, so killing the launcher's process group would leave them running).
        import psutil

        tree = [job.pid, *(p.pid for p in psutil.Process(job.pid).children(recursive=True))]
        for pid in tree:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        job.wait()
        psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=30)
    assert not os.path.isfile(os.path.join(run_dir, "private", "tune.json"))  # killed inside the stage

    resumed = _launch(argv, launched["cache"])
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert "Resuming from" in resumed.stdout and "checkpoint-" in resumed.stdout, resumed.stdout[-3000:]
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        ledger = json.load(f)["privacy"]
    # The accountant resumed with the checkpoint's history: 40 steps in all, not 40 more.
    assert ledger["steps"] == 40 and sum(n for _, _, n in ledger["history"]) == 40 and ledger["guarantee_holds"]


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused_before_any_work(tiny_run, monkeypatch):
    from peft_post.cli import main

    run_dir, flags = tiny_run
    # What a 3-process launch sets: the config is refused as it is parsed, before the process group is joined.
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["run", *flags, "--tune_batch_size", "8"]) == 2
    assert not os.path.exists(os.path.join(run_dir, "config.json"))


@pytest.mark.parametrize("command", ["push", "audit", "audit-dp"])
def test_the_single_process_commands_are_refused_under_a_launch(command, monkeypatch, capsys):
    from peft_post.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([command, "--run_dir", "nowhere"]) == 2
    assert f"`peft-post {command}` runs on one process" in capsys.readouterr().err
