"""The generation task kind: answers scored under teacher forcing exactly, exact per-example DP gradients over whole
sequences, greedy generation consistent with the training forward, shipped metrics, and trainers that learn."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_post import POSTConfig, TaskTemplate
from peft_post.evaluation import load_metric
from peft_post.generation import (AnswerCollator, answer_logits, answer_losses, answer_token_ids, evaluate_generation,
                                  generate_answers, generation_report, token_f1)
from peft_post.modeling import prompt_parameter, quiet_checkpointing_deprecation
from peft_post.testing import sharpen_model, tiny_generation_dataset, tiny_generation_rows
from peft_post.tuning import privacy

TEMPLATE = "Review: {text}\nIn short:"


def prompted(load_tiny, kind="llama", n=3, seed=0, sharpen=False, **config):
    torch.manual_seed(seed)
    cfg = POSTConfig(task_kind="generation", num_virtual_tokens=n, template=TEMPLATE, max_length=64,
                     max_answer_tokens=config.pop("max_answer_tokens", 6), **config)
    base = load_tiny(kind)
    if sharpen:  # prompt-sensitive, so that a prompt can learn something
        sharpen_model(base, factor=5.0, gain=3.0)
    with quiet_checkpointing_deprecation():
        return get_peft_model(base, cfg).eval()


def collator_for(tokenizer, model):
    cfg = model.peft_config["default"]
    return AnswerCollator(TaskTemplate.from_config(cfg, tokenizer), max_answer_tokens=cfg.max_answer_tokens)


def test_answer_tokens_follow_the_template_and_end_with_eos(tokenizer):
    ids = answer_token_ids(tokenizer, "very good", max_answer_tokens=6)
    assert ids == tokenizer(" very good", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # Cut to the budget, EOS kept: the model learns to stop.
    assert answer_token_ids(tokenizer, "very good", max_answer_tokens=2) == ids[:1] + [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="non-empty string"):
        answer_token_ids(tokenizer, " ", 4)


def brute_force_answer_losses(model, tokenizer, rows, prompt):
    """Each row alone, unpadded: template + answer through the model's ordinary forward; minus the mean log-prob of
    the answer tokens."""
    cfg = model.peft_config["default"]
    template = TaskTemplate.from_config(cfg, tokenizer)
    base = model.get_base_model()
    out = []
    for row in rows:
        ids = template.encode(row["text"])
        answer = answer_token_ids(tokenizer, row["answer"], cfg.max_answer_tokens)
        embeds = base.get_input_embeddings()(torch.tensor([ids + answer]))
        n = 0
        if prompt is not None:
            n = prompt.shape[0]
            embeds = torch.cat([prompt.unsqueeze(0).to(embeds.dtype), embeds], dim=1)
        log_p = F.log_softmax(base(inputs_embeds=embeds).logits[0].double(), -1)
        out.append(-sum(log_p[n + len(ids) - 1 + j, t] for j, t in enumerate(answer)) / len(answer))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_answer_losses_equal_one_forward_per_example(load_tiny, tokenizer, kind, with_prompt):
    model = prompted(load_tiny, kind)
    model.double()
    rows = tiny_generation_rows(6, seed=2)
    batch = collator_for(tokenizer, model)(rows)
    assert batch["target_mask"].sum(-1).min() < batch["target_mask"].sum(-1).max() or \
        batch["attention_mask"].sum(-1).min() < batch["attention_mask"].sum(-1).max()
    with torch.no_grad():
        ours = answer_losses(model, batch, prompt="auto" if with_prompt else None)
        expected = brute_force_answer_losses(model, tokenizer, rows, prompt_parameter(model) if with_prompt else None)
    torch.testing.assert_close(ours.double(), expected, atol=1e-9, rtol=1e-9)
    assert answer_logits(model, batch).shape == (*batch["targets"].shape, len(tokenizer))


def test_dp_per_example_gradients_over_answers_equal_brute_force(load_tiny, tokenizer):
    model = prompted(load_tiny, "gpt2")
    model.double()
    rows = tiny_generation_rows(5, seed=4)
    collate = collator_for(tokenizer, model)
    grads, losses = privacy.per_example_gradients(model, collate(rows), prompt_parameter(model), answer_losses)
    prompt = prompt_parameter(model)
    expected = torch.stack([torch.autograd.grad(answer_losses(model, collate([row]), prompt=prompt).sum(), prompt)[0]
                            for row in rows])
    torch.testing.assert_close(grads, expected, atol=1e-9, rtol=1e-7)
    assert (grads[0] - grads[1]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("use_prompt", [False, True])
def test_greedy_answers_are_the_argmax_of_the_training_forward(load_tiny, tokenizer, kind, use_prompt):
    """Greedy generation (batched, mixed lengths) and the teacher-forced forward of training agree: each generated
    token is the argmax of the training forward's logits at its position, for each row scored alone."""
    model = prompted(load_tiny, kind, max_answer_tokens=4)
    cfg = model.peft_config["default"]
    rows = tiny_generation_rows(5, seed=6)
    template = TaskTemplate.from_config(cfg, tokenizer)
    answers = generate_answers(model, tokenizer, [r["text"] for r in rows], template, max_new_tokens=4, batch_size=3,
                               prompt="auto" if use_prompt else None)
    collate = collator_for(tokenizer, model)
    for row, answer in zip(rows, answers):
        assert len(answer) <= 4
        # The answer as generated, plus what came next (EOS, or the token past the budget).
        batch = collate([{"text": row["text"], "answer_ids": answer + [0]}])
        with torch.no_grad():
            greedy = answer_logits(model, batch, prompt="auto" if use_prompt else None)[0].argmax(-1).tolist()
        assert greedy[: len(answer)] == answer
        if len(answer) < 4:
            assert greedy[len(answer)] == tokenizer.eos_token_id


