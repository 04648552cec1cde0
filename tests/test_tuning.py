"""Non-private prompt tuning: PromptTrainingConfig, PromptTrainer (loss, accumulation, evaluation, saving)."""

import warnings

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, PromptTuningConfig, get_peft_model

from peft_post import POSTConfig, evaluate_prompt
from peft_post.losses import verbalizer_loss
from peft_post.modeling import label_logits, prompt_parameter
from peft_post.prompts import get_prompt
from peft_post.tasks import Verbalizer
from peft_post.testing import tiny_sentiment_dataset
from peft_post.tuning import PromptTrainer, PromptTrainingConfig

CAUSAL = dict(task_type="CAUSAL_LM", template="{text} It was", label_words=[["bad"], ["good"]])
MASKED = dict(task_type="FEATURE_EXTRACTION", template="{text} It was {mask}.", label_words=[["bad"], ["good"]])


def peft_model(load_tiny, kind, n=3):
    torch.manual_seed(0)
    return get_peft_model(load_tiny(kind), POSTConfig(num_virtual_tokens=n, **(MASKED if kind in ("roberta", "bert") else CAUSAL)))


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                save_strategy="no", disable_tqdm=True, seed=0)
    base.update(kw)
    return PromptTrainingConfig(**base)


def test_config_defaults_are_for_prompts(tmp_path):
    cfg = PromptTrainingConfig(str(tmp_path))
    assert cfg.learning_rate == 3e-2
    assert cfg.weight_decay == 0.0
    assert cfg.max_grad_norm == 0.0
    assert cfg.remove_unused_columns is False
    assert cfg.disable_dropout is True
    assert cfg.report_to == []
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "disable_dropout"):
        assert PromptTrainingConfig.__dataclass_fields__[name].metadata["help"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(remove_unused_columns=True), "remove_unused_columns"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(text_column=""), "text_column"),
    ],
)
def test_config_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptTrainingConfig(str(tmp_path), **kwargs)


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_trains_only_the_prompt_and_lowers_the_loss(load_tiny, tokenizer, tmp_path, kind):
    model = peft_model(load_tiny, kind)
    data = tiny_sentiment_dataset(16)
    frozen = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    trainer = PromptTrainer(model, args(tmp_path, max_steps=6, learning_rate=1e-2, per_device_train_batch_size=16), train_dataset=data,
                            eval_dataset=data, processing_class=tokenizer)
    first = trainer.evaluate()["eval_loss"]
    before = get_prompt(model)
    trainer.train()
    assert not torch.equal(before, get_prompt(model))
    for n, p in model.get_base_model().named_parameters():
        assert torch.equal(p, frozen[n]), f"{n} changed: only the prompt may train"
    assert trainer.evaluate()["eval_loss"] < first
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.0 for p in dropouts), "disable_dropout must zero the frozen LM's dropout"


