"""Loading by path: the models, tokenizers and prompted models the stages (and the audit and benchmarks) work on."""

from __future__ import annotations

from typing import Optional

import torch

from ..config import POSTConfig
from ..modeling import quiet_checkpointing_deprecation
from ..precision import Precision

# Loaded when no `Precision` is given: float32 on the CPU, as every stage ran before precision was an option.
FLOAT32_CPU = Precision()


def load_model(path: str, masked: bool, precision: Optional[Precision] = None, role: str = "frozen"):
    """The model at `path` (a folder or Hub id) in eval mode: a masked LM when `masked`, else causal.

    It loads in `precision`'s compute dtype onto its device (float32 on the CPU when None), directly, never first in
    fp32: ``role`` is ``"frozen"``, ``"target"`` (also `device_map` and quantization) or ``"trainable"`` (fp32
    master weights); see `Precision.load_kwargs`.
    """
    from transformers import AutoModelForMaskedLM

    from ..text_models import load_text_model

    precision = precision or FLOAT32_CPU
    kwargs = precision.load_kwargs(role)
    # A causal LM is loaded text-only: a multimodal checkpoint (Gemma-3 4B+) gives its language model alone.
    model = AutoModelForMaskedLM.from_pretrained(path, **kwargs) if masked else load_text_model(path, **kwargs)
    if "device_map" not in kwargs:
        model.to(precision.device)
    return model.eval()


def load_tokenizer(path: str):
    """The tokenizer at `path`, padding with its end-of-sequence token when it has no pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_sizes(path: str) -> tuple[int, int]:
    """(hidden size, vocabulary size) of the model at `path`, read from its config: no weights are loaded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path).get_text_config()
    return int(config.hidden_size), int(config.vocab_size)


def random_subset(dataset, n: Optional[int], seed: int):
    """`n` examples of `dataset` drawn with `seed`; the whole dataset when `n` is None or not below its size."""
    if n is None or len(dataset) <= n:
        return dataset
    return dataset.shuffle(seed=seed).select(range(n))


def load_prompted_model(model_path: str, adapter: str, masked: bool, precision: Optional[Precision] = None,
                        role: str = "frozen"):
    """The model at `model_path` (`load_model`) with the POST prompt adapter saved in folder `adapter`."""
    from peft import PeftModel

    model = load_model(model_path, masked, precision, role)
    with quiet_checkpointing_deprecation():
        return PeftModel.from_pretrained(model, adapter, config=POSTConfig.from_pretrained(adapter))


def new_prompted_model(model_path: str, post_config: POSTConfig, masked: bool, seed: int,
                       precision: Optional[Precision] = None, role: str = "frozen"):
    """The model at `model_path` (`load_model`) wrapped with a new POST prompt adapter, created under `seed`. The
    prompt is an fp32 parameter whatever the model's dtype (its master copy under mixed precision)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = load_model(model_path, masked, precision, role)
    with quiet_checkpointing_deprecation():
        return get_peft_model(model, post_config)
