"""The DP guarantee against an attacker who reads everything we publish (issue 15): secret noise, no selection on
private data, a ledger that composes or clears, σ calibrated for the steps that run, exact DP resume."""

import json
import math
import os
import warnings

import pytest
import torch
from peft import get_peft_model
from transformers import EarlyStoppingCallback

from peft_post import POSTConfig
from peft_post.config import guarantee_holds, validate_privacy_ledger
from peft_post.hub import build_model_card
from peft_post.modeling import prompt_parameter
from peft_post.testing import tiny_sentiment_dataset
from peft_post.tuning import DPConfig, DPPromptTrainer, PromptTrainer, PromptTrainingConfig
from peft_post.tuning import privacy
from peft_post.tuning.accountant import history_epsilon

CAUSAL = dict(task_type="CAUSAL_LM", template="{text} It was", label_words=[["bad"], ["good"]])


def fresh_model(load_tiny, config=None):
    torch.manual_seed(0)  # the same starting prompt every time: only the mechanism's randomness may differ
    return get_peft_model(load_tiny("gpt2"), config or POSTConfig(num_virtual_tokens=3, **CAUSAL))


def args(path, **kw):
    base = dict(output_dir=str(path), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                save_strategy="no", disable_tqdm=True, seed=0)
    base.update(kw)
    return PromptTrainingConfig(**base)


