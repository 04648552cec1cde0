"""`peft-post run --task_kind generation` end to end on tiny models: every stage, the report in exact match and token
F1 with its intervals, reuse, both continuations, and bad input refused before any work."""

import json
import os

import pytest
from conftest import build_tiny_run_inputs
from peft_post.cli import main
from peft_post.testing import tiny_generation_rows

TEMPLATE = "Review: {text}\nIn short:"


@pytest.fixture
def generation_run(tmp_path, tokenizer, monkeypatch):
    """`tiny_run`'s world with generation rows (an answer column) and the generation task's flags."""
    monkeypatch.setenv("PEFT_POST_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    flags = build_tiny_run_inputs(tmp_path, tokenizer, rows=tiny_generation_rows)(str(run_dir))
    flags += ["--task_kind", "generation", "--template", TEMPLATE, "--max_answer_tokens", "4",
              "--prompt_init_text", "say the mood in two words"]
    return run_dir, flags


def test_generation_runs_end_to_end_and_reports_exact_match(generation_run):
    run_dir, flags = generation_run
    assert main(["run", *flags, "--full_baseline", "true", "--dp", "false"]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task_kind"] == "generation"
    methods = ("zero_shot", "student_prompt", "direct_transfer", "post", "full_prompt_tuning")
    assert all(0.0 <= report["accuracy"][m] <= 1.0 for m in methods)
    assert set(report["token_f1"]) == set(methods)
    # The exact-match rate is the mean of the per-example bits the report's intervals resample.
    bits = report["per_example_correct"]["post"]
    assert len(bits) == 10 and bits.count("1") / 10 == report["accuracy"]["post"]
    md = (run_dir / "report.md").read_text()
    assert "## Exact match" in md and "Token F1 (%)" in md and "Gap closed" in md
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["results"]["post"]["metric"] == "exact_match"
    transfer = json.loads((run_dir / "transferred_prompt" / "stage.json").read_text())
    assert transfer["alpha_method"] == "heuristic" and transfer["alpha_check"]["metric"] == "exact_match"
    config = json.loads((run_dir / "transferred_prompt" / "post_config.json").read_text())
    assert config["task_kind"] == "generation" and config["provenance"]["continuation"] == "source_greedy"
    # A second run reuses every stage and reports the same numbers.
    assert main(["run", *flags, "--full_baseline", "true", "--dp", "false"]) == 0
    again = json.loads((run_dir / "report.json").read_text())
    assert again["accuracy"] == report["accuracy"] and all(s["reused"] for s in again["stages"])


def test_generation_with_dp_and_public_answers(generation_run):
    run_dir, flags = generation_run
    assert main(["run", *flags, "--transfer_continuation", "public_answers", "--transfer_alpha", "0.5"]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["privacy"]["epsilon"] <= 8.0 + 1e-6 and report["task_kind"] == "generation"
    config = json.loads((run_dir / "transferred_prompt" / "post_config.json").read_text())
    assert config["provenance"]["continuation"] == "public_answers" and config["privacy"] is not None


@pytest.mark.parametrize("change,words", [
    (["--answer_column", "reply"], ["--answer_column", "'reply'"]),
    (["--transfer_alpha_method", "agreement"], ["transfer_alpha_method", "generation"]),
    (["--template", "{text} It was {mask}."], ["generation"]),
    (["--max_answer_tokens", "0"], ["max_answer_tokens"]),
    (["--transfer_continuation", "teacher"], ["transfer_continuation"]),
])
def test_bad_generation_input_is_refused_before_any_work(generation_run, capsys, change, words):
    run_dir, flags = generation_run
    assert main(["run", *flags, *change]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not os.path.exists(run_dir / "report.json")


@pytest.mark.parametrize("command", ["audit", "audit-dp"])
def test_audits_refuse_a_generation_task_before_any_work(generation_run, capsys, command):
    run_dir, flags = generation_run
    assert main([command, *flags]) == 2
    assert "classification" in capsys.readouterr().err
    assert not os.path.exists(run_dir)


def test_a_score_is_keyed_by_the_task_kind_and_answer_budget(generation_run):
    """The same folder, template and data scored as classification and as generation (or with another answer budget)
    never share a cached score."""
    from transformers import HfArgumentParser

    from peft_post.pipeline import PipelineConfig
    from peft_post.pipeline.store import evaluation_key

    run_dir, flags = generation_run
    keys = set()
    for change in ([], ["--max_answer_tokens", "6"], ["--task_kind", "classification"]):
        (cfg,) = HfArgumentParser(PipelineConfig).parse_args_into_dataclasses(args=[*flags, *change])
        keys.add(evaluation_key(cfg, "target", "zero_shot", None, "sha"))
    assert len(keys) == 3
