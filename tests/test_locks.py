"""One job per run folder, one distillation per student: the locks (issue 21, item 1)."""

import os
import threading
import time

import pytest
from filelock import FileLock

from peft_post.cli import main
from peft_post.pipeline import LOCK_FILE, RunFolderBusy, run_folder_lock, student_cache_lock


def test_a_second_job_on_a_run_folder_is_refused_with_a_message(tmp_path):
    run_dir = str(tmp_path / "run")
    with run_folder_lock(run_dir):
        with pytest.raises(RunFolderBusy, match="Another job is using the run folder .*--run_dir"):
            with run_folder_lock(run_dir):
                pass
    with run_folder_lock(run_dir):  # released when the holder is done
        pass


def test_the_cli_exits_2_before_any_stage_while_another_job_holds_the_folder(tiny_run, capsys):
    run_dir, args = tiny_run
    os.makedirs(run_dir)
    with FileLock(os.path.join(run_dir, LOCK_FILE)):  # another process's lock looks the same
        assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "Another job is using the run folder" in err and "Traceback" not in err
    assert sorted(os.listdir(run_dir)) == [LOCK_FILE], "nothing was written by the refused job"


def test_a_second_distillation_of_the_same_student_waits_for_the_first(tmp_path):
    folder = str(tmp_path / "students" / "key")
    order = []

    def first():
        with student_cache_lock(folder):
            order.append("first in")
            time.sleep(0.5)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    while not order:
        time.sleep(0.01)
    start = time.perf_counter()
    with student_cache_lock(folder):
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"] and time.perf_counter() - start >= 0.3