def test_compute_loss_is_the_mean_verbalizer_loss(load_tiny, tokenizer, tmp_path):
    model = peft_model(load_tiny, "llama").eval()
    data = tiny_sentiment_dataset(8)
    trainer = PromptTrainer(model, args(tmp_path), train_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator(list(data))
    loss = trainer.compute_loss(model, batch)
    v = Verbalizer.from_config(model.peft_config["default"], tokenizer)
    logits = label_logits(model, batch["input_ids"], batch["attention_mask"], batch["label_positions"])
    torch.testing.assert_close(loss, verbalizer_loss(logits, batch["labels"], v.index, v.weight))
    # With the whole accumulated batch counted, the sum is divided by that count instead.
    torch.testing.assert_close(trainer.compute_loss(model, batch, num_items_in_batch=16), loss / 2)


def test_gradient_accumulation_equals_the_full_batch(load_tiny, tokenizer, tmp_path):
    data = tiny_sentiment_dataset(8)
    prompts = []
    for batch_size, accumulation in ((8, 1), (3, 3)):
        model = peft_model(load_tiny, "gpt2")
        trainer = PromptTrainer(
            model,
            args(tmp_path, max_steps=1, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                 optim="sgd", learning_rate=1.0, lr_scheduler_type="constant"),
            train_dataset=data, processing_class=tokenizer,
        )
        trainer.train()
        prompts.append(get_prompt(model))
    # 3 + 3 + 2 examples with unequal micro-batches: a mean of per-micro-batch means would differ.
    torch.testing.assert_close(prompts[0], prompts[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2", "bert"])
def test_evaluate_reports_accuracy_of_evaluate_prompt(load_tiny, tokenizer, tmp_path, kind):
    model = peft_model(load_tiny, kind)
    data = tiny_sentiment_dataset(12, seed=4)
    trainer = PromptTrainer(model, args(tmp_path, per_device_eval_batch_size=5), eval_dataset={"dev": data, "train": data},
                            train_dataset=data, processing_class=tokenizer)
    metrics = trainer.evaluate()
    expected = evaluate_prompt(model, tokenizer, data, model.peft_config["default"], disable_progress=True)
    assert metrics["eval_dev_accuracy"] == expected["accuracy"] == metrics["eval_train_accuracy"]
    assert metrics["eval_dev_num_examples"] == 12
    norms = prompt_parameter(model).detach().norm(dim=-1)
    assert metrics["eval_dev_prompt_norm_mean"] == pytest.approx(float(norms.mean()))
    assert metrics["eval_dev_embedding_norm_mean"] > 0
    single = trainer.evaluate(data, metric_key_prefix="test")
    assert single["test_accuracy"] == expected["accuracy"]


def test_weight_decay_shrinks_the_prompt(load_tiny, tokenizer, tmp_path):
    norms = {}
    for wd in (0.0, 0.5):
        model = peft_model(load_tiny, "gpt2")
        trainer = PromptTrainer(model, args(tmp_path, max_steps=4, weight_decay=wd), train_dataset=tiny_sentiment_dataset(8),
                                processing_class=tokenizer)
        trainer.train()
        norms[wd] = float(get_prompt(model).norm())
    assert norms[0.5] < norms[0.0]


def test_saved_prompt_loads_in_plain_peft_with_provenance(load_tiny, tokenizer, tmp_path):
    model = peft_model(load_tiny, "gpt2")
    trainer = PromptTrainer(model, args(tmp_path), train_dataset=tiny_sentiment_dataset(8), processing_class=tokenizer)
    trainer.train()
    out = str(tmp_path / "final")
    trainer.save_model(out)
    cfg = POSTConfig.from_pretrained(out)
    assert cfg.privacy is None
    assert cfg.provenance["stage"] == "prompt_tuning" and cfg.provenance["global_step"] == 2
    assert cfg.provenance["num_train_examples"] == 8
    plain = PeftModel.from_pretrained(load_tiny("gpt2"), out)
    torch.testing.assert_close(prompt_parameter(plain), prompt_parameter(model))


def test_bad_inputs_raise_before_training(load_tiny, tokenizer, tmp_path):
    model = peft_model(load_tiny, "gpt2")
    data = tiny_sentiment_dataset(8)
    with pytest.raises(ValueError, match="processing_class"):
        PromptTrainer(model, args(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="PeftModel"):
        PromptTrainer(load_tiny("gpt2"), args(tmp_path), train_dataset=data, processing_class=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = get_peft_model(load_tiny("gpt2"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="POSTConfig"):
        PromptTrainer(plain, args(tmp_path), train_dataset=data, processing_class=tokenizer)
    with pytest.raises(ValueError, match="labels outside"):
        PromptTrainer(model, args(tmp_path), train_dataset=Dataset.from_list([{"text": "a", "label": 5}]),
                      processing_class=tokenizer)
    with pytest.raises(ValueError, match="no text column"):
        PromptTrainer(model, args(tmp_path, text_column="sentence"), train_dataset=data, processing_class=tokenizer)
    for p in model.get_base_model().parameters():
        p.requires_grad_(True)
        break
    with pytest.raises(ValueError, match="Only the soft prompt"):
        PromptTrainer(model, args(tmp_path), train_dataset=data, processing_class=tokenizer)
