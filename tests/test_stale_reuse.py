"""Issue 21: a finished stage is reused only under the settings that made it and only while its outputs are the bytes
it wrote; --overwrite reruns a stage and what depends on it; damaged files are named; full_tuning stands alone."""

import json
import os
import shutil

import pytest
import torch
from datasets import Dataset, DatasetDict

from peft_post import POSTConfig
from peft_post.cli import main
from peft_post.pipeline import PipelineConfig, stage_record, student_folder
from peft_post.testing import tiny_sentiment_rows


def _with(args, name, value):
    args = list(args)
    if name in args:
        args[args.index(name) + 1] = value
    else:
        args += [name, value]
    return args


def _stages(run_dir) -> dict:
    report = json.loads(open(os.path.join(run_dir, "report.json")).read())
    return {s["name"]: s["reused"] for s in report["stages"]}


def _refused(capsys, argv, *names) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, (name, err)
    return err


def _damage(path, how):
    """Truncate `path` (how='truncate') or overwrite it with text that is not JSON ('garble'); returns a restorer."""
    data = open(path, "rb").read()
    stat = os.stat(path)
    open(path, "wb").write(data[: len(data) // 2] if how == "truncate" else b"{not json")

    def restore():
        open(path, "wb").write(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    return restore


def test_changed_settings_are_refused_naming_the_fields_and_overwrite_reruns_the_stage_and_its_dependants(
        tiny_run, capsys, monkeypatch):
    import peft_post.evaluation

    run_dir, args = tiny_run
    args = [*args, "--full_baseline", "true"]
    assert main(["run", *args]) == 0
    capsys.readouterr()
    config = open(os.path.join(run_dir, "config.json")).read()
    report = open(os.path.join(run_dir, "report.json")).read()
    tune = stage_record(run_dir, "tune")
    assert tune["settings_key"] and tune["settings"]["dp"] is True and "adapter_model.safetensors" in tune["outputs"]
    assert "source_prompt_sha256" in stage_record(run_dir, "transfer")["settings"]

    # The case: other DP settings and another test cap on a finished run folder.
    err = _refused(capsys, ["run", *args, "--dp_target_epsilon", "1", "--dp", "false", "--max_test_examples", "50"],
                   "--dp True then, False now", "--dp_target_epsilon 8.0 then, (not set) now", "--overwrite tune",
                   "new --run_dir", os.path.join(run_dir, "source_prompt"))
    assert "max_test_examples" not in err  # the evaluation is keyed, not refused: it would be scored again
    assert open(os.path.join(run_dir, "config.json")).read() == config
    assert open(os.path.join(run_dir, "report.json")).read() == report
    # A stage subcommand follows the same rule; the transfer's own settings too.
    _refused(capsys, ["tune", *args, "--tune_learning_rate", "0.5"], "--tune_learning_rate 0.03 then, 0.5 now")
    _refused(capsys, ["transfer", *args, "--transfer_alpha", "0.5"], "--transfer_alpha None then, 0.5 now",
             "--overwrite transfer")
    _refused(capsys, ["run", *args, "--student_layers", "0,1"], "The tune stage", "--student_layers [0, 3] then")

    # Fields that shape no output change nothing; another test cap only scores again (from the cache when known).
    scored = []
    evaluate_prompt = peft_post.evaluation.evaluate_prompt
    monkeypatch.setattr(peft_post.evaluation, "evaluate_prompt",
                        lambda *a, desc=None, **kw: scored.append(desc) or evaluate_prompt(*a, desc=desc, **kw))
    threads = torch.get_num_threads()
    assert main(["run", *args, "--save_steps", "7", "--eval_batch_size", "3", "--threads", "1",
                 "--max_private_overlap", "0.5"]) == 0
    assert torch.get_num_threads() == threads and scored == []
    assert all(_stages(run_dir).values())
    assert main(["run", *args, "--max_test_examples", "4"]) == 0
    assert len(scored) == 5 and json.loads(open(os.path.join(run_dir, "report.json")).read())[
        "num_test_examples"] == 4
    assert {k for k, v in _stages(run_dir).items() if not v} == {"evaluate"}

    # --overwrite tune: tune, transfer and the evaluation run again; the student and the baseline are reused.
    full = stage_record(run_dir, "full_tuning")
    discarded = stage_record(run_dir, "tune")["privacy"]
    with pytest.warns(UserWarning, match="Discarding a DP prompt"):
        assert main(["run", *args, "--dp", "false", "--overwrite", "tune"]) == 0
    # The discarded DP prompt's ledger is kept: if it was handed over, the user must compose it with the new one's.
    kept = json.loads(open(os.path.join(run_dir, "private", "discarded_ledgers.json")).read())["ledgers"]
    assert [entry["privacy"] for entry in kept] == [discarded]
    assert _stages(run_dir) == {"distill": True, "tune": False, "transfer": False, "full_tuning": True,
                                "evaluate": False}
    assert stage_record(run_dir, "tune")["settings"]["dp"] is False and stage_record(run_dir, "full_tuning") == full
    assert json.loads(open(os.path.join(run_dir, "config.json")).read())["overwrite"] is None  # not for next time
    capsys.readouterr()
    assert main(["run", *args, "--dp", "false"]) == 0 and all(_stages(run_dir).values())

    # Records made before settings keys existed are reused as they are.
    for path in (os.path.join(run_dir, "private", "tune.json"), os.path.join(run_dir, "transferred_prompt",
                                                                               "stage.json")):
        record = json.loads(open(path).read())
        json.dump({k: v for k, v in record.items() if k not in ("settings", "settings_key", "outputs")},
                  open(path, "w"))
    assert main(["run", *args, "--dp", "true", "--transfer_temperature", "3"]) == 0
    assert {k for k, v in _stages(run_dir).items() if not v} == set()

    # The private data rebuilt in place: a new test split is scored again, a new training split refuses the tune.
    private = _flag(args, "--private_dataset")
    data = DatasetDict.load_from_disk(private)
    rebuilt = DatasetDict({"train": Dataset.from_list(data["train"].to_list()),  # in memory: the folder goes
                           "test": Dataset.from_list(tiny_sentiment_rows(10, seed=9))})
    shutil.rmtree(private)
    rebuilt.save_to_disk(private)
    scored.clear()
    assert main(["run", *args, "--dp", "true", "--transfer_temperature", "3"]) == 0
    assert len(scored) == 5 and {k for k, v in _stages(run_dir).items() if not v} == {"evaluate"}
    rebuilt = DatasetDict({"train": Dataset.from_list(tiny_sentiment_rows(24, seed=8)),
                           "test": Dataset.from_list(rebuilt["test"].to_list())})
    shutil.rmtree(private)
    rebuilt.save_to_disk(private)
    capsys.readouterr()
    _refused(capsys, ["run", *args, "--dp", "true", "--transfer_temperature", "3"], "The full_tuning stage",
             "the private training data (its texts and labels) changed")


def _flag(args, name):
    return args[args.index(name) + 1]


def test_damaged_outputs_and_checkpoints_are_refused_naming_the_file(tiny_run, capsys, monkeypatch):
    import peft_post.pipeline.stages as stages

    run_dir, args = tiny_run
    # An interrupted tune: its checkpoints stay in the private workspace.
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(stages, "release_user_stage", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
        main(["tune", *args])
    # The stage resumes from checkpoint-2 (checkpoint-3, at the last step, is finished and redone from it).
    checkpoint = os.path.join(run_dir, "private", "tune.partial", "checkpoints", "checkpoint-2")
    for name, how in (("adapter_model.safetensors", "truncate"), ("dp_accountant.json", "garble")):
        restore = _damage(os.path.join(checkpoint, name), how)
        _refused(capsys, ["tune", *args], os.path.join(checkpoint, name), "cannot resume", "--overwrite tune")
        restore()
    # Checkpoints made with other settings are not resumed under these.
    _refused(capsys, ["tune", *args, "--tune_max_steps", "4"], "tune.partial", "--tune_max_steps 3 then, 4 now")

    assert main(["run", *args]) == 0
    capsys.readouterr()
    source, transferred = os.path.join(run_dir, "source_prompt"), os.path.join(run_dir, "transferred_prompt")
    student = student_folder(PipelineConfig.from_run_dir(run_dir), _flag(args, "--target_model"))
    for folder, name, how, fix in (
            (source, "adapter_model.safetensors", "truncate", "--overwrite tune"),
            (source, "post_config.json", "garble", "--overwrite tune"),
            (source, "dp_accountant.json", "garble", "--overwrite tune"),
            (transferred, "adapter_model.safetensors", "truncate", "--overwrite transfer"),
            (transferred, "adapter_config.json", "garble", "--overwrite transfer"),
            (student, "model.safetensors", "truncate", "Delete the cached student"),
            (student, "config.json", "garble", "--overwrite distill")):
        restore = _damage(os.path.join(folder, name), how)
        _refused(capsys, ["run", *args], os.path.join(folder, name), "output is damaged", fix)
        restore()
    # The same bytes under a new modification time (a copy without -p) are hashed again and accepted.
    os.utime(os.path.join(student, "model.safetensors"))
    assert main(["run", *args]) == 0 and all(_stages(run_dir).values())
    # A damaged prompt is made again with --overwrite.
    _damage(os.path.join(transferred, "adapter_model.safetensors"), "truncate")
    assert main(["run", *args, "--overwrite", "transfer"]) == 0
    assert {k for k, v in _stages(run_dir).items() if not v} == {"transfer", "evaluate"}

    # Loading a damaged post_config.json names it.
    restore = _damage(os.path.join(source, "post_config.json"), "garble")
    with pytest.raises(ValueError, match="post_config.json is not valid JSON"):
        POSTConfig.from_pretrained(source)
    restore()


def test_full_tuning_needs_no_other_stage(tiny_run):
    run_dir, args = tiny_run
    assert main(["full_tuning", *args, "--full_baseline", "true"]) == 0
    assert stage_record(run_dir, "full_tuning") is not None and stage_record(run_dir, "tune") is None
    assert not os.path.exists(os.path.join(os.environ["PEFT_POST_CACHE"], "students"))  # no student distilled


def test_bad_run_dirs_config_files_and_flags_exit_2_naming_them(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _refused(capsys, ["run", "--run_dir", str(a_file)], "--run_dir", "is a file")
    _refused(capsys, ["run", "--run_dir", str(a_file / "sub")], "--run_dir", "is a file")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.abspath(path) != str(read_only))
    _refused(capsys, ["tune", "--run_dir", str(read_only / "run")], "--run_dir", "not writable")
    monkeypatch.undo()
    for name, text, line in (("bad.yaml", "dp: true\ntransfer_alpha: [0.5\n", "line 3"),
                             ("bad.json", '{"dp": true,\n "x": }', "line 2"), ("list.yaml", "- 1\n", "mapping")):
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit) as exit_:
            main(["run", "--config", str(tmp_path / name)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert name in err and line in err, err
    for flags, match in ((["--overwrite", "tune,nope"], "`overwrite`"), (["--threads", "0"], "`threads`")):
        _refused(capsys, ["run", "--run_dir", str(tmp_path / "r"), *flags], match)
    assert PipelineConfig(overwrite="all").overwrite_stages() == ["tune", "transfer", "full_tuning", "evaluate"]


def test_a_ready_student_replaced_in_place_is_not_taken_for_the_old_one(tiny_run, tokenizer, tmp_path, capsys):
    from peft_post.testing import build_tiny_model

    run_dir, args = tiny_run
    student = str(tmp_path / "ready-student")
    build_tiny_model("llama", tokenizer, student, seed=1, num_layers=2)
    assert main(["tune", *args, "--student_model", student]) == 0
    assert main(["tune", *args, "--student_model", student]) == 0  # the same files: reused
    build_tiny_model("llama", tokenizer, student, seed=2, num_layers=2)  # another model under the same name
    _refused(capsys, ["tune", *args, "--student_model", student], "student_model_sha256", "--overwrite tune")


def test_full_tuning_has_its_own_recipe_and_a_record_keyed_before_it_had_one_is_reused(tiny_run, capsys):
    run_dir, args = tiny_run
    args = [*args, "--full_baseline", "true"]
    # Its own steps and batch (the user's tuning: 3 steps of 8); the learning rate left unset takes tune's.
    assert main(["full_tuning", *args, "--full_tuning_max_steps", "5", "--full_tuning_batch_size", "4"]) == 0
    record = stage_record(run_dir, "full_tuning")
    assert record["steps"] == 5
    assert {k: v for k, v in record["settings"].items() if "max_steps" in k or "batch" in k or "rate" in k} == {
        "full_tuning_max_steps": 5, "full_tuning_batch_size": 4, "full_tuning_learning_rate": 0.03}
    assert main(["full_tuning", *args, "--full_tuning_max_steps", "5", "--full_tuning_batch_size", "4"]) == 0
    assert stage_record(run_dir, "full_tuning") == record  # reused
    _refused(capsys, ["full_tuning", *args, "--full_tuning_max_steps", "6", "--full_tuning_batch_size", "4"],
             "The full_tuning stage", "--full_tuning_max_steps 5 then, 6 now")
    # Unset, the recipe follows the user's tuning: other tune_* values are other baselines.
    _refused(capsys, ["full_tuning", *args], "--full_tuning_max_steps 5 then, 3 now",
             "--full_tuning_batch_size 4 then, 8 now")

    # A record made before the baseline had its own recipe keyed it under the `tune_*` names.
    path = os.path.join(run_dir, "private", "full_tuning.json")
    legacy = json.loads(open(path).read())
    renamed = {"full_tuning_max_steps": "tune_max_steps", "full_tuning_batch_size": "tune_batch_size",
               "full_tuning_learning_rate": "tune_learning_rate"}
    legacy["settings"] = {renamed.get(k, k): v for k, v in legacy["settings"].items()}
    from peft_post.pipeline.store import settings_key

    legacy["settings_key"] = settings_key(legacy["settings"])
    open(path, "w").write(json.dumps(legacy))
    # Its values are the run's: reused, whether they come from full_tuning_* or from tune_*.
    assert main(["full_tuning", *args, "--full_tuning_max_steps", "5", "--full_tuning_batch_size", "4"]) == 0
    assert stage_record(run_dir, "full_tuning")["settings_key"] == legacy["settings_key"]
    assert main(["full_tuning", *_with(_with(args, "--tune_max_steps", "5"), "--tune_batch_size", "4")]) == 0
    assert stage_record(run_dir, "full_tuning")["settings_key"] == legacy["settings_key"]
    _refused(capsys, ["full_tuning", *args, "--full_tuning_max_steps", "6", "--full_tuning_batch_size", "4"],
             "--full_tuning_max_steps 5 then, 6 now")
