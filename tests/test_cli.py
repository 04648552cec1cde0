import json
import os
import shutil

import pytest
from transformers import HfArgumentParser

from peft_post import POSTConfig
from peft_post.cli import main
from peft_post.pipeline import PipelineConfig, copy_stage, stage_record


def test_run_end_to_end_then_resume_skips_finished_stages(tiny_run, capsys):
    run_dir, args = tiny_run
    assert main(["run", *args]) == 0
    assert "POST" in capsys.readouterr().out
    first = json.loads(open(os.path.join(run_dir, "report.json")).read())
    assert first["accuracy"]["full_prompt_tuning"] is None
    assert not os.path.exists(os.path.join(run_dir, "full_prompt"))

    # Adding the baseline runs only the new stage (and the evaluation); the others are reused as they are.
    mtime = os.path.getmtime(os.path.join(run_dir, "transferred_prompt", "stage.json"))
    assert main(["run", *args, "--full_baseline", "true"]) == 0
    report = json.loads(open(os.path.join(run_dir, "report.json")).read())
    for stage, name in (("tune", "source_prompt"), ("transfer", "transferred_prompt"), ("full_tuning", "full_prompt")):
        assert stage_record(run_dir, stage) is not None
        assert os.path.isfile(os.path.join(run_dir, name, "adapter_model.safetensors"))
        assert not os.path.exists(os.path.join(run_dir, name + ".partial"))
    # The user stages keep their records in the private workspace, and no checkpoint is left behind.
    assert sorted(os.listdir(os.path.join(run_dir, "private"))) == [
        "data_overlap.json", "full_tuning.json", "test_scores.json", "tune.json"]
    assert os.path.getmtime(os.path.join(run_dir, "transferred_prompt", "stage.json")) == mtime
    assert os.path.isfile(os.path.join(run_dir, "report.md")) and os.path.isfile(os.path.join(run_dir, "report.png"))
    evaluation = json.loads(open(os.path.join(run_dir, "evaluation.json")).read())
    for method in ("zero_shot", "student_prompt", "direct_transfer", "post", "full_prompt_tuning"):
        assert report["accuracy"][method] == evaluation["results"][method]["accuracy"]
        assert evaluation["results"][method]["num_examples"] == report["num_test_examples"] == 10
    for method in ("zero_shot", "student_prompt", "direct_transfer", "post"):
        assert report["accuracy"][method] == first["accuracy"][method]
    ledger = report["privacy"]
    assert ledger["accountant"] == "pld" and ledger["steps"] == 3 and ledger["epsilon"] <= 8.0
    stages = {s["name"]: s["reused"] for s in report["stages"]}
    assert stages == {"distill": True, "tune": True, "transfer": True, "full_tuning": False, "evaluate": False}
    md = open(os.path.join(run_dir, "report.md")).read()
    assert f"{100 * report['accuracy']['post']:.1f}" in md

    assert main(["run", *args, "--full_baseline", "true"]) == 0
    again = json.loads(open(os.path.join(run_dir, "report.json")).read())
    assert all(s["reused"] for s in again["stages"])
    assert again["accuracy"] == report["accuracy"]
    # A reused stage reports the wall time and peak memory measured when it ran.
    for runs in (first, report):
        assert all(s["peak_memory_mb"] > 0 for s in runs["stages"])
    assert [(s["wall_time_s"], s["peak_memory_mb"]) for s in again["stages"]] == \
        [(s["wall_time_s"], s["peak_memory_mb"]) for s in report["stages"]]


