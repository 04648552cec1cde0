"""Accuracy of a (prompted or plain) model on a verbalized classification dataset."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import POSTConfig
from .modeling import input_device
from .scoring import class_scores_of
from .tasks import TaskTemplate, Verbalizer, VerbalizerCollator, check_classification_dataset

METRICS_DIR = os.path.join(os.path.dirname(__file__), "metrics")
ACCURACY_METRIC_PATH = os.path.join(METRICS_DIR, "accuracy", "accuracy.py")


def load_metric(name: str):
    """A fresh shipped `evaluate` module, "accuracy", "f1" or "answer_match" (exact match and token F1 of generated answers), loaded from its file in this package.

    ``evaluate.load("accuracy")`` would fetch the Hub's module; these load offline. Kept in memory: no cache files.
    """
    import evaluate

    path = os.path.join(METRICS_DIR, name, f"{name}.py")
    if not os.path.isfile(path):
        raise ValueError(f"No shipped metric {name!r}; the shipped ones are {sorted(os.listdir(METRICS_DIR))}.")
    return evaluate.load(path, keep_in_memory=True)


def load_accuracy_metric():
    """The shipped `evaluate` accuracy module (``evaluate.load("accuracy")`` would need the Hub)."""
    return load_metric("accuracy")


# One module per metric and process for `accuracy_report` and `generation_report`, which run at every evaluation:
# `evaluate.load` is a few ms (measured: 9-11 ms the first time in a process, 2-4 ms after), and the modules keep no
# state between `compute`s.
shared_metric = functools.lru_cache(maxsize=None)(load_metric)


def accuracy_report(predictions, references, num_classes: int) -> dict:
    """Accuracy and macro-F1 (the shipped `evaluate` modules) plus, per class, how many examples there were, how
    many were right and how many were predicted.

    Macro-F1 is the mean F1 over the classes present in `predictions` or `references`, as ``evaluate``'s and
    scikit-learn's; a class neither predicted nor present does not count.
    """
    predictions = np.asarray(predictions, dtype=np.int64)
    references = np.asarray(references, dtype=np.int64)
    if predictions.size == 0:
        raise ValueError("No predictions to score.")
    per_class = {
        c: {
            "total": int((references == c).sum()),
            "correct": int(((references == c) & (predictions == c)).sum()),
            "predicted": int((predictions == c).sum()),
        }
        for c in range(num_classes)
    }
    inputs = {"predictions": predictions, "references": references}
    return {
        "accuracy": shared_metric("accuracy").compute(**inputs)["accuracy"],
        "macro_f1": shared_metric("f1").compute(**inputs, average="macro")["f1"],
        "num_examples": int(predictions.size),
        "per_class": per_class,
    }


def progress_bars_wanted() -> bool:
    """Whether to draw progress bars: on a terminal or in a notebook, not when stderr goes to a file or a pipe,
    where every redraw of a bar is another line of the log."""
    from transformers.utils import is_in_notebook

    return sys.stderr.isatty() or is_in_notebook()


@torch.no_grad()
def predict_class_scores(
    model,
    dataloader,
    verbalizer: Verbalizer,
    prompt: Union[torch.Tensor, None, str] = "auto",
    desc: str = "evaluate",
    disable_progress: Optional[bool] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores (N, C) and labels (N,) over a dataloader of `VerbalizerCollator` batches, with a progress bar
    unless `disable_progress` (None: `progress_bars_wanted`).

    Batches go to the device of the model's input embeddings. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the
    forwards under ``torch.autocast`` on that device, so a model loaded in fp32 is scored in bf16; None (the
    default) runs the model in its own dtype. The scores are float32 either way."""
    if disable_progress is None:
        disable_progress = not progress_bars_wanted()
    was_training = model.training
    model.eval()
    device = input_device(model)
    scores, labels = [], []
    try:
        for batch in tqdm(dataloader, desc=desc, disable=disable_progress, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(device, autocast_dtype):
                scores.append(class_scores_of(model, **batch, verbalizer=verbalizer, prompt=prompt).float().cpu())
            labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores), torch.cat(labels)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def score_dataset(
    model,
    tokenizer,
    dataset,
    config: POSTConfig,
    *,
    text_column: str = "text",
    label_column: str = "label",
    batch_size: int = 32,
    prompt: Union[torch.Tensor, None, str] = "auto",
    desc: str = "evaluate",
    disable_progress: Optional[bool] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores (N, C) and labels (N,) of every row of `dataset`, in the dataset's order.

    ``prompt`` is as in `label_logits`: "auto" (the adapter's), None (the base model's, unprompted) or an explicit
    (n, d) prompt. Runs in eval mode under `torch.no_grad`, batched, with a progress bar, on the device of the
    model's input embeddings; ``autocast_dtype`` as in `predict_class_scores`.
    """
    if not isinstance(config, POSTConfig):
        raise TypeError(
            f"`config` is a {type(config).__name__}, not a POSTConfig: scoring needs the task's template and label "
            "words, which a POSTConfig carries. Pass `POSTConfig(template=..., label_words=..., num_virtual_tokens=...)`"
            ", or `POSTConfig.from_pretrained(adapter_folder)` for a saved POST prompt.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    verbalizer = Verbalizer.from_config(config, tokenizer)
    check_classification_dataset(dataset, text_column, label_column, verbalizer.num_classes, "dataset")
    template = TaskTemplate.from_config(config, tokenizer)
    collator = VerbalizerCollator(template, text_column, label_column)
    # Rows of similar length batched together leave little padding for the model to run on (1.8x faster on Rotten
    # Tomatoes: benchmarks/eval_speed.py); the scores are put back in the dataset's order afterwards.
    order = np.argsort([len(template.encode(text)) for text in dataset[text_column]], kind="stable")
    loader = DataLoader(dataset.select(order.tolist()), batch_size=batch_size, shuffle=False, collate_fn=collator)
    scores, labels = predict_class_scores(model, loader, verbalizer, prompt, desc, disable_progress, autocast_dtype)
    inverse = torch.from_numpy(np.argsort(order, kind="stable"))
    return scores[inverse], labels[inverse]


def evaluate_prompt(
    model,
    tokenizer,
    dataset,
    config: POSTConfig,
    *,
    use_prompt: bool = True,
    prompt: Optional[torch.Tensor] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    per_example: bool = False,
    **score_options,
) -> dict:
    """Accuracy, macro-F1 and per-class counts (`accuracy_report`) of `model` on `dataset` under `config`'s template
    and label words.

    `model` is a plain transformers model (zero-shot) or a prompt-tuning `PeftModel`. ``use_prompt=False`` scores a
    `PeftModel`'s base model without its prompt; ``prompt`` scores an explicit (n, d) prompt instead of the
    adapter's. ``autocast_dtype``: None (the model runs in its own dtype, bf16 for a model loaded in bf16), or e.g.
    ``torch.bfloat16`` to score an fp32-loaded model under bf16 autocast. ``per_example=True`` adds
    ``"per_example_correct"``: which examples were right (`correctness_bits`), in the dataset's order, for paired
    comparisons of methods scored on the same examples. ``score_options`` are `score_dataset`'s:
    ``text_column`` ("text"), ``label_column`` ("label"), ``batch_size`` (32), ``desc`` and ``disable_progress``.
    Runs in eval mode under `torch.no_grad`, batched, with a progress bar, on the device of the model's input
    embeddings (a bf16 model, a CUDA model and a dispatched one included).
    """
    if "prompt" in score_options:
        raise TypeError("Pass an explicit prompt as `prompt`, or `use_prompt=False` for the unprompted base model.")
    chosen = prompt if prompt is not None else ("auto" if use_prompt else None)
    scores, labels = score_dataset(model, tokenizer, dataset, config, prompt=chosen, autocast_dtype=autocast_dtype,
                                   **score_options)
    predictions, references = scores.argmax(-1).numpy(), labels.numpy()
    report = accuracy_report(predictions, references, scores.shape[1])
    if per_example:
        report["per_example_correct"] = correctness_bits(predictions, references)
    return report


def correctness_bits(predictions, references) -> str:
    """Whether each prediction is right, as a string of "0"/"1" in the examples' order ("1011..." for 4 examples).

    One character per example keeps a run's per-example record compact in JSON (a list would take a line per example
    there), and the paired bootstrap of the report (`peft_post.report.paired_bootstrap`) reads it back."""
    predictions = np.asarray(predictions, dtype=np.int64)
    references = np.asarray(references, dtype=np.int64)
    if predictions.shape != references.shape:
        raise ValueError(f"{predictions.shape[0]} predictions for {references.shape[0]} references.")
    return "".join("1" if right else "0" for right in (predictions == references).tolist())
