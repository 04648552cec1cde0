"""Issue 21: every bad input is refused before any work, with a message that names the argument and no traceback.

`CASES` is the table: each row runs ``peft_post.cli.main([command, *base flags, *flags])`` in-process on the tiny
world below (a 4-layer target, private, public and distillation data, and broken variants of them) and checks that

- it exits with status 2: `main` returns 2 or argparse exits 2 (its own usage message, no traceback);
- no exception escapes `main` (an escaped one would print a traceback);
- stderr holds each expected word (the argument to fix);
- no model was loaded (`from_pretrained` of the model classes raises here) and no run folder or student was made.

To add a case, add a row: ``Case(id, flags, expected words[, command][, base])``; ``{name}`` in a flag is replaced
by the world's file of that name (`WORLD_FILES`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pytest
from datasets import Dataset, DatasetDict

from peft_post.cli import main
from peft_post.testing import build_tiny_model, tiny_sentiment_rows

MODEL_LOADED = "a model was loaded before the bad input was refused"


@dataclass(frozen=True)
class Case:
    id: str
    flags: list
    expect: list  # words stderr must hold (case-sensitive)
    command: str = "run"
    base: bool = True  # start from the tiny world's good flags (later flags override earlier ones)


def _rows(n, seed, **change):
    return [{**r, **change} for r in tiny_sentiment_rows(n, seed=seed)]


def _texts(n, seed, column="text"):
    return [{column: r["text"]} for r in tiny_sentiment_rows(n, seed=seed)]


def _write(path, text, encoding="utf-8"):
    with open(path, "wb") as f:
        f.write(text.encode(encoding))
    return path


def _csv(path, rows):
    Dataset.from_list(rows).to_csv(path)
    return path


def _disk(path, **splits):
    """A `save_to_disk` folder; a split is a list of rows or a `Dataset`."""
    DatasetDict({k: v if isinstance(v, Dataset) else Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(path)
    return path


def _folder(path, **files):
    """A folder of data files: name (dots as '_': train_csv) -> text."""
    os.makedirs(path, exist_ok=True)
    for name, text in files.items():
        _write(os.path.join(path, name.replace("_", ".")), text)
    return path


def _csv_text(rows):
    return "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)


# The world's files: name -> builder(folder, world) returning the path. Built once per module.
WORLD_FILES = {
    "private": lambda d, w: _disk(f"{d}/private", train=_rows(24, 1), test=_rows(10, 2)),
    "train_only": lambda d, w: _disk(f"{d}/train_only", train=_rows(24, 1)),
    "one_csv": lambda d, w: _csv(f"{d}/one.csv", _rows(30, 1)),
    "test_label_5": lambda d, w: _disk(f"{d}/test_label_5", train=_rows(24, 1), test=_rows(10, 2, label=5)),
    "test_label_str": lambda d, w: _disk(f"{d}/test_label_str", train=_rows(24, 1), test=_rows(10, 2, label="pos")),
    "test_no_label": lambda d, w: _disk(f"{d}/test_no_label", train=_rows(24, 1), test=_texts(10, 2)),
    "test_empty": lambda d, w: _disk(f"{d}/test_empty", train=_rows(24, 1),
                                     test=Dataset.from_list(_rows(1, 2)).select([])),
    "train_label_neg": lambda d, w: _disk(f"{d}/train_neg", train=_rows(24, 1, label=-1), test=_rows(10, 2)),
    "train_sentence": lambda d, w: _disk(f"{d}/train_sentence", test=_rows(10, 2), train=[
        {"sentence": r["text"], "label": r["label"]} for r in _rows(24, 1)]),
    # Folders of CSV files: a test.csv whose label cell is empty (read as floats, one NaN), one with a header only.
    "csv_folder_nan": lambda d, w: _folder(f"{d}/csv_nan", train_csv=_csv_text(_rows(24, 1)),
                                           test_csv="text,label\nso good,1\nso bad,\n"),
    "csv_folder_header_only": lambda d, w: _folder(f"{d}/csv_header", train_csv=_csv_text(_rows(24, 1)),
                                                   test_csv="text,label\n"),
    "latin1_csv": lambda d, w: _write(f"{d}/latin1.csv", "text,label\ncaf\xe9 tr\xe8s bon,1\nmauvais,0\n", "latin-1"),
    "header_csv": lambda d, w: _write(f"{d}/header.csv", "text,label\n"),
    "empty_csv": lambda d, w: _write(f"{d}/empty.csv", ""),
    "numeric_text_csv": lambda d, w: _write(f"{d}/numeric.csv", "text,label\n" + "".join(
        f"{i},{i % 2}\n" for i in range(30))),
    "public": lambda d, w: _csv(f"{d}/public.csv", _rows(20, 3)),
    "public_no_label": lambda d, w: _csv(f"{d}/public_no_label.csv", _texts(20, 3)),
    "public_label_7": lambda d, w: _csv(f"{d}/public_7.csv", _rows(20, 3, label=7)),
    # The private test split's first sentence among the public texts: 1 of 20 is 5%, above the 1% bound.
    "public_leaky": lambda d, w: _csv(f"{d}/leaky.csv", _rows(19, 3) + _rows(10, 2)[:1]),
    "distill": lambda d, w: _csv(f"{d}/distill.csv", _texts(40, 4)),
    "distill_sentence": lambda d, w: _csv(f"{d}/distill_sentence.csv", _texts(40, 4, column="sentence")),
    "distill_leaky": lambda d, w: _csv(f"{d}/distill_leaky.csv", _texts(36, 4) + _texts(24, 1)[:4]),
    "no_config_folder": lambda d, w: _folder(f"{d}/not_a_model"),
    "no_tokenizer_model": lambda d, w: _folder(f"{d}/no_tok", config_json=open(
        os.path.join(w["target"], "config.json"), encoding="utf-8").read()),
    "missing": lambda d, w: f"{d}/no/such/model",
    "missing_csv": lambda d, w: f"{d}/no_such.csv",
    "yaml_unknown": lambda d, w: _write(f"{d}/unknown.yaml", "not_a_field: 1\n"),
    "yaml_broken": lambda d, w: _write(f"{d}/broken.yaml", "dp: false\ntune_max_steps: [3,\n"),
    "json_broken": lambda d, w: _write(f"{d}/broken.json", '{"dp": false,\n "seed": }\n'),
}


def _base(world) -> list:
    return ["--run_dir", world["run_dir"], "--preset", "quick", "--target_model", world["target"],
            "--student_layers", "0,-1", "--distill_dataset", world["distill"], "--private_dataset", world["private"],
            "--public_dataset", world["public"], "--num_public_examples", "12", "--num_public_eval_examples", "8",
            "--num_virtual_tokens", "4", "--tune_batch_size", "8", "--transfer_batch_size", "4",
            "--eval_batch_size", "8", "--label_words", "bad,awful|good,great"]


# Every numeric PipelineConfig field, out of range (or of the wrong kind where argparse parses it).
NUMERIC = [
    ("distill_max_steps", "0"), ("distill_learning_rate", "0"), ("distill_learning_rate", "nan"),
    ("distill_batch_size", "0"), ("distill_templated_fraction", "1.5"), ("distill_label_slot_weight", "-1"),
    ("distill_label_slot_weight", "inf"), ("distill_block_size", "1"), ("max_train_examples", "0"),
    ("max_test_examples", "-3"), ("num_public_examples", "0"), ("num_public_eval_examples", "0"),
    ("max_private_overlap", "1.5"), ("max_private_overlap", "-0.1"), ("num_virtual_tokens", "0"), ("max_answer_tokens", "0"),
    ("tune_max_steps", "0"), ("tune_learning_rate", "-0.1"), ("tune_learning_rate", "inf"), ("tune_batch_size", "0"),
    ("full_tuning_max_steps", "0"), ("full_tuning_learning_rate", "-0.1"), ("full_tuning_batch_size", "0"),
    ("dp_target_epsilon", "0"), ("dp_target_epsilon", "inf"), ("dp_target_delta", "1.5"), ("dp_target_delta", "0"),
    ("dp_max_grad_norm", "0"), ("dp_max_physical_batch_size", "0"), ("transfer_max_steps", "0"),
    ("transfer_learning_rate", "0"),
    ("transfer_batch_size", "0"), ("transfer_alpha", "1.5"), ("transfer_alpha", "-0.5"),
    ("transfer_temperature", "0"), ("transfer_temperature", "inf"), ("transfer_cache_top_k", "0"),
    ("eval_batch_size", "0"), ("save_steps", "0"), ("seed", "-1"), ("seed", "4294967296"),
    ("private_test_size", "0"), ("private_test_size", "1.5"), ("private_test_size", "-2"), ("threads", "0"),
    ("ddp_timeout", "0"), ("transfer_eval_steps", "0"), ("transfer_early_stopping_patience", "-1"),
]
# Values argparse refuses: not a number, not a bool.
BAD_TYPES = [("tune_max_steps", "abc"), ("transfer_alpha", "half"), ("dp", "maybe"), ("seed", "1.5"),
             ("full_baseline", "perhaps"), ("private_test_size", "a fifth")]

# `peft-post audit` and `peft-post audit-dp`: (id, flags, expected words), on the tiny world's flags.
AUDIT_CASES = [
    ("audit-odd-shadows", ["--num_shadows", "5"], ["num_shadows"]),
    ("audit-few-shadows", ["--num_shadows", "2"], ["num_shadows"]),
    ("audit-odd-examples", ["--num_examples", "7"], ["num_examples"]),
    ("audit-bad-variance", ["--variance", "median"], ["variance"]),
    ("audit-per-example-few-shadows", ["--variance", "per_example", "--num_shadows", "4"], ["num_shadows >= 6"]),
    ("audit-negative-bootstrap", ["--bootstrap_resamples", "-1"], ["bootstrap_resamples"]),
    ("audit-more-examples-than-data", ["--num_examples", "50", "--num_shadows", "4"], ["num_examples"]),
    ("audit-batch-above-half", ["--num_examples", "12", "--num_shadows", "4"], ["tune_batch_size"]),
    ("audit-no-label-column", ["--num_examples", "16", "--label_column", "stars"], ["stars"]),
    ("audit-unknown-flag", ["--trials", "4"], ["--trials"]),
]
AUDIT_DP_CASES = [
    ("audit-dp-bad-case", ["--cases", "honest,bogus"], ["cases"]),
    ("audit-dp-one-trial", ["--trials", "1"], ["trials"]),
    ("audit-dp-batch-above-examples", ["--batch_size", "20", "--num_examples", "16"], ["batch_size"]),
    ("audit-dp-confidence", ["--confidence", "1.5"], ["confidence"]),
    ("audit-dp-method", ["--method", "magic"], ["method"]),
    ("audit-dp-adjacency", ["--adjacency", "swap"], ["adjacency"]),
    ("audit-dp-zero-noise", ["--noise_multiplier", "0"], ["noise_multiplier"]),
    ("audit-dp-learning-rate", ["--learning_rate", "0"], ["learning_rate"]),
    ("audit-dp-more-examples-than-data", ["--num_examples", "40", "--batch_size", "4"], ["num_examples"]),
    ("audit-dp-unknown-flag", ["--num_shadows", "4"], ["--num_shadows"]),
]

CASES = [
    # ------------------------------------------------------------------ the command line itself
    Case("unknown-command", [], ["unknown command", "frobnicate"], command="frobnicate", base=False),
    Case("unknown-flag", ["--no_such_flag", "1"], ["--no_such_flag"]),
    Case("misspelt-flag", ["--tune_max_stesp", "3"], ["--tune_max_stesp"]),
    Case("abbreviated-flag", ["--tune_max_step", "3"], ["--tune_max_step"]),
    Case("config-yaml-syntax", ["--config", "{yaml_broken}"], ["--config", "broken.yaml", "line"]),
    Case("config-json-syntax", ["--config", "{json_broken}"], ["--config", "broken.json", "line"]),
    Case("run-dir-is-a-file", ["--run_dir", "{header_csv}"], ["--run_dir", "is a file"]),
    Case("run-dir-under-a-file", ["--run_dir", "{header_csv}/run"], ["--run_dir", "is a file"]),
    Case("overwrite-unknown-stage", ["--overwrite", "tune,nope"], ["overwrite", "nope"]),
    Case("flag-without-value", ["--seed"], ["--seed"]),
    Case("config-missing-file", ["--config", "{missing_csv}"], ["--config"]),
    Case("config-without-path", ["--config"], ["--config"]),
    Case("config-unknown-key", ["--config", "{yaml_unknown}"], ["--config", "not_a_field"]),
    Case("bad-preset", ["--preset", "huge"], ["preset", "huge"]),
    *[Case(f"type-{name}-{value}", [f"--{name}", value], [f"--{name}"]) for name, value in BAD_TYPES],
    *[Case(f"range-{name}-{value}", [f"--{name}", value], [name]) for name, value in NUMERIC],
    # ------------------------------------------------------------------ models
    Case("target-missing-folder", ["--target_model", "{missing}"], ["target_model", "no such folder",
                                                                     "not a Hub id"]),
    Case("target-dot-path", ["--target_model", "./not/here"], ["target_model", "no such folder"]),
    Case("target-folder-without-config", ["--target_model", "{no_config_folder}"], ["target_model", "config.json"]),
    Case("target-without-tokenizer", ["--target_model", "{no_tokenizer_model}"], ["target_model", "tokenizer"]),
    Case("target-is-a-file", ["--target_model", "{public}"], ["target_model", "is a file"]),
    Case("target-unknown-embedded", ["--target_model", "embedded:gpt5"], ["target_model", "embedded:gpt5"]),
    Case("student-missing-folder", ["--student_model", "{missing}"], ["student_model", "no such folder"]),
    Case("student-folder-without-config", ["--student_model", "{no_config_folder}"], ["student_model",
                                                                                      "config.json"]),
    Case("student-layers-out-of-range", ["--student_layers", "0,9"], ["student_layers", "4 layers"]),
    Case("student-layers-negative-out-of-range", ["--student_layers=-5,-1"], ["student_layers", "4 layers"]),
    Case("student-layers-repeated", ["--student_layers", "0,-4"], ["student_layers", "more than once"]),
    Case("student-layers-unsorted", ["--student_layers", "3,0"], ["student_layers", "increasing order"]),
    Case("student-layers-not-ints", ["--student_layers", "a,b"], ["student_layers"]),
    Case("student-layers-empty", ["--student_layers", ","], ["student_layers"]),
    Case("masked-template-on-causal-target", ["--template", "{text} It was {mask}."], ["target_model",
                                                                                       "masked-LM head"]),
    # ------------------------------------------------------------------ the task: label words, template, init text
    Case("label-words-one-class", ["--label_words", "good"], ["label_words"]),
    Case("label-words-empty-class", ["--label_words", "bad||good"], ["label_words"]),
    Case("label-words-trailing-bar", ["--label_words", "bad|"], ["label_words"]),
    Case("label-words-same-word-two-classes", ["--label_words", "bad,good|good"], ["--label_words", "classes 0 and 1"]),
    Case("label-words-duplicate-classes", ["--label_words", "good|good"], ["--label_words", "good"]),
    Case("label-words-empty", ["--label_words", ""], ["label_words"]),
    Case("template-without-text", ["--template", "Review:\nSentiment:"], ["template", "{text}"]),
    Case("template-with-two-texts", ["--template", "{text} {text}"], ["template", "{text}"]),
    Case("template-causal-with-two-masks", ["--template", "{text} {mask} {mask}"], ["template"]),
    Case("prompt-init-text-empty", ["--prompt_init_text", " "], ["--prompt_init_text", "empty"]),
    # ------------------------------------------------------------------ the private data
    Case("private-no-test-split", ["--private_dataset", "{train_only}"], ["--private_dataset", "'test'",
                                                                          "--private_test_size 0.2", "train.csv"]),
    Case("private-single-csv", ["--private_dataset", "{one_csv}"], ["--private_dataset", "'test'",
                                                                    "--private_test_size"]),
    Case("private-no-such-train-split", ["--private_train_split", "training"], ["--private_dataset", "'training'",
                                                                               "--private_train_split"]),
    Case("private-no-such-test-split", ["--private_test_split", "validation"], ["--private_dataset", "'validation'",
                                                                               "--private_test_split"]),
    Case("private-test-label-out-of-range", ["--private_dataset", "{test_label_5}"], ["--private_dataset",
                                                                                     "split 'test'", "0..1"]),
    Case("private-test-label-strings", ["--private_dataset", "{test_label_str}"], ["--private_dataset",
                                                                                  "split 'test'", "'pos'"]),
    Case("private-test-label-nan", ["--private_dataset", "{csv_folder_nan}"], ["--private_dataset", "split 'test'",
                                                                              "not integer"]),
    Case("private-test-no-label-column", ["--private_dataset", "{test_no_label}"], ["--private_dataset",
                                                                                   "split 'test'", "--label_column"]),
    Case("private-test-empty", ["--private_dataset", "{test_empty}"], ["--private_dataset", "test_empty"]),
    Case("private-test-header-only-csv", ["--private_dataset", "{csv_folder_header_only}"], ["--private_dataset",
                                                                                            "no examples"]),
    Case("private-train-label-negative", ["--private_dataset", "{train_label_neg}"], ["--private_dataset",
                                                                                     "split 'train'", "-1"]),
    Case("private-train-no-text-column", ["--private_dataset", "{train_sentence}"], ["--private_dataset",
                                                                                    "'sentence'", "--text_column"]),
    Case("private-wrong-label-column", ["--label_column", "stars"], ["--private_dataset", "stars", "--label_column"]),
    Case("private-wrong-text-column", ["--text_column", "review"], ["review", "--text_column"]),
    Case("private-latin1-csv", ["--private_dataset", "{latin1_csv}"], ["--private_dataset", "latin1.csv", "UTF-8"]),
    Case("private-header-only-csv", ["--private_dataset", "{header_csv}"], ["--private_dataset", "header.csv",
                                                                           "no examples"]),
    Case("private-empty-csv", ["--private_dataset", "{empty_csv}"], ["--private_dataset", "empty.csv"]),
    Case("private-missing-csv", ["--private_dataset", "{missing_csv}"], ["private_dataset", "no_such.csv"]),
    Case("private-numeric-texts", ["--private_dataset", "{numeric_text_csv}", "--private_test_size", "0.2"],
         ["--private_dataset", "not a string"]),
    Case("private-unknown-embedded", ["--private_dataset", "embedded:imdb"], ["--private_dataset", "embedded:imdb"]),
    Case("private-test-size-with-a-test-split", ["--private_test_size", "0.2"], ["--private_test_size",
                                                                                "already has"]),
    Case("private-test-size-too-large", ["--private_dataset", "{one_csv}", "--private_test_size", "30"],
         ["--private_test_size", "between 1 and 29"]),
    Case("private-test-size-without-labels", ["--private_dataset", "{one_csv}", "--private_test_size", "0.2",
                                              "--label_column", "stars"], ["--private_dataset", "--label_column"]),
    Case("private-fewer-examples-than-batch", ["--tune_batch_size", "25"], ["--tune_batch_size", "24"]),
    Case("private-cap-below-batch", ["--max_train_examples", "4"], ["--tune_batch_size", "--max_train_examples"]),
    Case("dp-class-weights-count", ["--dp_class_weights", "1|0.5|0.5"], ["dp_class_weights", "3 weights",
                                                                          "2 classes"]),
    Case("dp-class-weights-range", ["--dp_class_weights", "1|2"], ["dp_class_weights", "(0, 1]"]),
    Case("private-fewer-examples-than-full-tuning-batch", ["--full_baseline", "true", "--full_tuning_batch_size", "25"],
         ["--full_tuning_batch_size", "24"]),
    # ------------------------------------------------------------------ public and distillation data
    Case("public-too-small", ["--num_public_examples", "15", "--num_public_eval_examples", "8"],
         ["--public_dataset", "--num_public_examples", "--num_public_eval_examples", "23"]),
    Case("public-no-label-column", ["--public_dataset", "{public_no_label}"], ["--public_dataset",
                                                                              "--label_column"]),
    Case("public-labels-out-of-range", ["--public_dataset", "{public_label_7}"], ["--public_dataset", "7"]),
    Case("public-no-such-split", ["--public_split", "validation"], ["--public_dataset", "--public_split"]),
    Case("public-latin1-csv", ["--public_dataset", "{latin1_csv}"], ["--public_dataset", "UTF-8"]),
    Case("public-missing-csv", ["--public_dataset", "{missing_csv}"], ["public_dataset", "no_such.csv"]),
    Case("distill-no-text-column", ["--distill_dataset", "{distill_sentence}"], ["--distill_dataset",
                                                                                "--text_column"]),
    Case("distill-no-such-split", ["--distill_split", "without_trec"], ["--distill_dataset", "--distill_split"]),
    Case("distill-header-only-csv", ["--distill_dataset", "{header_csv}"], ["--distill_dataset", "no examples"]),
    Case("distill-missing-csv", ["--distill_dataset", "{missing_csv}"], ["distill_dataset", "no_such.csv"]),
    # ------------------------------------------------------------------ private data used as public data
    Case("public-is-private", ["--public_dataset", "{private}"], ["`public_dataset`", "`private_dataset`"]),
    Case("public-is-private-other-spelling", ["--public_dataset", "{private}/."], ["`public_dataset`",
                                                                                  "`private_dataset`"]),
    Case("public-is-private-test-split", ["--public_dataset", "{private}", "--public_split", "test"],
         ["`public_dataset`", "`private_dataset`"]),
    Case("distill-is-private", ["--distill_dataset", "{private}"], ["`distill_dataset`", "`private_dataset`"]),
    Case("test-split-is-train-split", ["--private_test_split", "train"], ["`private_test_split`",
                                                                         "`private_train_split`"]),
    Case("public-texts-are-private", ["--public_dataset", "{public_leaky}"], ["public_dataset", "5.0%",
                                                                             "max_private_overlap"]),
    Case("distill-texts-are-private", ["--distill_dataset", "{distill_leaky}"], ["distill_dataset", "10.0%",
                                                                                "max_private_overlap"]),
    # ------------------------------------------------------------------ stage subcommands
    Case("full-tuning-without-baseline", [], ["full_tuning", "--full_baseline"], command="full_tuning"),
    Case("transfer-before-tune", [], ["run `peft-post tune` first"], command="transfer"),
    Case("stage-bad-label-words", ["--label_words", "bad,good|good"], ["--label_words"], command="evaluate"),
    # ------------------------------------------------------------------ push
    Case("push-missing-required", [], ["--adapter", "--repo_id"], command="push", base=False),
    Case("push-missing-report", ["--adapter", "{missing}", "--repo_id", "me/x", "--report", "{missing_csv}"],
         ["--report"], command="push", base=False),
]
CASES += [Case(id, flags, expect, command="audit") for id, flags, expect in AUDIT_CASES]
CASES += [Case(id, flags, expect, command="audit-dp") for id, flags, expect in AUDIT_DP_CASES]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    folder = str(tmp_path_factory.mktemp("bad_inputs"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFT_POST_CACHE", os.path.join(folder, "cache"))
        w = {"target": os.path.join(folder, "target"), "run_dir": os.path.join(folder, "run")}
        build_tiny_model("llama", tokenizer, w["target"], num_layers=4)
        for name, build in WORLD_FILES.items():
            w[name] = build(folder, w)
        yield w


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load, in any stage or audit, fails the case: every refusal must come before it."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(MODEL_LOADED)

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def run_cli(argv: list) -> tuple[str, int, str]:
    """(outcome, exit code, what escaped): 'clear' for exit 2 with nothing escaping, 'traceback' for an exception
    out of `main`, 'silent' when the input was accepted (work started: a model load was stopped, or another exit
    status)."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: usage and message on stderr, status 2, no traceback
        code = exit_.code
    except BaseException as err:  # noqa: BLE001 - anything else would reach the user as a traceback
        return ("silent" if str(err) == MODEL_LOADED else "traceback"), -1, f"{type(err).__name__}: {err}"
    return ("clear" if code == 2 else "silent"), code, ""


