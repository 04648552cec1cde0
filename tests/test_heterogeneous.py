"""A ready student (`--student_model`) that is not a slice of the target.

Another hidden size: POST maps through the output distributions, so the run goes on and reports direct transfer
(which pastes p_s into the target's input embeddings) as not applicable. Another tokenizer: refused before any stage,
naming `--student_model`, instead of an `IndexError` in the transfer's α step.
"""

import copy
import json
import os

import pytest
from peft import get_peft_model
from transformers import AutoModelForCausalLM, HfArgumentParser

from peft_post.cli import main
from peft_post.pipeline import PipelineConfig, public_splits, transfer_prompt
from peft_post.testing import build_tiny_model, tiny_config, tiny_model

# Warnings every run printed before, none of which the user could act on (issue 21, item 9).
NOISE = ("`is_gradient_checkpointing` is deprecated", "Optimal order", "1/N")


def test_a_wider_student_runs_to_a_report_where_direct_transfer_is_not_applicable(tiny_run, tokenizer, tmp_path,
                                                                                  recwarn):
    run_dir, args = tiny_run
    student = str(tmp_path / "wide-student")
    build_tiny_model("llama", tokenizer, student, num_layers=2, hidden_size=64)  # the target is 32 wide
    assert main(["run", *args, "--student_model", student]) == 0
    noisy = [str(w.message) for w in recwarn if any(n in str(w.message) for n in NOISE)]
    assert noisy == []  # the default δ = 1/N is stated in the report instead

    reason = "hidden sizes differ: 64 vs 32"
    report = json.loads(open(os.path.join(run_dir, "report.json")).read())
    assert report["accuracy"]["direct_transfer"] is None
    assert report["not_applicable"] == {"direct_transfer": reason}
    assert report["derived"]["post_gain_over_direct_transfer"] is None
    for method in ("zero_shot", "student_prompt", "post"):
        assert 0 <= report["accuracy"][method] <= 1
    evaluation = json.loads(open(os.path.join(run_dir, "evaluation.json")).read())["results"]
    assert evaluation["direct_transfer"] == {"accuracy": None, "not_applicable": reason}
    md = open(os.path.join(run_dir, "report.md")).read()
    assert f"| Direct transfer: p_s pasted into the target | n/a ({reason}) | — |" in md
    assert "δ = 1/N (N = 24 training examples), the default" in md
    assert not os.path.exists(os.path.join(os.environ["PEFT_POST_CACHE"], "students"))  # none distilled

    # Run again: every stage and the evaluation are reused, n/a included.
    assert main(["run", *args, "--student_model", student]) == 0
    again = json.loads(open(os.path.join(run_dir, "report.json")).read())
    assert again["accuracy"] == report["accuracy"] and again["not_applicable"] == report["not_applicable"]


def test_a_chosen_delta_above_one_over_n_still_warns(tiny_run):
    run_dir, args = tiny_run
    with pytest.warns(UserWarning, match="1/N"):
        assert main(["run", *args, "--dp_target_delta", "0.1", "--transfer_max_steps", "1"]) == 0
    md = open(os.path.join(run_dir, "report.md")).read()
    assert "| 0.1 |" in md and "the default and the paper's convention" not in md


def test_a_student_on_another_tokenizer_is_refused_before_any_stage(tiny_run, tokenizer, tmp_path, capsys):
    run_dir, args = tiny_run
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["zzqx", "qqzx", "xzzq"])
    student = str(tmp_path / "other-vocab-student")
    build_tiny_model("llama", other, student, num_layers=2)
    assert main(["run", *args, "--student_model", student]) == 2
    err = capsys.readouterr().err
    assert f"--student_model {student!r} does not use the target's tokenizer" in err
    assert "tokenizers differ in size (403 vs 400 tokens)" in err
    assert "leave --student_model unset" in err
    for folder in ("source_prompt", "transferred_prompt", "evaluation.json"):
        assert not os.path.exists(os.path.join(run_dir, folder))


def test_the_alpha_step_checks_the_vocabularies_first(tiny_run, tokenizer, tmp_path):
    # A student with fewer logits than the target's tokenizer has tokens: the α heuristic scores it on the target's
    # token ids, which used to stop on an IndexError in its embedding.
    _, args = tiny_run
    cfg = HfArgumentParser(PipelineConfig).parse_args_into_dataclasses(args=[*args, "--dp", "false"])[0]
    small = AutoModelForCausalLM.from_config(tiny_config("llama", 300, pad_token_id=tokenizer.pad_token_id))
    source = get_peft_model(small, cfg.post_config())
    target = get_peft_model(tiny_model("llama", tokenizer), cfg.post_config())
    public_train, public_eval = public_splits(cfg)
    with pytest.raises(ValueError, match=r"vocabularies differ \(300 vs 400 logits\)"):
        transfer_prompt(cfg, target, source, tokenizer, public_train, public_eval, str(tmp_path / "transfer"))