def test_shipped_metrics_are_squad_exact_match_and_token_f1():
    predictions = ["The City", "red car", "blue", ""]
    references = ["city", "red bus", "green", ""]
    scores = load_metric("answer_match").compute(predictions=predictions, references=references)
    assert scores["exact_match"] == 0.5
    assert scores["token_f1"] == pytest.approx((1.0 + 0.5 + 0.0 + 1.0) / 4)
    assert token_f1("a red car", "red car") == 1.0
    report = generation_report(["city\nnext line", "car"], ["City", "bus"])
    assert report["exact_match"] == 0.5 and report["per_example_correct"] == "10"
    assert report["predictions"] == ["city", "car"]


@pytest.mark.parametrize("dp", [False, True])
def test_trainers_learn_a_generation_task(load_tiny, tokenizer, tmp_path, dp):
    from peft_post import DPConfig, DPPromptTrainer, PromptTrainer, PromptTrainingConfig

    model = prompted(load_tiny, "llama", n=4, sharpen=True)
    train, test = tiny_generation_dataset(32, seed=0), tiny_generation_dataset(16, seed=1)
    args = PromptTrainingConfig(str(tmp_path), max_steps=30, per_device_train_batch_size=16, learning_rate=0.1,
                                save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1)
    trainer_cls, extra = (DPPromptTrainer, {"dp_config": DPConfig(noise_multiplier=0.05, max_grad_norm=10.0)}) if dp \
        else (PromptTrainer, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model, args, train_dataset=train, eval_dataset=test, processing_class=tokenizer,
                              **extra)
        before = trainer.evaluate()
        trainer.train()
        after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 0.5, (before["eval_loss"], after["eval_loss"])
    assert 0.0 <= after["eval_exact_match"] <= 1.0 and after["eval_num_examples"] == 16
    report = evaluate_generation(model, tokenizer, test, model.peft_config["default"])
    assert report["exact_match"] == after["eval_exact_match"] and report["token_f1"] == after["eval_token_f1"]


def test_generation_inputs_are_checked_before_any_work(load_tiny, tokenizer, tmp_path):
    from datasets import Dataset

    from peft_post import PromptTrainer, PromptTrainingConfig

    args = PromptTrainingConfig(str(tmp_path), max_steps=1, save_strategy="no", disable_tqdm=True)
    no_answer = Dataset.from_list([{"text": "a b"}])
    with pytest.raises(ValueError, match="no answer column 'answer'"):
        PromptTrainer(prompted(load_tiny), args, train_dataset=no_answer, processing_class=tokenizer)
    empty_answer = Dataset.from_list([{"text": "a b", "answer": " "}])
    with pytest.raises(ValueError, match="empty or non-string answer"):
        PromptTrainer(prompted(load_tiny), args, train_dataset=empty_answer, processing_class=tokenizer)
    with pytest.raises(ValueError, match="task_kind"):
        POSTConfig(task_kind="summarise")
    with pytest.raises(ValueError, match="CAUSAL_LM"):
        POSTConfig(task_kind="generation", task_type="FEATURE_EXTRACTION", template="{text} {mask}")
    with pytest.raises(ValueError, match="max_answer_tokens"):
        POSTConfig(task_kind="generation", max_answer_tokens=0)


# ---- the POST transfer of a generation prompt ----