def test_a_copied_source_prompt_is_reused_with_its_test_scores(tiny_run, tmp_path, monkeypatch):
    # An α sweep: the source prompt is copied into a new run (`copy_stage`: the folder, its private record and its
    # cached test scores), which then only transfers and scores POST (and zero-shot, cached per run).
    import peft_post.evaluation

    run_dir, args = tiny_run
    assert main(["run", *args, "--transfer_alpha", "1.0"]) == 0
    first = json.loads(open(os.path.join(run_dir, "report.json")).read())
    scores = json.loads(open(os.path.join(run_dir, "private", "test_scores.json")).read())
    source_scores = scores[stage_record(run_dir, "tune")["adapter_sha256"]]
    assert len(source_scores) == 2  # student p_s and direct transfer
    sweep = str(tmp_path / "alpha0")
    assert copy_stage(run_dir, sweep, "tune") and not copy_stage(run_dir, sweep, "full_tuning")
    scored = []
    evaluate_prompt = peft_post.evaluation.evaluate_prompt
    monkeypatch.setattr(peft_post.evaluation, "evaluate_prompt",
                        lambda *a, desc=None, **kw: scored.append(desc) or evaluate_prompt(*a, desc=desc, **kw))
    argv = [*args, "--transfer_alpha", "0.0", "--transfer_cache_top_k", "2"]
    argv[argv.index("--run_dir") + 1] = sweep
    assert main(["run", *argv]) == 0
    assert scored == ["zero-shot", "POST"]
    provenance = POSTConfig.from_pretrained(os.path.join(sweep, "transferred_prompt")).provenance
    assert (provenance["cache"], provenance["top_k"], provenance["alpha"]) == ("top_k", 2, 0.0)
    report = json.loads(open(os.path.join(sweep, "report.json")).read())
    assert {s["name"]: s["reused"] for s in report["stages"]} == {
        "distill": True, "tune": True, "transfer": False, "evaluate": False}
    swept = json.loads(open(os.path.join(sweep, "private", "test_scores.json")).read())
    assert swept[stage_record(sweep, "tune")["adapter_sha256"]] == source_scores
    for method in ("zero_shot", "student_prompt", "direct_transfer"):
        assert report["accuracy"][method] == first["accuracy"][method]
    assert report["transfer_alpha"] == 0.0 and first["transfer_alpha"] == 1.0


def test_a_baseline_copied_into_a_finished_run_is_scored_from_its_cache(tiny_run, tmp_path):
    run_dir, args = tiny_run
    assert main(["run", *args, "--full_baseline", "true"]) == 0
    with_baseline = json.loads(open(os.path.join(run_dir, "report.json")).read())
    other = str(tmp_path / "other")
    assert copy_stage(run_dir, other, "tune")
    argv = list(args)
    argv[argv.index("--run_dir") + 1] = other
    assert main(["run", *argv]) == 0
    assert json.loads(open(os.path.join(other, "report.json")).read())["accuracy"]["full_prompt_tuning"] is None
    # The prompt folder alone is not a finished stage: without its private record it would be tuned again.
    shutil.copytree(os.path.join(run_dir, "full_prompt"), os.path.join(other, "full_prompt"))
    assert stage_record(other, "full_tuning") is None
    assert copy_stage(run_dir, other, "full_tuning")
    assert main(["run", *argv, "--full_baseline", "true"]) == 0
    report = json.loads(open(os.path.join(other, "report.json")).read())
    assert {s["name"]: s["reused"] for s in report["stages"]} == {
        "distill": True, "tune": True, "transfer": True, "full_tuning": True, "evaluate": False}
    assert report["accuracy"]["full_prompt_tuning"] == with_baseline["accuracy"]["full_prompt_tuning"]


def test_stage_subcommands_need_earlier_stages(tiny_run, capsys):
    run_dir, args = tiny_run
    assert main(["transfer", *args]) == 2
    assert "run `peft-post tune` first" in capsys.readouterr().err
    assert main(["tune", *args]) == 0
    assert stage_record(run_dir, "tune") is not None
    assert not os.path.exists(os.path.join(run_dir, "transferred_prompt"))