def _fill(flags: list, world: dict) -> list:
    """`flags` with each ``{name}`` of a world file replaced by its path (other braces, as in templates, stay)."""
    return [re.sub(r"\{(\w+)\}", lambda m: world.get(m.group(1), m.group(0)), f) for f in flags]


def _config(world, **overrides):
    from transformers import HfArgumentParser

    from peft_post.pipeline import PipelineConfig

    cfg = HfArgumentParser(PipelineConfig).parse_args_into_dataclasses(args=_base(world))[0]
    return cfg.with_overrides(overrides) if overrides else cfg


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_before_any_work(case, world, capsys, no_model_loads, tmp_path, monkeypatch):
    world = {**world, "run_dir": str(tmp_path / "run")}
    monkeypatch.setenv("PEFT_POST_CACHE", str(tmp_path / "cache"))
    argv = [case.command, *(_base(world) if case.base else []), *_fill(case.flags, world)]
    outcome, code, escaped = run_cli(argv)
    err = capsys.readouterr().err
    assert outcome == "clear", f"{outcome}: exit {code} {escaped}\n{err}"
    missing = [word for word in case.expect if word not in err]
    assert not missing, f"stderr lacks {missing}:\n{err}"
    assert "Traceback" not in err
    assert not os.path.exists(world["run_dir"]), "the run folder was created"
    assert not os.path.exists(os.path.join(os.environ["PEFT_POST_CACHE"], "students")), "a student was made"