def _generation_pair(tokenizer, tmp_path, seed=0):
    """A sharpened tiny source with a 'tuned' prompt and a larger sharpened tiny target, one generation task."""
    from peft_post.testing import build_tiny_model

    def cfg():
        return POSTConfig(task_kind="generation", num_virtual_tokens=3, template=TEMPLATE, max_length=64,
                          max_answer_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="say the mood",
                          tokenizer_name_or_path=tokenizer.name_or_path)

    with quiet_checkpointing_deprecation():
        source = get_peft_model(sharpen_model(build_tiny_model("llama", tokenizer, str(tmp_path / "src"), seed=seed),
                                              factor=5.0, gain=3.0), cfg())
        target = get_peft_model(sharpen_model(build_tiny_model("llama", tokenizer, str(tmp_path / "tgt"), seed=1,
                                                               num_layers=3, hidden_size=48), factor=5.0, gain=3.0),
                                cfg())
    torch.manual_seed(seed)
    with torch.no_grad():
        prompt_parameter(source).add_(torch.randn_like(prompt_parameter(source)) * 3.0)
    return source, target


@pytest.mark.parametrize("continuation", ["source_greedy", "public_answers"])
def test_generation_transfer_applies_the_post_loss_at_every_answer_position(tokenizer, tmp_path, continuation):
    from peft_post import TransferConfig, TransferTrainer, transfer_loss

    source, target = _generation_pair(tokenizer, tmp_path)
    public, held_out = tiny_generation_dataset(12, seed=3), tiny_generation_dataset(8, seed=4)
    args = TransferConfig(output_dir=str(tmp_path / "out"), alpha=0.4, max_steps=20, learning_rate=0.1,
                          per_device_train_batch_size=4, continuation=continuation, disable_tqdm=True,
                          logging_steps=1000)
    trainer = TransferTrainer(target, source, args, public_dataset=public, public_eval_dataset=held_out,
                              processing_class=tokenizer)
    answers = trainer.prepare_continuations()
    cfg = target.peft_config["default"]
    if continuation == "public_answers":
        assert answers == [answer_token_ids(tokenizer, a, 5) for a in public["answer"]]
    else:
        greedy = generate_answers(source, tokenizer, public["text"], TaskTemplate.from_config(cfg, tokenizer),
                                  max_new_tokens=5)
        assert answers == [(g + [tokenizer.eos_token_id])[:5] for g in greedy]
    # The loss of a batch is the POST loss over its answer tokens, from the four models' teacher-forced logits.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        loss = trainer.compute_loss(target, batch)
        mask = batch["target_mask"]
        a_t, b_t = answer_logits(target, batch)[mask], answer_logits(target, batch, prompt=None)[mask]
        a_s, b_s = answer_logits(source, batch)[mask], answer_logits(source, batch, prompt=None)[mask]
    assert a_t.shape[0] == int(mask.sum()) > 4
    torch.testing.assert_close(loss, transfer_loss(a_t, b_t, a_s, b_s, alpha=0.4, temperature=2.0))
    source_before = {k: v.clone() for k, v in source.state_dict().items()}
    p_t0 = prompt_parameter(target).detach().clone()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(target, batch)
    assert after < loss
    assert not torch.equal(prompt_parameter(target).detach(), p_t0)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in source_before.items())
    metrics = trainer.evaluate()
    assert {"eval_exact_match", "eval_token_f1", "eval_num_examples"} <= set(metrics)
    provenance = trainer.record_provenance()
    assert provenance["continuation"] == continuation and provenance["cache"] == "off"


def test_generation_transfer_checks_its_inputs(tokenizer, tmp_path):
    from datasets import Dataset

    from peft_post import TransferConfig, TransferTrainer

    source, target = _generation_pair(tokenizer, tmp_path)
    args = TransferConfig(output_dir=str(tmp_path / "out"), alpha=0.4, continuation="public_answers")
    with pytest.raises(ValueError, match="no answer column 'answer'"):
        TransferTrainer(target, source, args, public_dataset=Dataset.from_list([{"text": "a b"}]),
                        processing_class=tokenizer)
    with pytest.raises(ValueError, match="continuation"):
        TransferConfig(output_dir=str(tmp_path / "out"), alpha=0.4, continuation="teacher")
    classification = POSTConfig(num_virtual_tokens=3, template=TEMPLATE, max_length=64)
    with quiet_checkpointing_deprecation():
        other = get_peft_model(copy.deepcopy(target.get_base_model()), classification)
    with pytest.raises(ValueError, match="different tasks"):
        TransferTrainer(other, source, args, public_dataset=tiny_generation_dataset(4), processing_class=tokenizer)


def test_alpha_heuristic_of_a_generation_task_has_chance_level_zero():
    from peft_post import suggest_alpha

    assert suggest_alpha(0.2, 0.5, None) == pytest.approx(0.4)
    assert suggest_alpha(0.6, 0.5, None) == 1.0 and suggest_alpha(0.0, 0.3, None) == 0.0
    with pytest.warns(UserWarning, match="nothing to imitate"):
        assert suggest_alpha(0.1, 0.0, None) == 1.0
    with pytest.raises(ValueError, match="None for a generation task"):
        suggest_alpha(0.2, 0.5, 1)