def test_config_file_and_overrides(tmp_path, tiny_run):
    run_dir, args = tiny_run
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"transfer_alpha": 0.3, "dp": False}))
    from peft_post.cli import _parse

    cfg = _parse(PipelineConfig, ["--config", str(path), *args, "--transfer_alpha", "0.6"], "peft-post run")
    assert cfg.transfer_alpha == 0.6 and cfg.dp is False and cfg.run_dir == run_dir
    # The old names (before each field carried its stage's prefix) still work, in files and on the command line.
    path.write_text(yaml.safe_dump({"alpha": 0.3, "target_epsilon": 2.0}))
    with pytest.warns(FutureWarning, match="now called `transfer_alpha`"):
        cfg = _parse(PipelineConfig, ["--config", str(path), *args], "peft-post run")
    assert (cfg.transfer_alpha, cfg.dp_target_epsilon) == (0.3, 2.0)
    with pytest.warns(FutureWarning, match="now `--transfer_temperature`"):
        cfg = _parse(PipelineConfig, [*args, "--temperature=3", "--accountant", "pld"], "peft-post run")
    assert (cfg.transfer_temperature, cfg.dp_accountant) == (3.0, "pld")
    path.write_text(yaml.safe_dump({"not_a_field": 1}))
    with pytest.raises(SystemExit):
        _parse(PipelineConfig, ["--config", str(path)], "peft-post run")


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--transfer_alpha", "1.5"], "transfer_alpha"),
        (["--dp_target_epsilon", "0"], "dp_target_epsilon"),
        (["--transfer_learning_rate", "0"], "transfer_learning_rate"),
        (["--student_layers", "a,b"], "student_layers"),
        (["--preset", "huge"], "preset"),
        (["--label_words", "good"], "label_words"),
        (["--tune_max_steps", "0"], "tune_max_steps"),
        (["--transfer_cache_top_k", "0"], "transfer_cache_top_k"),
        (["--max_private_overlap", "1.5"], "max_private_overlap"),
    ],
)
def test_bad_arguments_fail_before_any_work(flags, match, capsys, tmp_path):
    assert main(["run", "--run_dir", str(tmp_path / "r"), *flags]) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")


def test_help_for_every_command(capsys):
    assert main(["--help"]) == 0
    for command in ("run", "distill", "tune", "transfer", "evaluate", "push"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"peft-post {command}" in capsys.readouterr().out


def test_every_config_dataclass_renders_argparse_help():
    """argparse formats help with %: a bare '%' in any help string breaks `--help` of the CLI and the examples."""
    from transformers import HfArgumentParser

    from peft_post import DistillationConfig, DPConfig, PromptTrainingConfig, TransferConfig

    for cls in (PipelineConfig, PromptTrainingConfig, DPConfig, TransferConfig, DistillationConfig):
        assert HfArgumentParser(cls).format_help()


def test_distill_records_the_students_public_zero_shot_accuracy(tiny_run, tmp_path):
    import glob

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_post.evaluation import evaluate_prompt
    from peft_post.pipeline import public_splits

    run_dir, args = tiny_run
    assert main(["distill", *args]) == 0
    (stage,) = glob.glob(str(tmp_path / "cache" / "students" / "*" / "stage.json"))
    record = json.loads(open(stage).read())["public_zero_shot"]
    cfg = HfArgumentParser(PipelineConfig).parse_args_into_dataclasses(args=args)[0]
    _, public_eval = public_splits(cfg)
    folder = os.path.dirname(stage)
    expected = evaluate_prompt(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                               public_eval, cfg.post_config(folder), batch_size=8, disable_progress=True)
    assert record["num_examples"] == 8 == expected["num_examples"]
    assert record["accuracy"] == expected["accuracy"] and record["per_class"] == {
        str(c): v for c, v in expected["per_class"].items()}
    # The helpers benchmarks use to find this student and the public examples no stage saw.
    from peft_post.assets import resolve_model
    from peft_post.pipeline import public_pool, student_folder

    assert student_folder(cfg, resolve_model(cfg.target_model)) == folder
    pool, (public_train, _) = public_pool(cfg), public_splits(cfg)
    n_train, n_eval = len(public_train), len(public_eval)
    assert pool["text"][:n_train] == public_train["text"] and pool["text"][n_train:n_train + n_eval] == public_eval["text"]
    assert not cfg.masked and PipelineConfig(template="{text} It was {mask}.").masked
