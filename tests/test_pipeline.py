"""The pipeline as a library: `PipelineConfig` builds every stage config, round-trips through a run folder and takes
overrides; the stage functions on models and datasets train exactly what the pipeline publishes."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import HfArgumentParser

from peft_post.assets import load_text_dataset
from peft_post.pipeline import (CONFIG_FILE, PRESETS, STAGE_FOLDERS, PipelineConfig, load_prompted_model,
                                load_tokenizer, new_prompted_model, parse_overrides, public_splits, random_subset,
                                run_pipeline, score_methods, student_folder, transfer_prompt, tune_prompt)
from peft_post.pipeline import config as pipeline_config
from peft_post.prompts import get_prompt

SET = dict(preset="quick", distill_max_steps=7, distill_learning_rate=2e-3, tune_learning_rate=0.05, tune_batch_size=4,
           transfer_alpha=0.25, transfer_temperature=1.5, transfer_cache_top_k=5, dp_target_epsilon=3.0,
           dp_target_delta=1e-4, dp_max_grad_norm=0.5, seed=11, save_steps=4, eval_batch_size=6)


def _carries(built, fields: dict, cfg: PipelineConfig, skip=()):
    for arg, name in fields.items():
        if arg not in skip:
            assert getattr(built, arg) == getattr(cfg, name), (arg, name)


def test_every_stage_config_is_built_from_the_mapped_fields(tmp_path):
    cfg = PipelineConfig(**SET)
    distill = cfg.distill_args(str(tmp_path / "d"))
    _carries(distill, pipeline_config.DISTILL_FIELDS, cfg)
    _carries(distill, pipeline_config.COMMON_TRAINER_FIELDS, cfg)
    assert distill.output_dir == str(tmp_path / "d") and distill.save_strategy == "steps"
    tune = cfg.tune_args(str(tmp_path / "t"))
    _carries(tune, pipeline_config.TUNE_FIELDS, cfg)
    _carries(tune, pipeline_config.COMMON_TRAINER_FIELDS, cfg)
    _carries(cfg.dp_config(), pipeline_config.DP_FIELDS, cfg)
    transfer = cfg.transfer_args(str(tmp_path / "x"))
    _carries(transfer, pipeline_config.TRANSFER_FIELDS, cfg)
    assert transfer.eval_steps == max(cfg.transfer_max_steps // 5, 1) and transfer.eval_strategy == "steps"
    # An explicit α (the heuristic's, chosen by the transfer stage) wins; with none anywhere, the placeholder.
    assert cfg.transfer_args(".", alpha=0.75).alpha == 0.75
    assert PipelineConfig(preset="quick").transfer_args(".").alpha == pipeline_config.ALPHA_PLACEHOLDER
    # No templated distillation texts, no label slots to weigh.
    assert PipelineConfig(preset="quick", distill_templated_fraction=0).distill_args(".").alpha_label_slot == 0.0
    assert distill.alpha_label_slot == cfg.distill_label_slot_weight == 5.0
    # Every field a map names exists (a renamed field would otherwise fail only when that stage runs).
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    for fields in (pipeline_config.DISTILL_FIELDS, pipeline_config.TUNE_FIELDS, pipeline_config.DP_FIELDS,
                   pipeline_config.TRANSFER_FIELDS, pipeline_config.COMMON_TRAINER_FIELDS):
        assert set(fields.values()) <= names


@pytest.mark.parametrize(
    "fields,named",
    [
        (dict(transfer_alpha=1.5), "`transfer_alpha` must be in [0, 1]"),
        (dict(transfer_temperature=0.0), "`transfer_temperature` must be"),
        (dict(transfer_learning_rate=-1.0), "`transfer_learning_rate` must be"),
        (dict(transfer_max_steps=0), "`transfer_max_steps` must be"),
        (dict(distill_learning_rate=0.0), "`distill_learning_rate` must be"),
        (dict(distill_block_size=1), "`distill_block_size` must be"),
        (dict(tune_learning_rate=0.0), "`tune_learning_rate` must be"),
        (dict(dp_target_epsilon=-1.0), "`dp_target_epsilon` must be"),
        (dict(dp_target_delta=1.0), "`dp_target_delta` must be"),
        (dict(dp_max_grad_norm=0.0), "`dp_max_grad_norm`"),
        (dict(dp_accountant="rdp"), "`dp_accountant` must be one of"),
        (dict(num_virtual_tokens=0), "`num_virtual_tokens` must be"),
        (dict(tune_max_steps=0), "`tune_max_steps` must be"),
    ],
)
def test_a_stage_configs_refusal_names_the_pipeline_field(fields, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        PipelineConfig(preset="quick", **fields)


def test_a_config_round_trips_through_its_run_folder(tmp_path):
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"), **SET)
    os.makedirs(cfg.run_dir)
    cfg.save(cfg.run_dir)
    assert PipelineConfig.from_run_dir(cfg.run_dir) == cfg
    # A run folder made before the fields carried their stage's prefix.
    old = dataclasses.asdict(cfg)
    for legacy, current in pipeline_config.RENAMED_FIELDS.items():
        old[legacy] = old.pop(current)
    with open(os.path.join(cfg.run_dir, CONFIG_FILE), "w") as f:
        json.dump(old, f)
    with pytest.warns(FutureWarning, match="`alpha` is now called `transfer_alpha`"):
        assert PipelineConfig.from_run_dir(cfg.run_dir) == cfg
    with pytest.raises(ValueError, match="not a pipeline run folder"):
        PipelineConfig.from_run_dir(str(tmp_path))
    with open(os.path.join(cfg.run_dir, CONFIG_FILE), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        PipelineConfig.from_run_dir(cfg.run_dir)
    with pytest.raises(ValueError, match=r"Unknown PipelineConfig field\(s\) \['colour'\]"):
        PipelineConfig.from_dict({**dataclasses.asdict(cfg), "colour": "blue"})


def test_presets_carry_their_task_and_flags_still_win():
    default, trec, rt = PipelineConfig(), PipelineConfig(preset="trec"), PipelineConfig(preset="rotten_tomatoes")
    # The default is the TREC recipe, where POST's DP gain over zero-shot clears its interval.
    assert dataclasses.replace(default, preset="trec") == trec
    assert (rt.private_dataset, rt.public_dataset, rt.label_words) == (
        "embedded:rotten_tomatoes", "embedded:vader_amazon", "negative|positive")
    assert PipelineConfig(preset="quick").template == rt.template == "Review: {text}\nSentiment:"
    # TREC's public split plays the provider's data, and its student never saw a TREC question.
    assert (trec.private_dataset, trec.public_dataset, trec.public_split, trec.distill_split) == (
        "embedded:trec", "embedded:trec", "public", "without_trec")
    assert trec.label_word_lists() == [[w] for w in ("abbreviation", "description", "entity", "human", "location",
                                                      "number")]
    # The proxy-chosen DP recipe and the transfer's stopping rule; the rest is the Rotten Tomatoes recipe.
    assert (trec.tune_batch_size, trec.tune_max_steps, trec.tune_learning_rate) == (512, 15, 0.1)
    assert (rt.tune_batch_size, rt.tune_max_steps, rt.tune_learning_rate) == (16, 300, 0.03)
    assert (trec.transfer_max_steps, trec.transfer_eval_steps, trec.transfer_early_stopping_patience) == (600, 60, 4)
    assert (rt.transfer_max_steps, rt.transfer_eval_steps) == (120, None)
    assert trec.student_layers == rt.student_layers and (trec.distill_max_steps, rt.distill_max_steps) == (300, 1500)
    mine = PipelineConfig(preset="trec", template="Q: {text}\nType:", tune_max_steps=30)
    assert (mine.template, mine.tune_max_steps, mine.label_words) == ("Q: {text}\nType:", 30, trec.label_words)


def test_a_run_folder_saved_under_the_old_default_reloads_with_its_own_settings(tmp_path):
    """Until 2026-12-07 the default preset was Rotten Tomatoes, with no transfer evaluation: such a folder's
    config.json says preset "default" and transfer_eval_steps None, and must not take today's default's 60."""
    old = PipelineConfig(preset="rotten_tomatoes", run_dir=str(tmp_path))
    assert old.transfer_eval_steps is None and old.transfer_early_stopping_patience is None
    path = old.save(str(tmp_path))
    saved = json.loads(open(path).read())
    json.dump({**saved, "preset": "default"}, open(path, "w"))
    assert dataclasses.asdict(PipelineConfig.from_run_dir(str(tmp_path))) == {**saved, "preset": "default"}
    assert PipelineConfig().transfer_eval_steps == 60  # while a new run with the default preset scores every 60


def test_the_full_tuning_baseline_has_its_own_recipe_and_unset_follows_the_users_tuning(tmp_path):
    from peft_post.pipeline.store import stage_settings

    trec, rt = PipelineConfig(preset="trec"), PipelineConfig(preset="rotten_tomatoes")
    recipe = lambda args: (args.max_steps, args.per_device_train_batch_size, args.learning_rate)  # noqa: E731
    # TREC: the user's DP recipe is 15 steps of 512; the upper bound of gap closed is the converged non-private one.
    assert recipe(trec.tune_args(str(tmp_path))) == (15, 512, 0.1)
    assert recipe(trec.full_tuning_args(str(tmp_path))) == (300, 16, 0.1)
    # Keyed by its own names, not the user's tuning's: a new DP recipe leaves the baseline's key alone.
    settings = stage_settings(trec, "full_tuning", "digest")
    assert (settings["full_tuning_max_steps"], settings["full_tuning_batch_size"]) == (300, 16)
    assert not {"tune_max_steps", "tune_batch_size", "tune_learning_rate", "dp"} & set(settings)
    assert stage_settings(dataclasses.replace(trec, tune_max_steps=30), "full_tuning", "digest") == settings
    # Unset (Rotten Tomatoes), each field is the user's tuning value, flags included.
    assert (rt.full_tuning_max_steps, rt.full_tuning_batch_size, rt.full_tuning_learning_rate) == (None,) * 3
    mine = PipelineConfig(preset="rotten_tomatoes", tune_max_steps=40, full_tuning_learning_rate=1)
    assert recipe(mine.full_tuning_args(str(tmp_path))) == (40, 16, 1.0)
    assert stage_settings(mine, "full_tuning", "digest") == stage_settings(  # 1 and 1.0 make the same stage
        dataclasses.replace(mine, full_tuning_learning_rate=1.0), "full_tuning", "digest")
    assert stage_settings(PipelineConfig(preset="rotten_tomatoes", tune_learning_rate=1), "full_tuning", "digest") \
        == stage_settings(PipelineConfig(preset="rotten_tomatoes", tune_learning_rate=1.0), "full_tuning", "digest")
    # A TREC folder saved before the fields existed tuned its baseline with its tune_* values: it reloads so.
    saved = json.loads(open(trec.save(str(tmp_path))).read())
    json.dump({k: v for k, v in saved.items() if not k.startswith("full_tuning_")},
              open(os.path.join(str(tmp_path), CONFIG_FILE), "w"))
    assert recipe(PipelineConfig.from_run_dir(str(tmp_path)).full_tuning_args(str(tmp_path))) == (15, 512, 0.1)
    with pytest.raises(ValueError, match="`full_tuning_max_steps` must be a positive int, or None for "
                                         "`tune_max_steps`'s value"):
        PipelineConfig(full_tuning_max_steps=0)
    with pytest.raises(ValueError, match="full_tuning_learning_rate"):
        PipelineConfig(full_tuning_learning_rate=-1.0)


def test_dp_class_weights_are_keyed_as_numbers_and_need_dp():
    from peft_post.pipeline.store import stage_settings

    plain = stage_settings(PipelineConfig(), "tune", "digest")
    assert "dp_class_weights" not in plain  # unset: every key made before the field stays valid
    one = stage_settings(PipelineConfig(dp_class_weights="1|0.5|0.5|0.5|1|1"), "tune", "digest")
    assert one["dp_class_weights"] == [1.0, 0.5, 0.5, 0.5, 1.0, 1.0]
    assert one == stage_settings(PipelineConfig(dp_class_weights="1.0|0.50|.5|0.5|1|1.0"), "tune", "digest")
    with pytest.raises(ValueError, match="with `--dp false` they would do nothing"):
        PipelineConfig(dp=False, dp_class_weights="1|0.5|0.5|0.5|1|1")


def test_the_dp_physical_batch_is_a_memory_setting_not_a_recipe():
    from peft_post.pipeline.store import stage_settings

    whole, chunked = PipelineConfig(preset="trec"), PipelineConfig(preset="trec", dp_max_physical_batch_size=64)
    assert whole.dp_config().max_physical_batch_size is None and chunked.dp_config().max_physical_batch_size == 64
    # The same DP step in less memory: a tuning made either way is reused by the other.
    assert stage_settings(whole, "tune", "digest") == stage_settings(chunked, "tune", "digest")
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        PipelineConfig(dp_max_physical_batch_size=0)


def test_overrides_are_typed_as_flags_and_checked():
    cfg = PipelineConfig(preset="quick")
    changed = cfg.with_overrides(["dp=false", "tune_max_steps=3", "transfer_alpha=0.5", "template={text} is"])
    assert (changed.dp, changed.tune_max_steps, changed.transfer_alpha, changed.template) == (False, 3, 0.5, "{text} is")
    assert cfg.dp is True and cfg.tune_max_steps == PRESETS["quick"]["tune_max_steps"]  # the original is unchanged
    assert cfg.with_overrides({"seed": 4}).seed == 4
    assert parse_overrides(["student_model=none/x", "dp_target_delta=0.001"]) == {
        "student_model": "none/x", "dp_target_delta": 0.001}
    with pytest.warns(FutureWarning, match="now called `dp_target_epsilon`"):
        assert cfg.with_overrides({"target_epsilon": 2.0}).dp_target_epsilon == 2.0
    with pytest.raises(ValueError, match=r"unknown PipelineConfig field\(s\) \['colour'\]"):
        cfg.with_overrides(["colour=blue"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cfg.with_overrides(["tune_max_steps"])
    with pytest.raises(ValueError, match="`tune_max_steps` must be a positive int"):
        cfg.with_overrides(["tune_max_steps=0"])
    with pytest.raises(ValueError, match="cannot change `preset`"):
        cfg.with_overrides({"preset": "default"})
    with pytest.raises(ValueError, match="Both `alpha` and `transfer_alpha`"):
        cfg.with_overrides({"alpha": 0.1, "transfer_alpha": 0.2})


def _adapter(folder: str) -> torch.Tensor:
    (weights,) = load_file(os.path.join(folder, "adapter_model.safetensors")).values()
    return weights


def test_the_stage_functions_train_exactly_what_the_pipeline_publishes(tiny_run, tmp_path):
    run_dir, args = tiny_run
    cfg = HfArgumentParser(PipelineConfig).parse_args_into_dataclasses(args=[*args, "--dp", "false"])[0]
    run_pipeline(cfg, command="test")
    target = cfg.target_model
    student = student_folder(cfg, target)
    tokenizer = load_tokenizer(student)
    train = random_subset(load_text_dataset(cfg.private_dataset, split=cfg.private_train_split),
                          cfg.max_train_examples, cfg.seed)

    # The user's stage, in memory: the same prompt, bit for bit.
    model = new_prompted_model(student, cfg.post_config(student), False, cfg.seed)
    trainer, record = tune_prompt(cfg, model, tokenizer, train, str(tmp_path / "tune"), dp=False)
    assert record["steps"] == cfg.tune_max_steps and record["privacy"] is None
    assert record["num_train_examples"] == len(train)
    assert torch.equal(get_prompt(trainer.model).detach(), _adapter(os.path.join(run_dir, STAGE_FOLDERS["tune"])))

    # The provider's stage, with the α the run's heuristic chose.
    published = json.loads(open(os.path.join(run_dir, STAGE_FOLDERS["transfer"], "stage.json")).read())
    public_train, public_eval = public_splits(cfg)
    source = load_prompted_model(student, os.path.join(run_dir, STAGE_FOLDERS["tune"]), False)
    target_model = new_prompted_model(target, cfg.post_config(target), False, cfg.seed)
    trainer, record = transfer_prompt(cfg, target_model, source, load_tokenizer(target), public_train, public_eval,
                                      str(tmp_path / "transfer"))
    assert (record["alpha"], record["alpha_inputs"]) == (published["alpha"], published["alpha_inputs"])
    assert record["steps"] == cfg.transfer_max_steps
    assert torch.equal(get_prompt(trainer.model).detach(),
                       _adapter(os.path.join(run_dir, STAGE_FOLDERS["transfer"])))

    # The scores: a model or a loader per method, each scored on the test data alone.
    test = random_subset(load_text_dataset(cfg.private_dataset, split=cfg.private_test_split),
                         cfg.max_test_examples, cfg.seed)
    evaluation = json.loads(open(os.path.join(run_dir, "evaluation.json")).read())["results"]
    scores = score_methods(cfg, load_tokenizer(target), test, {
        "post": trainer.model,
        "zero_shot": lambda: load_prompted_model(target, os.path.join(run_dir, STAGE_FOLDERS["transfer"]),
                                                 False).get_base_model(),
    })
    assert scores["post"]["accuracy"] == evaluation["post"]["accuracy"]
    assert scores["zero_shot"]["accuracy"] == evaluation["zero_shot"]["accuracy"]
    assert scores["post"]["num_examples"] == len(test)


def test_the_transfer_stopping_rule_keeps_the_best_public_step_and_reports_it(tiny_run):
    """`--transfer_early_stopping_patience`: Trainer's stopping rule on the public held-out split (public data only).
    The prompt released is the one whose public held-out accuracy was best, and the report says where it stopped."""
    from peft_post.evaluation import evaluate_prompt

    run_dir, args = tiny_run
    cfg = HfArgumentParser(PipelineConfig).parse_args_into_dataclasses(args=[
        *args, "--dp", "false", "--transfer_max_steps", "12", "--transfer_eval_steps", "2",
        "--transfer_early_stopping_patience", "1", "--transfer_learning_rate", "0.5", "--transfer_alpha", "0.5"])[0]
    results = run_pipeline(cfg, command="test")
    published = json.loads(open(os.path.join(run_dir, STAGE_FOLDERS["transfer"], "stage.json")).read())
    stop = published["stopping"]
    curve = {h["step"]: h["eval_accuracy"] for h in published["log_history"] if "eval_accuracy" in h}
    assert stop["stopped_at_step"] == max(curve) <= 12 and stop["patience"] == 1
    # The kept step is the first with the best public accuracy; the curve never beat it after.
    assert stop["public_metric"] == "accuracy"
    assert stop["public_score"] == max(curve.values()) == curve[stop["kept_step"]]
    assert all(curve[s] < stop["public_score"] for s in curve if s < stop["kept_step"])
    # The released prompt is that step's: it scores the best public accuracy again.
    target = cfg.target_model
    model = load_prompted_model(target, os.path.join(run_dir, STAGE_FOLDERS["transfer"]), False)
    _, public_eval = public_splits(cfg)
    again = evaluate_prompt(model, load_tokenizer(target), public_eval, cfg.post_config(), batch_size=8)
    assert again["accuracy"] == stop["public_score"]
    assert any(f"kept the prompt of step {stop['kept_step']}" in note for note in results.notes)


def test_the_stopping_rule_fields_stay_out_of_old_settings_keys():
    from peft_post.pipeline.store import settings_key, stage_settings

    base = PipelineConfig(preset="quick")
    key = settings_key(stage_settings(base, "transfer", source_prompt_sha256="x"))
    assert settings_key(stage_settings(dataclasses.replace(base, transfer_eval_steps=None), "transfer",
                                       source_prompt_sha256="x")) == key
    stopping = base.with_overrides({"transfer_early_stopping_patience": 3})
    assert settings_key(stage_settings(stopping, "transfer", source_prompt_sha256="x")) != key
    args = stopping.transfer_args("out")
    assert args.load_best_model_at_end and args.metric_for_best_model == "accuracy" and args.save_steps == args.eval_steps
    assert [type(c).__name__ for c in stopping.transfer_callbacks()] == ["EarlyStoppingCallback"]
    with pytest.raises(ValueError, match="transfer_early_stopping_patience"):
        base.with_overrides({"transfer_early_stopping_patience": 0})
