"""benchmarks/headroom.py on tiny models: the pipeline's full_tuning stage, then zero-shot and the tuned prompt scored
on the same test examples and paired; a rerun reads the stage back and replaces its task's row."""

import json
import os

import pytest

from benchmarks import headroom
from peft_post.report import correctness_vector


def _as_set_flags(flags):
    pairs = dict(zip(flags[::2], flags[1::2]))
    pairs.pop("--run_dir")
    return [f"--set={k[2:]}={v}" for k, v in pairs.items()]


def test_headroom_pairs_zero_shot_with_full_prompt_tuning_and_resumes(tiny_run, tmp_path, monkeypatch):
    _, flags = tiny_run
    run_dir, out = str(tmp_path / "headroom"), str(tmp_path / "headroom.json")
    argv = ["--run-dir", run_dir, "--out", out, *_as_set_flags(flags)]
    scored = []
    score_methods = headroom.score_methods

    def recorded(cfg, tokenizer, test, models):
        scores = score_methods(cfg, tokenizer, test, models)
        scored.append(scores)
        return scores

    monkeypatch.setattr(headroom, "score_methods", recorded)
    assert headroom.main(argv) == 0
    (row,) = json.loads(open(out).read())["rows"]
    scores = scored[0]
    assert set(scores) == {"zero_shot", "full_prompt_tuning"} and row["num_test_examples"] == 10
    for method in scores:
        assert row[method] == scores[method]["accuracy"] == pytest.approx(
            correctness_vector(scores[method]["per_example_correct"]).mean())
    assert row["headroom"] == pytest.approx(row["full_prompt_tuning"] - row["zero_shot"])
    lo, hi = row["headroom_ci"]
    assert lo <= row["headroom"] <= hi
    # The task's flags win over the recipe's preset; the tuning ran the steps they give, without DP.
    assert row["recipe"]["full_tuning_max_steps"] == row["full_tuning_steps"] == 3
    assert row["recipe"]["full_tuning_batch_size"] == 8
    assert row["full_tuning_reused"] is False and os.path.isdir(os.path.join(run_dir, "full_prompt"))
    assert row["precision"]["dtype"] == "float32"  # the suite pins the CPU probe to fp32
    # Paths are recorded as given (the command) or made portable (the rest).
    assert row["majority_class_rate"] >= 0.5 and str(tmp_path) not in json.dumps(
        {k: v for k, v in row.items() if k != "command"})
    assert row["command"].startswith("python benchmarks/headroom.py --run-dir")
    # A rerun reads the stage back, scores the same prompt and replaces its task's row.
    assert headroom.main(argv) == 0
    (again,) = json.loads(open(out).read())["rows"]
    assert again["full_tuning_reused"] is True
    assert {k: v for k, v in again.items() if "wall_time" not in k and k != "full_tuning_reused"} == {
        k: v for k, v in row.items() if "wall_time" not in k and k != "full_tuning_reused"}


def test_the_benchmark_refuses_to_let_set_change_what_it_measures(tmp_path):
    with pytest.raises(SystemExit, match="sets dp itself"):
        headroom.main(["--run-dir", str(tmp_path / "r"), "--set", "dp=true"])
