import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import get_peft_model

from peft_post import POSTConfig, evaluate_prompt
from peft_post.evaluation import accuracy_report, load_accuracy_metric, load_metric, score_dataset
from peft_post.prompts import get_prompt, prompt_from_text, set_prompt
from peft_post.tasks import Verbalizer


def test_evaluate_known_accuracy_with_a_hand_built_prompt(load_tiny, tokenizer):
    cfg = POSTConfig(num_virtual_tokens=2, label_words=[["bad"], ["good"]])
    model = load_tiny("gpt2")
    v = Verbalizer.from_config(cfg, tokenizer)
    data = Dataset.from_list([{"text": f"review {i}", "label": i % 2} for i in range(10)])
    head = model.lm_head.weight  # tied to the input embeddings
    # Make the base model predict class 0 for every input by a huge bias on the class-0 label token.
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        head[:, 0] = 0.0
        head[v.token_ids[0][0], 0] = 10.0
    zs = evaluate_prompt(model, tokenizer, data, cfg, batch_size=3, disable_progress=True)
    assert zs["accuracy"] == 0.5
    assert zs["per_class"] == {0: {"total": 5, "correct": 5, "predicted": 10}, 1: {"total": 5, "correct": 0, "predicted": 0}}

    peft_model = get_peft_model(model, cfg)
    peft_model.train()
    assert evaluate_prompt(peft_model, tokenizer, data, cfg, disable_progress=True)["accuracy"] == 0.5
    assert peft_model.training, "evaluation must restore the caller's train mode"
    assert evaluate_prompt(peft_model, tokenizer, data, cfg, use_prompt=False, disable_progress=True) == zs


