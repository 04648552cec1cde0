"""Multi-token label words: teacher-forced, length-normalised scores, exact against one forward per word; the
single-token path unchanged; DP per-example gradients exact; trainers that train and transfer with them."""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_post import POSTConfig, TaskTemplate, Verbalizer, VerbalizerCollator
from peft_post.losses import continuation_log_probs, verbalizer_loss
from peft_post.modeling import label_logits, prompt_parameter, quiet_checkpointing_deprecation
from peft_post.scoring import append_continuations, class_scores_of, classification_losses, word_log_probs
from peft_post.testing import tiny_sentiment_dataset, tiny_sentiment_rows
from peft_post.tuning import privacy

# Words of 2, 1, 9 and 1 tokens in the tiny tokenizer (" very bad", " awful", " excellent", " good").
MULTI_WORDS = [["very bad", "awful"], ["excellent", "good"]]


def losses_of(verbalizer):
    return functools.partial(classification_losses, verbalizer=verbalizer)


def prompted(load_tiny, kind="llama", words=MULTI_WORDS, n=3, seed=0, task_type="CAUSAL_LM", template=None):
    torch.manual_seed(seed)
    config = POSTConfig(task_type=task_type, num_virtual_tokens=n, label_words=words, max_length=64,
                        **({"template": template} if template else {}))
    with quiet_checkpointing_deprecation():
        return get_peft_model(load_tiny(kind), config).eval()


def batch_of(tokenizer, model, rows, padding_side="right"):
    config = model.peft_config["default"]
    return VerbalizerCollator(TaskTemplate.from_config(config, tokenizer), padding_side=padding_side)(rows)


def brute_force_word_log_probs(model, tokenizer, rows, verbalizer, prompt):
    """Per example and word, its own unpadded sequence ``text tokens + word tokens`` through the model's ordinary
    forward (all positions' logits), the word's token log-probabilities summed and divided by its length."""
    config = model.peft_config["default"]
    template = TaskTemplate.from_config(config, tokenizer)
    base = model.get_base_model()
    out = torch.zeros(len(rows), len(verbalizer.word_token_ids), dtype=torch.float64)
    for i, row in enumerate(rows):
        ids = template.encode(row["text"])
        for w, word in enumerate(verbalizer.word_token_ids):
            full = torch.tensor([ids + word])
            embeds = base.get_input_embeddings()(full)
            n = 0
            if prompt is not None:
                n = prompt.shape[0]
                embeds = torch.cat([prompt.unsqueeze(0), embeds], dim=1)
            log_p = F.log_softmax(base(inputs_embeds=embeds).logits[0].double(), -1)
            total = sum(log_p[n + len(ids) - 1 + j, t] for j, t in enumerate(word))
            out[i, w] = total / len(word)
    return out


def test_verbalizer_keeps_whole_words_and_averages_words_into_classes(tokenizer):
    v = Verbalizer(tokenizer, MULTI_WORDS)
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for ws in MULTI_WORDS for w in ws]
    assert v.word_token_ids == ids and v.word_classes == [0, 0, 1, 1]
    assert not v.is_single_token and v.continuations.shape == (4, max(map(len, ids)))
    assert v.continuation_mask.sum(-1).tolist() == [len(s) for s in ids]
    torch.testing.assert_close(v.word_to_class, torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.0, 0.5], [0.0, 0.5]]))
    # The first tokens stay what the label slot reads (the transfer's support, the top-k cache).
    assert v.token_ids == [[ids[0][0], ids[1][0]], [ids[2][0], ids[3][0]]]
    with pytest.raises(ValueError, match="one label slot"):
        v.class_scores(torch.zeros(2, len(tokenizer)))
    assert Verbalizer(tokenizer, [["bad", "awful"], ["good"]]).is_single_token
    with pytest.raises(ValueError, match="already used by class 0"):
        Verbalizer(tokenizer, [["very bad"], ["very bad"]])
    # Two classes may share a first token when words are scored whole.
    shared = Verbalizer(tokenizer, [["very bad"], ["very good"]])
    assert shared.token_ids[0] == shared.token_ids[1]


