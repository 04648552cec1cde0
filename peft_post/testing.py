"""Tiny, seeded, config-built models and a locally trained tokenizer, for tests and smoke runs (no Hub)."""

from __future__ import annotations

import os
import random
from typing import Optional

import torch

TINY_KINDS = ("gpt2", "llama", "qwen2", "roberta", "bert")
MASKED_KINDS = ("roberta", "bert")

_POSITIVE = ["great", "good", "awesome", "brilliant", "amazing", "positive", "fun", "moving"]
_NEGATIVE = ["terrible", "bad", "poor", "awful", "negative", "boring", "dull", "weak"]
_FILLER = ["the", "movie", "film", "plot", "acting", "was", "a", "an", "story", "and", "it", "very", "truly",
           "cast", "ending", "script", "this", "review", "sentiment", "predict", "if", "of", "is", "or", "so"]


def tiny_corpus() -> list[str]:
    rng = random.Random(0)
    words = _POSITIVE + _NEGATIVE + _FILLER + ["Review:", "Sentiment:", "It", "was", ".", "\n"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    lines += [f"Review: the movie was {w}\nSentiment: {w}" for w in _POSITIVE + _NEGATIVE]
    return lines


def build_tokenizer(save_dir: str):
    """A byte-level BPE tokenizer trained on a tiny corpus; every sentiment word is one ' word' token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>",
    )
    os.makedirs(save_dir, exist_ok=True)
    fast.save_pretrained(save_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_dir)


def tiny_config(kind: str, vocab_size: int, num_layers: int = 2, hidden_size: int = 32, pad_token_id: int = 0):
    import transformers as tf

    common = dict(vocab_size=vocab_size, pad_token_id=pad_token_id)
    if kind == "gpt2":
        return tf.GPT2Config(n_layer=num_layers, n_embd=hidden_size, n_head=2, n_positions=256, bos_token_id=1,
                             eos_token_id=2, **common)
    if kind == "llama":
        return tf.LlamaConfig(num_hidden_layers=num_layers, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **common)
    if kind == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=num_layers, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **common)
    if kind == "roberta":
        return tf.RobertaConfig(num_hidden_layers=num_layers, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                num_attention_heads=2, max_position_embeddings=260, bos_token_id=1, eos_token_id=2,
                                **common)
    if kind == "bert":
        return tf.BertConfig(num_hidden_layers=num_layers, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_attention_heads=2, max_position_embeddings=256, **common)
    raise ValueError(f"Unknown tiny model kind {kind!r}; choose one of {TINY_KINDS}.")


def build_tiny_model(kind: str, tokenizer, save_dir: str, seed: int = 0, **config_kwargs):
    """A seeded tiny model saved to `save_dir` and loaded back, so its `name_or_path` is a real path."""
    import transformers as tf

    config = tiny_config(kind, len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config_kwargs)
    torch.manual_seed(seed)
    cls = tf.AutoModelForMaskedLM if kind in MASKED_KINDS else tf.AutoModelForCausalLM
    model = cls.from_config(config)
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    model = cls.from_pretrained(save_dir)
    return model.eval()


def tiny_model(kind: str, tokenizer, num_layers: int = 4, init_range: Optional[float] = None, seed: int = 0):
    """A seeded tiny model built in memory (not saved), by default 4 layers deep so that students can drop some.

    ``init_range`` replaces the config's ``initializer_range`` (0.02): a larger one gives a peaked, far-from-uniform
    teacher whose KL is worth lowering.
    """
    import transformers as tf

    config = tiny_config(kind, len(tokenizer), num_layers=num_layers, pad_token_id=tokenizer.pad_token_id)
    if init_range is not None:
        config.initializer_range = init_range
    torch.manual_seed(seed)
    cls = tf.AutoModelForMaskedLM if kind in MASKED_KINDS else tf.AutoModelForCausalLM
    return cls.from_config(config).eval()


def sharpen_model(model, factor: float = 25.0, gain: float = 5.0):
    """`model`, in place, made prompt-sensitive and opinionated: its layer matrices times `gain`, its (tied) output
    embeddings times `factor`.

    Config-built models start with std-0.02 weights: every layer is nearly the identity and a prompt barely moves the
    label logits, so every KL between prompted models is ~0. Sharpened, the losses and their gradients are far from
    vanishing.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not any(k in name for k in ("embed", "wte", "wpe", "lm_head", "word_embeddings",
                                                             "position_embeddings", "token_type")):
                p.mul_(gain)
        model.get_output_embeddings().weight.mul_(factor)
    return model


def tiny_sentiment_rows(n: int = 32, seed: int = 0) -> list[dict]:
    """Short labelled 'reviews' (0 = negative, 1 = positive) whose label word appears in the text."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(_POSITIVE if label else _NEGATIVE)
        filler = " ".join(rng.choice(_FILLER) for _ in range(rng.randint(1, 8)))
        rows.append({"text": f"{filler} {word}", "label": label})
    return rows


def tiny_sentiment_dataset(n: int = 32, seed: int = 0):
    from datasets import Dataset

    return Dataset.from_list(tiny_sentiment_rows(n, seed))


# The answer a tiny generation example asks for: the sentiment as a two-word phrase (multi-token answers).
TINY_ANSWERS = ("very bad", "very good")


def tiny_generation_rows(n: int = 32, seed: int = 0) -> list[dict]:
    """`tiny_sentiment_rows` with an ``answer`` column (`TINY_ANSWERS` of the label): a tiny generation task."""
    return [{**row, "answer": TINY_ANSWERS[row["label"]]} for row in tiny_sentiment_rows(n, seed)]


def tiny_generation_dataset(n: int = 32, seed: int = 0):
    from datasets import Dataset

    return Dataset.from_list(tiny_generation_rows(n, seed))


TINY_LEDGER = {"epsilon": 8.0, "delta": 1e-5, "accountant": "prv", "noise_multiplier": 0.73, "max_grad_norm": 1.0,
               "sample_rate": 0.0125, "steps": 320}


def tiny_post_config(kind: str, **overrides):
    """A `POSTConfig` with every POST field set (a DP ledger, provenance), for a tiny model of `kind`."""
    from .config import POSTConfig

    masked = kind in MASKED_KINDS
    fields = dict(
        task_type="FEATURE_EXTRACTION" if masked else "CAUSAL_LM",
        num_virtual_tokens=3,
        template="{text} It was {mask}." if masked else "Review: {text}\nSentiment:",
        label_words=[["bad", "awful"], ["good", "great"]],
        source_model_name_or_path="org/tiny-source",
        transfer_alpha=0.4,
        transfer_temperature=1.5,
        privacy=dict(TINY_LEDGER),
        provenance={"stage": "transfer", "public_size": 12},
    )
    fields.update(overrides)
    return POSTConfig(**fields)
