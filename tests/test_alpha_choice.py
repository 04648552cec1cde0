"""Choosing α on public data (issue 17, item 3): the label-space check that refuses the paper's heuristic on a public
set of another family, the fallback it triggers, and the label-free choice by agreement with the source."""

import json
import math
import os
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import HfArgumentParser

from peft_post.modeling import prompt_parameter
from peft_post.pipeline import STAGE_FOLDERS, PipelineConfig, load_tokenizer, new_prompted_model, run_pipeline
from peft_post.pipeline.stages import FALLBACK_ALPHA, transfer_prompt
from peft_post.pipeline.store import settings_key, stage_settings
from peft_post.prompts import get_prompt
from peft_post.testing import build_tiny_model, sharpen_model, tiny_sentiment_rows
from peft_post.transfer.alpha import (ALPHA_GRID, ALPHA_METHODS, MISMATCH_LEVEL, agreement, below_chance_bound,
                                      below_chance_threshold, label_space_mismatch, pick_alpha_by_agreement,
                                      predict_classes)


# -- the label-space check ----------------------------------------------------------------------------------------

def test_labels_that_are_not_the_private_classes_are_a_mismatch():
    assert "outside 0..3" in label_space_mismatch(4, labels=[0, 1, 4])
    assert "outside 0..1" in label_space_mismatch(2, labels=[0, -1])
    assert "not integer class indices" in label_space_mismatch(2, labels=["positive", "negative"])
    assert "not integer class indices" in label_space_mismatch(2, labels=[0.0, 1.0])
    assert label_space_mismatch(4, labels=[0, 1, 2, 3]) is None


def test_both_accuracies_far_below_chance_are_a_mismatch():
    # The held-out task of issue 17: sentiment labels scored against 4 topic label words, on 128 (and 64) examples.
    reason = label_space_mismatch(4, zero_shot_acc=6 / 128, source_acc=24 / 128, num_examples=128)
    assert "below chance 0.250" in reason and "zero-shot 0.047, source 0.188" in reason
    assert label_space_mismatch(4, zero_shot_acc=3 / 64, source_acc=12 / 64, num_examples=64) is not None
    # The margin: Hoeffding's bound on the mean of the two accuracies, refused under MISMATCH_LEVEL.
    mean = (6 / 128 + 24 / 128) / 2
    kl = mean * math.log(mean / 0.25) + (1 - mean) * math.log((1 - mean) / 0.75)
    assert below_chance_bound(mean, 4, 128) == pytest.approx(math.exp(-128 * kl), rel=1e-12)
    assert below_chance_bound(0.25, 4, 128) == below_chance_bound(0.4, 4, 128) == 1.0
    threshold = below_chance_threshold(4, 128)
    assert threshold == pytest.approx(0.161, abs=1e-3)
    assert below_chance_bound(threshold - 1e-6, 4, 128) < MISMATCH_LEVEL < below_chance_bound(threshold + 1e-6, 4, 128)
    assert below_chance_threshold(2, 128) == pytest.approx(0.392, abs=1e-3)
    assert below_chance_threshold(2, 4) == 0.0  # 4 examples refute nothing: even 0/4 twice is kept


def test_a_compatible_but_weak_task_is_not_a_mismatch():
    # Both below chance, but by no more than noise on 128 examples.
    assert label_space_mismatch(4, zero_shot_acc=0.22, source_acc=0.20, num_examples=128) is None
    assert label_space_mismatch(2, zero_shot_acc=0.45, source_acc=0.41, num_examples=128) is None
    # One of them above chance: a biased target, a source that learned the task.
    assert label_space_mismatch(4, zero_shot_acc=0.02, source_acc=0.30, num_examples=128) is None
    # Far below chance, but on too few examples to tell.
    assert label_space_mismatch(2, zero_shot_acc=0.0, source_acc=0.0, num_examples=4) is None
    assert label_space_mismatch(2, zero_shot_acc=0.0, source_acc=0.0, num_examples=5) is not None


def test_pick_alpha_by_agreement_takes_the_argmax_then_the_alpha_closest_to_half():
    assert pick_alpha_by_agreement({0.0: 0.5, 0.25: 0.7, 0.5: 0.6, 1.0: 0.69}) == 0.25
    assert pick_alpha_by_agreement(dict.fromkeys(ALPHA_GRID, 0.8)) == 0.5
    assert pick_alpha_by_agreement({0.0: 0.9, 0.25: 0.7, 0.75: 0.9, 1.0: 0.2}) == 0.75
    assert pick_alpha_by_agreement({0.25: 0.7, 0.75: 0.7}) == 0.75  # equally far from 0.5: the larger
    assert agreement(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])) == 0.75
    with pytest.raises(ValueError):
        pick_alpha_by_agreement({})


