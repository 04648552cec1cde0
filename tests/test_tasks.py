import pytest
import torch
from peft import get_peft_model

from peft_post import POSTConfig, TaskTemplate, Verbalizer, VerbalizerCollator
from peft_post.losses import class_scores, verbalizer_loss
from peft_post.modeling import label_logits
from peft_post.tasks import label_positions
from peft_post.testing import tiny_sentiment_rows


def test_verbalizer_maps_first_token_of_spaced_word(tokenizer):
    v = Verbalizer(tokenizer, [["bad", "awful"], ["good"]])
    assert v.token_ids == [
        [tokenizer(" bad", add_special_tokens=False).input_ids[0], tokenizer(" awful", add_special_tokens=False).input_ids[0]],
        [tokenizer(" good", add_special_tokens=False).input_ids[0]],
    ]
    logits = torch.randn(3, len(tokenizer))
    expected = torch.stack(
        [logits[:, v.token_ids[0]].mean(-1), logits[:, v.token_ids[1]].mean(-1)], dim=-1
    )
    torch.testing.assert_close(v.class_scores(logits), expected)


def test_verbalizer_errors(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        Verbalizer(tokenizer, [["good"], [" "]])
    with pytest.raises(ValueError, match="special token"):
        Verbalizer(tokenizer, [["good"], ["<mask>"]])
    with pytest.raises(ValueError, match="already used by class 0"):
        Verbalizer(tokenizer, [["good"], ["good"]])
    with pytest.raises(ValueError, match="not one"):
        Verbalizer(tokenizer, [["good"], ["supercalifragilistic"]], multi_token="error")
    with pytest.warns(UserWarning, match="not one"):
        v = Verbalizer(tokenizer, [["good"], ["supercalifragilistic"]], multi_token="first")
    assert v.token_ids[1] == [tokenizer(" supercalifragilistic", add_special_tokens=False).input_ids[0]]
    with pytest.raises(ValueError, match="multi_token"):
        Verbalizer(tokenizer, [["good"], ["bad"]], multi_token="sometimes")


def test_unknown_token_word_is_rejected():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "good": 2, "bad": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    with pytest.raises(ValueError, match="unknown token"):
        Verbalizer(fast, [["good"], ["zebra"]])


def test_loss_is_cross_entropy_of_mean_label_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 10, dtype=torch.float64)
    index = torch.tensor([[1, 2], [5, 0]])
    weight = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    scores = torch.stack([(logits[:, 1] + logits[:, 2]) / 2, logits[:, 5]], dim=-1)
    torch.testing.assert_close(class_scores(logits, index, weight), scores)
    expected = -torch.log_softmax(scores, -1)[torch.arange(4), labels].mean()
    torch.testing.assert_close(verbalizer_loss(logits, labels, index, weight).double(), expected)


def test_template_keeps_label_slot_and_cuts_text_from_the_left(tokenizer):
    tmpl = TaskTemplate(tokenizer, "Review: {text}\nSentiment:", max_length=12, masked_lm=False)
    text = " ".join(["the movie was good"] * 10)
    ids = tmpl.encode(text)
    assert len(ids) == 12
    suffix = tokenizer("\nSentiment:", add_special_tokens=False).input_ids
    prefix = tokenizer("Review:", add_special_tokens=False).input_ids
    assert ids[-len(suffix):] == suffix and ids[: len(prefix)] == prefix
    full = tmpl.encode("the movie was good")
    assert full == tokenizer("Review: the movie was good\nSentiment:", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="max_length"):
        TaskTemplate(tokenizer, "Review: {text}\nSentiment:", max_length=3, masked_lm=False).encode(text)


def test_masked_template_keeps_one_mask(tokenizer):
    tmpl = TaskTemplate(tokenizer, "{text} It was {mask}.", max_length=10, masked_lm=True)
    ids = tmpl.encode(" ".join(["the plot was dull"] * 10))
    assert len(ids) == 10 and ids.count(tokenizer.mask_token_id) == 1


def test_label_positions_right_left_and_prompted():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9], [0, 0, 5, 6, 7]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert label_positions(ids, right).tolist() == [2, 4, 4]
    assert label_positions(ids, right, num_virtual_tokens=3).tolist() == [5, 7, 7]
    assert label_positions(ids, right, mask_token_id=7).tolist() == [2, 2, 4]
    with pytest.raises(ValueError, match="mask tokens"):
        label_positions(ids, right, mask_token_id=9)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "roberta", "bert"])
def test_label_logits_match_peft_forward_for_both_paddings(kind, load_tiny, tokenizer):
    masked = kind in ("roberta", "bert")
    cfg = POSTConfig(task_type="FEATURE_EXTRACTION" if masked else "CAUSAL_LM", num_virtual_tokens=4,
                     template="{text} It was {mask}." if masked else "Review: {text}\nSentiment:")
    torch.manual_seed(1)
    model = get_peft_model(load_tiny(kind), cfg)
    tmpl = TaskTemplate.from_config(cfg, tokenizer)
    rows = tiny_sentiment_rows(6)
    right = VerbalizerCollator(tmpl, padding_side="right")(rows)
    left = VerbalizerCollator(tmpl, padding_side="left")(rows)
    assert (right["attention_mask"] == 0).any(), "rows must differ in length to test padding"
    ours = label_logits(model, **right)
    peft_logits = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits
    torch.testing.assert_close(ours, peft_logits[torch.arange(6), right["label_positions"] + 4], rtol=0, atol=1e-5)
    torch.testing.assert_close(label_logits(model, **left), ours, rtol=0, atol=1e-5)
    # An explicit (B, n, d) prompt equal to the adapter's gives the same logits; None gives the base model's.
    prompt = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(label_logits(model, **right, prompt=prompt.expand(6, -1, -1)), ours)
    base_logits = model.get_base_model()(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits
    torch.testing.assert_close(
        label_logits(model, **right, prompt=None), base_logits[torch.arange(6), right["label_positions"]],
        rtol=0, atol=1e-5,
    )
    with pytest.raises(ValueError, match="prompt"):
        label_logits(model, **right, prompt=torch.zeros(4, 7))