def test_the_table_covers_every_numeric_field():
    import dataclasses
    import typing

    from peft_post.pipeline import PipelineConfig

    hints = typing.get_type_hints(PipelineConfig)
    numeric = {f.name for f in dataclasses.fields(PipelineConfig)
               if any(t in (int, float) for t in (hints[f.name], *typing.get_args(hints[f.name])))}
    assert numeric - {name for name, _ in NUMERIC} == set()
    assert len(CASES) >= 80


# ------------------------------------------------------------------------------------------------ beyond the CLI
def test_a_single_csv_is_split_the_same_way_by_every_reader(world, no_model_loads):
    from peft_post.assets import load_text_dataset
    from peft_post.pipeline import preflight, private_split, private_splits
    from peft_post.pipeline.store import evaluation_key

    cfg = _config(world, private_dataset=world["one_csv"], private_test_size=0.2)
    found = preflight(cfg)
    assert found["private"] == {"train": 24, "test": 6}
    assert found["data_overlap"]["private_splits"] == ["train", "test"]
    train, test = private_split(cfg, "train"), private_split(cfg, "test")
    rows = load_text_dataset(world["one_csv"], split="train")
    assert sorted(list(train["text"]) + list(test["text"])) == sorted(rows["text"])
    assert sorted(test["label"]) == [0, 0, 0, 1, 1, 1]  # stratified: 15 of each class, 20% of each held out
    # Every reader gets the same split: the tuning stage, the evaluation and the overlap check.
    texts = list(test["text"])
    assert list(private_split(cfg, "test")["text"]) == texts == list(private_splits(cfg)["test"]["text"])
    assert list(private_split(cfg.with_overrides({"seed": 1}), "test")["text"]) != texts
    # A count works as well as a share, and the cached test scores know which test split they scored.
    counted = cfg.with_overrides({"private_test_size": 6.0})
    assert counted.private_test_size == 6 and list(private_split(counted, "test")["text"]) == texts
    assert evaluation_key(cfg, "t", "post") != evaluation_key(
        cfg.with_overrides({"private_test_size": 0.3}), "t", "post")
    assert evaluation_key(_config(world), "t", "post") == evaluation_key(
        _config(world, private_test_size=None), "t", "post")


def test_the_init_text_warning_comes_before_work_with_its_length(world, no_model_loads):
    import warnings

    from peft_post.pipeline import preflight

    with pytest.warns(UserWarning, match=r"`--template` and `--label_words`.*11 tokens against "
                      r"`--num_virtual_tokens` 4"):
        preflight(_config(world, template="Text: {text}\nTopic:"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preflight(_config(world, prompt_init_text="Is this review good or bad"))


def test_evaluate_prompt_needs_a_post_config():
    from peft import PromptTuningConfig

    from peft_post.evaluation import evaluate_prompt

    with pytest.raises(TypeError, match="not a POSTConfig.*POSTConfig.from_pretrained"):
        evaluate_prompt(None, None, Dataset.from_list(_rows(2, 0)),
                        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


@pytest.mark.parametrize("name,match", [("latin1_csv", "is not UTF-8.*iconv"), ("header_csv", "no examples"),
                                        ("empty_csv", "is empty")])
def test_unreadable_local_files_name_the_file(world, name, match):
    from peft_post.assets import load_text_dataset

    with pytest.raises(ValueError, match=match) as info:
        load_text_dataset(world[name])
    assert repr(world[name]) in str(info.value)