# -- the config field --------------------------------------------------------------------------------------------

def test_the_method_is_validated_and_keys_the_transfer_stage(alpha_models):
    with pytest.raises(ValueError, match=r"`transfer_alpha_method` must be one of \('heuristic', 'agreement'\), "
                                         r"got 'vote'"):
        PipelineConfig(preset="quick", transfer_alpha_method="vote")
    assert ALPHA_METHODS == ("heuristic", "agreement") and PipelineConfig().transfer_alpha_method == "heuristic"
    heuristic = _cfg(alpha_models, transfer_alpha_method="heuristic")
    agreeing = _cfg(alpha_models, transfer_alpha_method="agreement")
    a, b = (stage_settings(c, "transfer", source_prompt_sha256="0" * 64) for c in (heuristic, agreeing))
    # The default is left out of the settings, so transfer stages keyed before the field existed keep their keys.
    assert "transfer_alpha_method" not in a and b["transfer_alpha_method"] == "agreement"
    assert settings_key(a) != settings_key(b)
    assert {k: v for k, v in a.items() if k != "transfer_alpha_method"} == \
        {k: v for k, v in b.items() if k != "transfer_alpha_method"}


# -- the transfer stage ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def alpha_models(tokenizer, tmp_path_factory):
    """A tiny target and student whose label predictions move with the text and the prompt (layers x3, output
    embeddings unscaled: the default sharpening makes both models answer one class whatever the input)."""
    root = tmp_path_factory.mktemp("alpha-models")
    paths = {}
    for name, seed, layers in (("target", 0, 2), ("student", 2, 1)):
        path = str(root / name)
        sharpen_model(build_tiny_model("llama", tokenizer, path, seed=seed, num_layers=layers), 1.0, 3.0) \
            .save_pretrained(path)
        paths[name] = path
    return paths


def _cfg(paths, **kw):
    values = dict(preset="quick", run_dir="unused", target_model=paths["target"], student_model=paths["student"],
                  label_words="bad,awful|good,great", num_virtual_tokens=4, transfer_max_steps=6,
                  transfer_batch_size=4, transfer_learning_rate=0.1, save_steps=4, eval_batch_size=8)
    return PipelineConfig(**{**values, **kw})


def _models(cfg, paths):
    """A fresh source (the student with a "tuned" prompt) and target, both deterministic."""
    source = new_prompted_model(paths["student"], cfg.post_config(paths["student"]), False, 0)
    torch.manual_seed(0)
    with torch.no_grad():
        prompt_parameter(source).add_(torch.randn_like(prompt_parameter(source)) * 3.0)
    target = new_prompted_model(paths["target"], cfg.post_config(paths["target"]), False, 0)
    return target, source, load_tokenizer(paths["target"])


PUBLIC_TRAIN = tiny_sentiment_rows(12, seed=3)
PUBLIC_EVAL = tiny_sentiment_rows(32, seed=5)


def _transfer(paths, tmp_path, eval_rows=PUBLIC_EVAL, alpha=None, **kw):
    cfg = _cfg(paths, **kw)
    target, source, tokenizer = _models(cfg, paths)
    trainer, record = transfer_prompt(cfg, target, source, tokenizer, Dataset.from_list(PUBLIC_TRAIN),
                                      Dataset.from_list(eval_rows), str(tmp_path / "transfer"), alpha=alpha)
    return trainer, record, source, tokenizer


def test_agreement_keeps_the_full_transfer_of_highest_agreement(alpha_models, tmp_path, recwarn):
    trainer, record, source, tokenizer = _transfer(alpha_models, tmp_path, transfer_alpha_method="agreement")
    assert not [w for w in recwarn if "refused" in str(w.message)]
    assert (record["alpha_method"], record["alpha_inputs"], record["alpha_check"]) == ("agreement", None, None)
    measured = {float(a): share for a, share in record["alpha_agreement"]["agreement"].items()}
    assert sorted(measured) == list(ALPHA_GRID) and len(set(measured.values())) > 1  # a real choice, not a tie
    assert record["alpha"] == pick_alpha_by_agreement(measured)
    assert record["alpha_agreement"]["num_examples"] == len(PUBLIC_EVAL)
    assert record["steps"] == 6 and record["alpha_agreement"]["total_steps"] == 6 * len(ALPHA_GRID)
    # The cache the first transfer built (and the others read) is recorded whichever α is kept.
    assert record["transfer_cache"]["dtype"] == "float32" and record["transfer_cache"]["projected_bytes"] > 0
    assert trainer.args.alpha == record["alpha"] and f"alpha={record['alpha']:g} chosen by agreement" in \
        record["alpha_note"]
    texts = [r["text"] for r in PUBLIC_EVAL]
    task = source.active_peft_config
    reference = predict_classes(source, tokenizer, texts, task)
    # An α's agreement is that of the full transfer at that α given as is (checked for the kept α and the least
    # agreeing one), and the kept prompt is the winner's, bit for bit.
    for value in (record["alpha"], min(measured, key=measured.get)):
        fixed, fixed_record, _, _ = _transfer(alpha_models, tmp_path / f"fixed-{value:g}", alpha=value)
        assert fixed_record["alpha_method"] == "given"
        assert agreement(predict_classes(fixed.model, tokenizer, texts, task), reference) == measured[value]
        if value == record["alpha"]:
            assert torch.equal(get_prompt(fixed.model), get_prompt(trainer.model))