def test_continuation_log_probs_is_mean_token_log_probability():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (3, 4))
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    log_p = torch.log_softmax(logits, -1)
    expected = torch.stack([
        (log_p[0, 0, targets[0, 0]] + log_p[0, 1, targets[0, 1]]) / 2,
        log_p[1, 0, targets[1, 0]],
        sum(log_p[2, j, targets[2, j]] for j in range(4)) / 4,
    ])
    torch.testing.assert_close(continuation_log_probs(logits, targets, mask), expected)
    logits[0, 3] = float("-inf")  # a masked position holding -inf stays out
    assert torch.isfinite(continuation_log_probs(logits, targets, mask)).all()
    with pytest.raises(ValueError, match="at least one real token"):
        continuation_log_probs(logits, targets, torch.zeros_like(mask))


@pytest.mark.parametrize("kind,padding_side", [("llama", "right"), ("gpt2", "left"), ("qwen2", "right")])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_word_scores_equal_one_forward_per_word(load_tiny, tokenizer, kind, padding_side, with_prompt):
    model = prompted(load_tiny, kind)
    model.double()
    verbalizer = Verbalizer(tokenizer, MULTI_WORDS)
    rows = tiny_sentiment_rows(5, seed=3)
    batch = batch_of(tokenizer, model, rows, padding_side)
    lengths = batch["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max(), "the batch must mix lengths so that padding is exercised"
    prompt = prompt_parameter(model) if with_prompt else None
    with torch.no_grad():
        ours = word_log_probs(model, batch["input_ids"], batch["attention_mask"], batch["label_positions"],
                              verbalizer, prompt="auto" if with_prompt else None)
        expected = brute_force_word_log_probs(model, tokenizer, rows, verbalizer, prompt)
        scores = class_scores_of(model, **batch, verbalizer=verbalizer, prompt="auto" if with_prompt else None)
    torch.testing.assert_close(ours, expected, atol=1e-9, rtol=1e-9)
    # Class 0 holds words 0 and 1, class 1 words 2 and 3: a class score is the mean of its words'.
    expected_scores = torch.stack([expected[:, :2].mean(-1), expected[:, 2:].mean(-1)], -1)
    torch.testing.assert_close(scores, expected_scores, atol=1e-9, rtol=1e-9)


def test_append_continuations_writes_each_word_after_the_label_slot():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = append_continuations(ids, mask, torch.tensor([2, 1]), torch.tensor([[11, 12], [13, 0]]),
                               torch.tensor([[True, True], [True, False]]))
    assert out["input_ids"].tolist() == [[5, 6, 7, 11, 12, 0], [5, 6, 7, 13, 0, 0],
                                         [8, 9, 11, 12, 0, 0], [8, 9, 13, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0],
                                              [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert out["label_positions"].tolist() == [[2, 3], [2, 3], [1, 2], [1, 2]]
    assert out["targets"].tolist() == [[11, 12], [13, 0], [11, 12], [13, 0]]


def test_single_token_verbalizer_keeps_the_label_slot_path_exactly(load_tiny, tokenizer):
    model = prompted(load_tiny, words=[["bad", "awful"], ["good", "great"]])
    verbalizer = Verbalizer(tokenizer, [["bad", "awful"], ["good", "great"]])
    batch = batch_of(tokenizer, model, tiny_sentiment_rows(6, seed=1))
    with torch.no_grad():
        logits = label_logits(model, batch["input_ids"], batch["attention_mask"], batch["label_positions"])
        old_scores = verbalizer.class_scores(logits)
        old_losses = verbalizer_loss(logits, batch["labels"], verbalizer.index, verbalizer.weight, reduction="none")
        new_scores = class_scores_of(model, **batch, verbalizer=verbalizer)
        new_losses = classification_losses(model, batch, verbalizer)
        # The teacher-forced path gives log-probabilities: the same class distribution (a per-row shift).
        sequence = word_log_probs(model, batch["input_ids"], batch["attention_mask"], batch["label_positions"],
                                  verbalizer) @ verbalizer.word_to_class
    assert torch.equal(new_scores, old_scores) and torch.equal(new_losses, old_losses)
    torch.testing.assert_close(sequence.softmax(-1), old_scores.softmax(-1), atol=1e-6, rtol=1e-5)


def brute_force_grads(model, tokenizer, rows, verbalizer):
    """One backward per example on its own unpadded batch of one."""
    prompt = prompt_parameter(model)
    grads = []
    for row in rows:
        batch = batch_of(tokenizer, model, [row])
        loss = classification_losses(model, batch, verbalizer, prompt=prompt).sum()
        (g,) = torch.autograd.grad(loss, prompt)
        grads.append(g)
    return torch.stack(grads)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_dp_per_example_gradients_with_multi_token_words_equal_brute_force(load_tiny, tokenizer, padding_side):
    model = prompted(load_tiny, "gpt2")
    model.double()
    verbalizer = Verbalizer(tokenizer, MULTI_WORDS)
    rows = tiny_sentiment_rows(5, seed=4)
    batch = batch_of(tokenizer, model, rows, padding_side)
    grads, losses = privacy.per_example_gradients(model, batch, prompt_parameter(model), losses_of(verbalizer))
    expected = brute_force_grads(model, tokenizer, rows, verbalizer)
    torch.testing.assert_close(grads, expected, atol=1e-9, rtol=1e-7)
    assert (grads[0] - grads[1]).abs().max() > 1e-6, "examples must differ: a shared gradient would pass otherwise"
    with torch.no_grad():
        scores = class_scores_of(model, **batch, verbalizer=verbalizer)
    torch.testing.assert_close(losses, F.cross_entropy(scores.float(), batch["labels"], reduction="none"))


def test_masked_lm_refuses_multi_token_words(load_tiny, tokenizer, tmp_path):
    from peft_post import PromptTrainer, PromptTrainingConfig

    model = prompted(load_tiny, "bert", task_type="FEATURE_EXTRACTION", template="{text} It was {mask}.")
    args = PromptTrainingConfig(str(tmp_path), max_steps=1, per_device_train_batch_size=4, save_strategy="no",
                                disable_tqdm=True)
    with pytest.raises(ValueError, match="masked LM cannot score"):
        PromptTrainer(model, args, train_dataset=tiny_sentiment_dataset(8), processing_class=tokenizer)


def test_prompt_and_dp_trainers_train_on_multi_token_words(load_tiny, tokenizer, tmp_path):
    from peft_post import DPConfig, DPPromptTrainer, PromptTrainer, PromptTrainingConfig

    data = tiny_sentiment_dataset(16)
    for trainer_cls, extra in ((PromptTrainer, {}), (DPPromptTrainer, {"dp_config": DPConfig(noise_multiplier=0.5)})):
        model = prompted(load_tiny, "llama")
        before = prompt_parameter(model).detach().clone()
        args = PromptTrainingConfig(str(tmp_path / trainer_cls.__name__), max_steps=3, per_device_train_batch_size=8,
                                    learning_rate=0.05, save_strategy="no", disable_tqdm=True, report_to=[], seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = trainer_cls(model, args, train_dataset=data, eval_dataset=data, processing_class=tokenizer,
                                  **extra)
            trainer.train()
            metrics = trainer.evaluate()
        assert not torch.equal(prompt_parameter(model).detach(), before)
        # The reported loss is the cross-entropy of the teacher-forced class scores over the evaluation set.
        batch = batch_of(tokenizer, model, list(data))
        with torch.no_grad():
            expected = classification_losses(model, batch, Verbalizer(tokenizer, MULTI_WORDS)).mean()
        assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_transfer_warns_when_classes_share_a_first_token(tokenizer):
    from peft_post.transfer.trainer import warn_on_shared_first_tokens

    with pytest.warns(UserWarning, match="begin with the same token"):
        warn_on_shared_first_tokens(Verbalizer(tokenizer, [["very bad"], ["very good"]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_on_shared_first_tokens(Verbalizer(tokenizer, MULTI_WORDS))
