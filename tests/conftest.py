import pytest
import torch

from peft_post.testing import build_tiny_model, build_tokenizer, tiny_sentiment_dataset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return build_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def tiny_model_dirs(tokenizer, tmp_path_factory):
    """Each tiny architecture saved once per session; tests load fresh copies with `load_tiny`."""
    dirs = {}
    for kind in ("gpt2", "llama", "qwen2", "roberta", "bert"):
        path = str(tmp_path_factory.mktemp(f"tiny-{kind}"))
        build_tiny_model(kind, tokenizer, path)
        dirs[kind] = path
    return dirs


@pytest.fixture
def load_tiny(tiny_model_dirs):
    import transformers as tf

    def load(kind):
        cls = tf.AutoModelForMaskedLM if kind in ("roberta", "bert") else tf.AutoModelForCausalLM
        return cls.from_pretrained(tiny_model_dirs[kind]).eval()

    return load


@pytest.fixture
def sentiment_dataset():
    return tiny_sentiment_dataset(32)