def test_labels_out_of_range_fall_back_to_half_with_a_warning(alpha_models, tmp_path):
    shifted = [{**r, "label": r["label"] + 2} for r in PUBLIC_EVAL]  # e.g. a 4-class public set on a 2-class task
    with pytest.warns(UserWarning, match="alpha heuristic is refused: the public held-out split has labels outside"):
        trainer, record, _, _ = _transfer(alpha_models, tmp_path, eval_rows=shifted)
    assert record["alpha_method"] == "fallback" and record["alpha_inputs"] is None
    assert record["alpha"] == FALLBACK_ALPHA == 0.5 and trainer.args.alpha == 0.5
    assert "outside 0..1" in record["alpha_check"]["label_space_mismatch"]
    assert record["alpha_agreement"] is None  # agreement is opt-in: measured, it picks α = 0 (see docs/transfer.md)
    assert "the paper's heuristic was refused (the public held-out split has labels outside" in record["alpha_note"]
    # No accuracy curve against labels that are not the task's.
    assert not any("eval_accuracy" in row for row in record["log_history"])


def test_accuracies_far_below_chance_fall_back_and_a_given_alpha_is_used_as_is(alpha_models, tmp_path):
    # Public labels that are "wrong" for both models on every example, as another family's labels mostly are.
    cfg = _cfg(alpha_models)
    target, source, tokenizer = _models(cfg, alpha_models)
    pool = tiny_sentiment_rows(64, seed=7)
    texts, task = [r["text"] for r in pool], source.active_peft_config
    zero_shot = predict_classes(target, tokenizer, texts, task, prompt=None)
    prompted = predict_classes(source, tokenizer, texts, task)
    rows = [{"text": t, "label": 1 - int(z)} for t, z, s in zip(texts, zero_shot, prompted) if z == s][:8]
    assert len(rows) == 8
    with pytest.warns(UserWarning, match="alpha heuristic is refused: both public accuracies are below chance"):
        _, record, _, _ = _transfer(alpha_models, tmp_path / "refused", eval_rows=rows)
    check = record["alpha_check"]
    assert (check["public_zero_shot"], check["public_source"], check["num_examples"]) == (0.0, 0.0, 8)
    assert (record["alpha_method"], record["alpha"], record["alpha_inputs"]) == ("fallback", FALLBACK_ALPHA, None)
    assert not any("eval_accuracy" in row for row in record["log_history"])
    # An explicit α is never second-guessed.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The alpha heuristic is refused")
        _, given, _, _ = _transfer(alpha_models, tmp_path / "given", eval_rows=rows, transfer_alpha=0.3)
    assert (given["alpha"], given["alpha_method"], given["alpha_check"]) == (0.3, "given", None)


def test_a_compatible_public_set_keeps_the_heuristic(alpha_models, tmp_path):
    _, record, _, _ = _transfer(alpha_models, tmp_path)
    check = record["alpha_check"]
    assert record["alpha_method"] == "heuristic" and check["label_space_mismatch"] is None
    assert record["alpha_inputs"] == {"public_zero_shot": check["public_zero_shot"],
                                      "public_source": check["public_source"]}
    assert record["alpha_note"].startswith(f"alpha={record['alpha']:.3f} from the paper's heuristic")
    assert record["alpha_agreement"] is None


def test_the_pipeline_publishes_how_alpha_was_chosen(tiny_run):
    run_dir, args = tiny_run
    cfg = HfArgumentParser(PipelineConfig).parse_args_into_dataclasses(
        args=[*args, "--dp", "false", "--transfer_alpha_method", "agreement"])[0]
    run_pipeline(cfg, command="test")
    with open(os.path.join(run_dir, STAGE_FOLDERS["transfer"], "stage.json")) as f:
        record = json.load(f)
    measured = {float(a): s for a, s in record["alpha_agreement"]["agreement"].items()}
    assert record["alpha_method"] == "agreement" and record["alpha"] == pick_alpha_by_agreement(measured)
    assert record["settings"]["transfer_alpha_method"] == "agreement" and record["alpha_note"]