def train_dp(model, tokenizer, path, dp, data=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPPromptTrainer(model, args(path, **kw), dp, train_dataset=data or tiny_sentiment_dataset(16),
                                  processing_class=tokenizer)
        trainer.train()
    return trainer


def release(trainer, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.save_model(str(path))
    return str(path)


def test_an_attacker_with_every_published_artifact_cannot_replay_the_noise(load_tiny, tokenizer, tmp_path):
    """Before the fix, rerunning with the published seed reproduced the released prompt exactly (difference 0)."""
    dp = DPConfig(noise_multiplier=1.0, target_delta=1e-3)
    published = train_dp(fresh_model(load_tiny), tokenizer, tmp_path / "user", dp)
    folder = release(published, tmp_path / "released")
    config = POSTConfig.from_pretrained(folder)
    released = prompt_parameter(published.model).detach().clone()
    everything = "".join(open(os.path.join(folder, f), encoding="utf-8", errors="ignore").read()
                         for f in os.listdir(folder) if f.endswith((".json", ".md")))
    assert "seed" not in json.dumps(config.provenance), "no seed of the run is published with a DP prompt"
    assert "training_args.bin" not in os.listdir(folder) and privacy.NOISE_KEY_NAME not in os.listdir(folder)
    card = str(build_model_card(config, "user/prompt", base_model="tiny-gpt2"))
    assert "seed" not in card.lower()
    # The attacker knows the data, the config, the ledger, the card, and tries the seeds a run could have used.
    for seed in (0, 42):
        replay = train_dp(fresh_model(load_tiny), tokenizer, tmp_path / f"attacker{seed}", dp, seed=seed)
        assert (prompt_parameter(replay.model) - released).abs().max() > 1e-3
    assert "dp_noise_key" not in everything


def test_insecure_noise_seed_replays_exactly_and_the_ledger_and_card_say_the_guarantee_fails(load_tiny, tokenizer,
                                                                                              tmp_path):
    dp = DPConfig(noise_multiplier=1.0, target_delta=1e-3, insecure_noise_seed=7)
    runs = [train_dp(fresh_model(load_tiny), tokenizer, tmp_path / f"r{i}", dp, seed=i) for i in range(2)]
    torch.testing.assert_close(prompt_parameter(runs[0].model), prompt_parameter(runs[1].model), atol=0, rtol=0)
    ledger = runs[0].privacy_report()
    assert ledger["guarantee_holds"] is False and ledger["noise_source"] == "fixed_seed"
    assert "replay" in ledger["guarantee_void_reasons"][0] and not guarantee_holds(ledger)
    config = POSTConfig.from_pretrained(release(runs[0], tmp_path / "out"))
    card = build_model_card(config, "user/prompt", base_model="tiny-gpt2")
    assert "differential-privacy" not in card.data.tags
    assert "does not hold" in str(card)


def test_the_batches_and_noise_do_not_depend_on_the_training_seed_or_torchs_generator(load_tiny, tokenizer, tmp_path):
    dp = DPConfig(noise_multiplier=1.0, target_delta=1e-3, insecure_noise_seed=3)
    a = train_dp(fresh_model(load_tiny), tokenizer, tmp_path / "a", dp, seed=1)
    torch.manual_seed(12345)
    b = train_dp(fresh_model(load_tiny), tokenizer, tmp_path / "b", dp, seed=2)
    torch.testing.assert_close(prompt_parameter(a.model), prompt_parameter(b.model), atol=0, rtol=0)


@pytest.mark.parametrize(
    "setting,match",
    [
        (dict(eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, save_strategy="steps", save_steps=1),
         "load_best_model_at_end"),
        (dict(metric_for_best_model="accuracy"), "metric_for_best_model"),
        (dict(lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps", eval_steps=1), "reduce_lr_on_plateau"),
    ],
)
def test_dp_refuses_selection_on_evaluation_metrics(load_tiny, tokenizer, tmp_path, setting, match):
    with pytest.raises(ValueError, match=match):
        DPPromptTrainer(fresh_model(load_tiny), args(tmp_path, **setting), DPConfig(noise_multiplier=1.0),
                        train_dataset=tiny_sentiment_dataset(16), eval_dataset=tiny_sentiment_dataset(8),
                        processing_class=tokenizer)


def test_dp_refuses_early_stopping_and_hyperparameter_search(load_tiny, tokenizer, tmp_path):
    kw = dict(train_dataset=tiny_sentiment_dataset(16), processing_class=tokenizer)
    with pytest.raises(ValueError, match="EarlyStoppingCallback"):
        DPPromptTrainer(fresh_model(load_tiny), args(tmp_path), DPConfig(noise_multiplier=1.0),
                        callbacks=[EarlyStoppingCallback(early_stopping_patience=1)], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPPromptTrainer(fresh_model(load_tiny), args(tmp_path), DPConfig(noise_multiplier=1.0), **kw)
    with pytest.raises(ValueError, match="EarlyStoppingCallback"):
        trainer.add_callback(EarlyStoppingCallback)
    with pytest.raises(ValueError, match="hyperparameter search"):
        trainer.hyperparameter_search()
    # Non-private training may select on evaluation data: it claims no guarantee.
    PromptTrainer(fresh_model(load_tiny), args(tmp_path, metric_for_best_model="accuracy"), **kw)


def test_dp_on_a_dp_prompt_continues_the_accountant_history(load_tiny, tokenizer, tmp_path):
    first = train_dp(fresh_model(load_tiny), tokenizer, tmp_path / "a", DPConfig(noise_multiplier=1.2, target_delta=1e-3))
    folder = release(first, tmp_path / "first")
    model = fresh_model(load_tiny, POSTConfig.from_pretrained(folder))
    second = train_dp(model, tokenizer, tmp_path / "b", DPConfig(noise_multiplier=0.9, target_delta=1e-3), max_steps=2)
    ledger = second.privacy_report()
    assert ledger["history"] == [[1.2, 0.25, 3], [0.9, 0.25, 2]] and ledger["steps"] == 5
    assert ledger["epsilon"] == pytest.approx(history_epsilon([(1.2, 0.25, 3), (0.9, 0.25, 2)], 1e-3))
    assert ledger["epsilon"] > first.privacy_report()["epsilon"]
    validate_privacy_ledger(ledger)


def test_a_target_epsilon_on_a_dp_prompt_budgets_both_runs(load_tiny, tokenizer, tmp_path):
    first = train_dp(fresh_model(load_tiny), tokenizer, tmp_path / "a", DPConfig(noise_multiplier=1.2, target_delta=1e-3))
    spent = first.privacy_report()["epsilon"]
    config = POSTConfig.from_pretrained(release(first, tmp_path / "first"))
    target = spent + 1.0
    second = train_dp(fresh_model(load_tiny, config), tokenizer, tmp_path / "b",
                      DPConfig(target_epsilon=target, target_delta=1e-3, epsilon_tolerance=0.1))
    assert target - 0.1 <= second.privacy_report()["epsilon"] <= target
    with pytest.raises(ValueError, match="already spent"):
        DPPromptTrainer(fresh_model(load_tiny, config), args(tmp_path / "c"),
                        DPConfig(target_epsilon=spent / 2, target_delta=1e-3),
                        train_dataset=tiny_sentiment_dataset(16), processing_class=tokenizer)


def test_non_private_training_on_a_dp_prompt_clears_the_claim_and_dp_on_top_needs_a_statement(load_tiny, tokenizer,
                                                                                               tmp_path):
    first = train_dp(fresh_model(load_tiny), tokenizer, tmp_path / "a", DPConfig(noise_multiplier=1.2, target_delta=1e-3))
    config = POSTConfig.from_pretrained(release(first, tmp_path / "first"))
    model = fresh_model(load_tiny, config)
    plain = PromptTrainer(model, args(tmp_path / "b"), train_dataset=tiny_sentiment_dataset(16),
                          processing_class=tokenizer)
    with pytest.warns(UserWarning, match="no DP guarantee"):
        plain.train()
    cleared = POSTConfig.from_pretrained(release(plain, tmp_path / "plain"))
    assert cleared.privacy is None
    assert "without DP" in cleared.provenance["dp_claim_cleared"]["reason"]
    card = build_model_card(cleared, "user/prompt", base_model="tiny-gpt2")
    assert "differential-privacy" not in card.data.tags and "no differential-privacy guarantee" in str(card)
    # DP on top of it cannot undo what the non-private steps revealed, unless that training was on public data.
    with pytest.raises(ValueError, match="public_initial_prompt"):
        DPPromptTrainer(fresh_model(load_tiny, cleared), args(tmp_path / "c"), DPConfig(noise_multiplier=1.0),
                        train_dataset=tiny_sentiment_dataset(16), processing_class=tokenizer)
    stated = train_dp(fresh_model(load_tiny, cleared), tokenizer, tmp_path / "d",
                      DPConfig(noise_multiplier=1.0, target_delta=1e-3, public_initial_prompt=True))
    assert "public data only" in stated.privacy_report()["initial_prompt"]


def test_fixed_size_batches_calibrate_sigma_for_the_steps_that_run(load_tiny, tokenizer, tmp_path):
    data = tiny_sentiment_dataset(18)
    dp = DPConfig(target_epsilon=2.0, target_delta=1e-3, poisson_sampling=False, epsilon_tolerance=0.1)
    # One epoch of B = 4 over N = 18 runs ceil(18 / 4) = 5 steps (int(N / B) = 4 under-counted them: ε 2.28 > 2).
    trainer = train_dp(fresh_model(load_tiny), tokenizer, tmp_path, dp, data=data, max_steps=-1, num_train_epochs=1)
    assert trainer.planned_steps == 5 and trainer.state.global_step == 5
    assert trainer.privacy_report()["epsilon"] <= 2.0


def test_a_resumed_dp_run_releases_the_prompt_of_an_uninterrupted_one(load_tiny, tokenizer, tmp_path):
    dp = DPConfig(noise_multiplier=1.0, target_delta=1e-3)  # secret noise: the key travels in the checkpoint
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = train_dp(fresh_model(load_tiny), tokenizer, tmp_path / "a", dp, **kw)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / privacy.NOISE_KEY_NAME).is_file(), "the key is kept in the user's private checkpoint"
    resumed_model = fresh_model(load_tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = DPPromptTrainer(resumed_model, args(tmp_path / "b", **kw), dp, train_dataset=tiny_sentiment_dataset(16),
                                  processing_class=tokenizer)
        resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(prompt_parameter(resumed.model), prompt_parameter(full.model), atol=0, rtol=0)
    assert resumed.privacy_report()["history"] == full.privacy_report()["history"]
    assert privacy.NOISE_KEY_NAME not in os.listdir(release(full, tmp_path / "released"))


def test_a_step_past_the_plan_is_refused_and_a_finished_run_resumes_from_the_checkpoint_before(load_tiny, tokenizer,
                                                                                               tmp_path):
    # The Trainer resumed from a checkpoint saved at its last step trains one step more (4 Poisson batches an epoch,
    # 5 steps: it resumes in epoch 1 and steps before it checks max_steps). Under DP that step spends budget σ was
    # not calibrated for, so the trainer refuses it before reading the batch.
    from peft_post.pipeline import checkpoint_step, resume_checkpoint

    dp = DPConfig(noise_multiplier=1.0, target_delta=1e-3)
    kw = dict(max_steps=5, save_strategy="steps", save_steps=2)
    full = train_dp(fresh_model(load_tiny), tokenizer, tmp_path / "a", dp, **kw)
    assert checkpoint_step(str(tmp_path / "a" / "checkpoint-5")) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = DPPromptTrainer(fresh_model(load_tiny), args(tmp_path / "b", **kw), dp,
                                train_dataset=tiny_sentiment_dataset(16), processing_class=tokenizer)
        with pytest.raises(RuntimeError, match="DP step 6 would exceed the 5 steps"):
            again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    assert again.privacy_report()["steps"] == 5
    # The pipeline's choice: the newest complete checkpoint before the last step (the finished one is removed), from
    # which the last steps replay exactly, noise included.
    os.makedirs(tmp_path / "a" / "checkpoint-6")  # an interrupted save: no trainer_state.json
    assert resume_checkpoint(str(tmp_path / "a"), 5) == str(tmp_path / "a" / "checkpoint-4")
    assert sorted(os.listdir(tmp_path / "a")) == ["checkpoint-2", "checkpoint-4"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = DPPromptTrainer(fresh_model(load_tiny), args(tmp_path / "c", **kw), dp,
                                  train_dataset=tiny_sentiment_dataset(16), processing_class=tokenizer)
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    torch.testing.assert_close(prompt_parameter(resumed.model), prompt_parameter(full.model), atol=0, rtol=0)
    assert resumed.privacy_report()["history"] == full.privacy_report()["history"]


def test_noise_source_is_secret_by_default_and_keyed_per_purpose_and_step():
    a, b = privacy.NoiseSource(), privacy.NoiseSource()
    draw = lambda source, *index: torch.rand(4, generator=source.generator(*index))  # noqa: E731
    assert not torch.equal(draw(a, "noise", 0), draw(b, "noise", 0)), "two runs never share noise"
    assert not torch.equal(draw(a, "noise", 0), draw(a, "noise", 1))
    assert not torch.equal(draw(a, "noise", 0), draw(a, "poisson", 0))
    assert torch.equal(draw(a, "noise", 5), draw(a, "noise", 5))
    restored = privacy.NoiseSource()
    restored.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert torch.equal(draw(restored, "noise", 5), draw(a, "noise", 5))
    assert a.kind == "os_entropy" and privacy.NoiseSource(seed=1).kind == "fixed_seed"
    assert math.isfinite(float(draw(a, "noise", 0).sum()))