def test_score_dataset_returns_each_rows_scores_in_dataset_order(load_tiny, tokenizer):
    # Rows of very different lengths, so the length-ordered batches differ from the dataset's order.
    cfg = POSTConfig(num_virtual_tokens=2, label_words=[["bad"], ["good"]])
    model = get_peft_model(load_tiny("llama"), cfg)
    texts = ["good " * n + "film" for n in (9, 1, 5, 0, 7, 2, 8)]
    data = Dataset.from_list([{"text": t, "label": i % 2} for i, t in enumerate(texts)])
    scores, labels = score_dataset(model, tokenizer, data, cfg, batch_size=3, disable_progress=True)
    assert labels.tolist() == [i % 2 for i in range(len(texts))]
    for i in range(len(texts)):
        alone, _ = score_dataset(model, tokenizer, data.select([i]), cfg, batch_size=1, disable_progress=True)
        torch.testing.assert_close(scores[i], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        score_dataset(model, tokenizer, data, cfg, batch_size=0)


def test_accuracy_report_hand_computed():
    report = accuracy_report([0, 1, 1, 2], [0, 1, 2, 2], num_classes=4)
    assert report["accuracy"] == pytest.approx(0.75)
    # Per class F1 = 2 TP / (predicted + true): class 0: 2/2, class 1: 2/3, class 2: 2/3; class 3 is absent.
    assert report["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert report["num_examples"] == 4
    assert report["per_class"] == {0: {"total": 1, "correct": 1, "predicted": 1},
                                   1: {"total": 1, "correct": 1, "predicted": 2},
                                   2: {"total": 2, "correct": 1, "predicted": 1},
                                   3: {"total": 0, "correct": 0, "predicted": 0}}
    with pytest.raises(ValueError, match="No predictions"):
        accuracy_report([], [], num_classes=2)


def test_accuracy_report_and_shipped_metrics_agree():
    preds, refs = [0, 1, 1, 2, 0, 2], [0, 1, 0, 2, 1, 1]
    report = accuracy_report(preds, refs, num_classes=3)
    assert report["accuracy"] == pytest.approx(0.5)
    assert report["macro_f1"] == pytest.approx((2 / 4 + 2 / 5 + 2 / 3) / 3)
    assert report["per_class"][1] == {"total": 3, "correct": 1, "predicted": 2}
    assert load_accuracy_metric().compute(predictions=preds, references=refs)["accuracy"] == report["accuracy"]
    f1 = load_metric("f1").compute(predictions=preds, references=refs, average="macro")["f1"]
    assert f1 == report["macro_f1"]
    with pytest.raises(ValueError, match="No shipped metric"):
        load_metric("bleu")


def test_shipped_f1_forwards_every_argument_to_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    refs, preds = rng.integers(0, 4, 50), rng.integers(0, 5, 50)  # class 4 is predicted but never true
    weights = rng.uniform(0.1, 2.0, 50)
    f1 = load_metric("f1")
    for average in ("micro", "macro", "weighted", None):
        for kwargs in ({}, {"labels": [3, 0, 1]}, {"sample_weight": weights}):
            got = f1.compute(predictions=preds, references=refs, average=average, **kwargs)["f1"]
            want = f1_score(refs, preds, average=average, zero_division=0, **kwargs)
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"{average} {list(kwargs)}")
    binary_refs, binary_preds = refs % 2, preds % 2
    for pos_label in (0, 1):
        got = f1.compute(predictions=binary_preds, references=binary_refs, pos_label=pos_label)["f1"]
        assert got == pytest.approx(f1_score(binary_refs, binary_preds, pos_label=pos_label))
    with pytest.raises(ValueError, match="multiclass"):
        f1.compute(predictions=preds, references=refs)
    with pytest.raises(ValueError, match="average"):
        f1.compute(predictions=preds, references=refs, average="samples")


def test_evaluate_rejects_bad_datasets(load_tiny, tokenizer):
    cfg = POSTConfig(num_virtual_tokens=2)
    model = load_tiny("gpt2")
    with pytest.raises(ValueError, match="empty"):
        evaluate_prompt(model, tokenizer, Dataset.from_dict({"text": [], "label": []}), cfg)
    with pytest.raises(ValueError, match="label column"):
        evaluate_prompt(model, tokenizer, Dataset.from_dict({"text": ["a"]}), cfg)
    with pytest.raises(ValueError, match="outside"):
        evaluate_prompt(model, tokenizer, Dataset.from_dict({"text": ["a"], "label": [3]}), cfg)
    with pytest.raises(ValueError, match="text column"):
        evaluate_prompt(model, tokenizer, Dataset.from_dict({"sentence": ["a"], "label": [0]}), cfg)


def test_prompt_helpers(load_tiny, tokenizer):
    cfg = POSTConfig(num_virtual_tokens=5)
    a = get_peft_model(load_tiny("gpt2"), cfg)
    b = get_peft_model(load_tiny("llama"), cfg)
    p = torch.randn(5, 32)
    set_prompt(a, p)
    torch.testing.assert_close(get_prompt(a), p)
    got = get_prompt(a)
    got += 1  # a copy, not a view of the parameter
    torch.testing.assert_close(get_prompt(a), p)
    with pytest.raises(ValueError, match="does not fit"):
        set_prompt(b, torch.randn(4, 32))
    text_prompt = prompt_from_text(a, tokenizer, "predict if sentiment", 5)
    ids = tokenizer("predict if sentiment").input_ids
    ids = (ids * 5)[:5]
    torch.testing.assert_close(text_prompt, a.get_base_model().get_input_embeddings().weight[ids].detach())


@pytest.mark.parametrize("extra", [-2, 0, 3])
def test_text_initialisation_matches_peft_when_the_text_is_cut_or_repeated(load_tiny, tokenizer, extra):
    from peft import PromptTuningConfig

    text = "predict if sentiment of this review"
    n = len(tokenizer(text).input_ids) + extra
    peft_cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text=text, tokenizer_name_or_path=tokenizer.name_or_path)
    model = get_peft_model(load_tiny("gpt2"), peft_cfg)
    # The transfer re-initialises p_t with prompt_from_text; it must pick the same n ids PEFT's TEXT init gave p_s.
    torch.testing.assert_close(prompt_from_text(model, tokenizer, text, n), get_prompt(model))
