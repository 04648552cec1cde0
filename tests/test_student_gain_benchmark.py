"""benchmarks/student_gain.py on a tiny finished run: the unprompted student scored on the run's own test examples,
paired with the report's p_s results, once per student and test set."""

import json
import os
import shutil

import pytest

from benchmarks import student_gain
from peft_post.cli import main as cli_main
from peft_post.report import correctness_vector


def test_the_prompt_is_compared_with_the_unprompted_student_on_the_same_examples(tiny_run, tmp_path, monkeypatch):
    run_dir, flags = tiny_run
    assert cli_main(["run", *flags, "--dp", "false"]) == 0
    again = str(tmp_path / "copy")
    shutil.copytree(run_dir, again)
    calls = []
    score_methods = student_gain.score_methods

    def counted(cfg, tokenizer, test, models):
        calls.append(len(test))
        return score_methods(cfg, tokenizer, test, models)

    monkeypatch.setattr(student_gain, "score_methods", counted)
    out = str(tmp_path / "gain.json")
    assert student_gain.main(["--runs", run_dir, again, "--out", out]) == 0
    result = json.loads(open(out).read())
    report = json.loads(open(os.path.join(run_dir, "report.json")).read())
    first, second = result["rows"]
    # Scored once for the two runs of one student and test set, on every test example the report scored.
    bits = correctness_vector(report["per_example_correct"]["student_prompt"])
    assert calls == [bits.size] and first["num_test_examples"] == bits.size
    assert first["student_prompt"] == report["accuracy"]["student_prompt"] == pytest.approx(bits.mean())
    assert first["gain"] == pytest.approx(first["student_prompt"] - first["student_zero_shot"])
    lo, hi = first["gain_ci"]
    assert lo <= first["gain"] <= hi and first["verdict"] == ("beats" if lo > 0 else "below" if hi < 0
                                                             else "within_noise")
    assert {k: v for k, v in second.items() if k != "run"} == {k: v for k, v in first.items() if k != "run"}
    assert first["dp"] is False and first["epsilon"] is None
    assert result["command"].startswith("python benchmarks/student_gain.py --runs")
    assert str(tmp_path) not in json.dumps(result["rows"])


def test_a_folder_without_a_report_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no report.json"):
        student_gain.main(["--runs", str(tmp_path)])
