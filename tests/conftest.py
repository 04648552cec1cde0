import os

import pytest
import torch

from datasets import Dataset, DatasetDict

from peft_post.testing import build_tiny_model, build_tokenizer, tiny_sentiment_dataset, tiny_sentiment_rows

torch.set_num_threads(2)
# `dtype="auto"` on a CPU picks bf16 where a probe finds it fast (AMX). The tests' exact figures are fp32 figures, so
# the choice is pinned for every test and every process they start; tests of the choice itself unset it.
os.environ.setdefault("PEFT_POST_CPU_BF16", "0")


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


def build_tiny_run_inputs(root, tokenizer, rows=tiny_sentiment_rows):
    """A tiny llama target, private, public and distillation data under `root` (the examples from `rows(n, seed)`);
    returns a function of a run folder that gives the `peft-post` flags of a full pipeline on them (about a minute
    on tiny models)."""
    target = str(root / "target")
    build_tiny_model("llama", tokenizer, target, num_layers=4)
    private = str(root / "private")
    DatasetDict({"train": Dataset.from_list(rows(24, seed=1)),
                 "test": Dataset.from_list(rows(10, seed=2))}).save_to_disk(private)
    public = str(root / "public.csv")
    Dataset.from_list(rows(20, seed=3)).to_csv(public)
    distill = str(root / "distill.csv")
    Dataset.from_list([{"text": r["text"]} for r in rows(40, seed=4)]).to_csv(distill)

    def flags(run_dir):
        return ["--run_dir", str(run_dir), "--preset", "quick", "--target_model", target, "--student_layers", "0,-1",
                "--distill_dataset", distill, "--private_dataset", private, "--public_dataset", public,
                "--num_public_examples", "12", "--num_public_eval_examples", "8", "--distill_max_steps", "3",
                "--tune_max_steps", "3", "--transfer_max_steps", "3", "--num_virtual_tokens", "4",
                "--tune_batch_size", "8", "--transfer_batch_size", "4", "--save_steps", "2", "--eval_batch_size", "8",
                "--label_words", "bad,awful|good,great"]

    return flags


@pytest.fixture
def tiny_run(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("PEFT_POST_CACHE", str(tmp_path / "cache"))
    run_dir = str(tmp_path / "run")
    return run_dir, build_tiny_run_inputs(tmp_path, tokenizer)(run_dir)


@pytest.fixture(scope="module")
def tiny_run_inputs(tokenizer, tmp_path_factory):
    """`tiny_run`'s inputs built once per module, for tests that start several runs: a function of a run folder
    that returns `tiny_run`'s flags for it."""
    return build_tiny_run_inputs(tmp_path_factory.mktemp("tiny-run-inputs"), tokenizer)


@pytest.fixture
def tiny_student_and_proxy(tmp_path, tokenizer, monkeypatch):
    """(student folder, proxy CSV): a 2-layer tiny llama student and 60 labelled public examples, with the asset
    cache in `tmp_path`: what the DP-recipe benchmarks (`dp_recipe.py`, `dp_signal.py`) run on in tests."""
    monkeypatch.setenv("PEFT_POST_CACHE", str(tmp_path / "cache"))
    student = str(tmp_path / "student")
    build_tiny_model("llama", tokenizer, student, num_layers=2)
    proxy = str(tmp_path / "proxy.csv")
    Dataset.from_list(tiny_sentiment_rows(60, seed=5)).to_csv(proxy)
    return student, proxy
