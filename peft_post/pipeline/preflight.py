"""`preflight`: everything the data files and the tokenizers can tell, checked before the first model loads.

Distillation takes from 25 minutes (the default preset) to over an hour (`rotten_tomatoes`), so a label word that is
two tokens, a private dataset without a test split or a label out of range must be refused before it, not found by the
stage that needs it. `preflight` reads only what is cheap to read: the datasets, the target's (and a ready student's)
config and tokenizer. It checks

- the models: `--target_model` and `--student_model` are folders holding a saved model or Hub ids, the target has
  the layers `--student_layers` names, and it has the head the template needs (a masked LM for ``{mask}``);
- the task: each label word encodes to ordinary tokens of the tokenizer, no word belongs to two classes, the template
  has one ``{text}`` and a label slot, and the prompt's init text is not empty (it warns, once, when the template or
  label words are yours but the init text is still the sentiment default);
- the private train and test splits (`data.private_splits`): present, non-empty, with their text and label columns,
  labels integer class indices, enough training examples for `--tune_batch_size` (and
  `--full_tuning_batch_size`);
- the public dataset: enough examples for `--num_public_examples` + `--num_public_eval_examples`, columns, labels;
- the distillation text (when a student is distilled): present, non-empty, with its text column;

and then runs `store.check_private_data_separation`. Each error is a `ValueError` naming the flag to fix.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional

from .config import PRESETS, STAGE_INPUTS, PipelineConfig
from .data import missing_split_message, private_splits
from .loading import load_tokenizer
from .store import (STAGE_FILE, STAGE_FOLDERS, USER_STAGES, check_private_data_separation, public_pool,
                    stage_record)

# The finished run-folder stages a stage subcommand reuses: its `STAGE_INPUTS` less the student, which lives in the
# shared cache and is distilled on demand.
STAGES_NEEDED = {stage: tuple(s for s in inputs if s != "distill") for stage, inputs in STAGE_INPUTS.items()}


def preflight(cfg: PipelineConfig, only: Optional[str] = None) -> dict:
    """Check `cfg`'s models, task and data before any work; returns what it found (the model paths, the split sizes,
    and ``data_overlap``: `check_private_data_separation`'s measurement). Raises `ValueError` naming the flag.

    ``only`` is `run_pipeline`'s: a single stage, whose earlier run-folder stages must be done (checked here, so a
    missing one is reported before the student is distilled for it).
    """
    found: dict = {"private": check_private_data(cfg), "public": check_public_data(cfg)}
    if cfg.student_model is None:
        found["distill"] = check_distillation_text(cfg)
    target_path, tokenizer = model_and_tokenizer(cfg.target_model, "target_model")
    found["target_model"] = target_path
    check_model_head(cfg, target_path, "target_model")
    if cfg.student_model is None:
        check_student_layers(cfg, target_path)
    check_task(cfg, tokenizer, "target_model")
    if cfg.student_model is not None:
        student_path, student_tokenizer = model_and_tokenizer(cfg.student_model, "student_model")
        check_model_head(cfg, student_path, "student_model")
        check_task(cfg, student_tokenizer, "student_model")
        found["student_model"] = student_path
    warn_about_init_text(cfg, tokenizer)
    check_earlier_stages(cfg, only)
    found["data_overlap"] = check_private_data_separation(cfg)
    return found


def check_earlier_stages(cfg: PipelineConfig, only: Optional[str]) -> None:
    """The run-folder stages a single stage `only` reuses (`STAGES_NEEDED`) are finished, and not to be overwritten
    (a user stage in the layout before the private workspace counts: the runner converts it)."""
    overwritten = set(cfg.discarded_stages())
    for name in STAGES_NEEDED.get(only, ()):
        if name == "full_tuning" and not cfg.full_baseline:
            continue
        legacy = name in USER_STAGES and os.path.isfile(os.path.join(cfg.run_dir, STAGE_FOLDERS[name], STAGE_FILE))
        if name in overwritten or not legacy and stage_record(cfg.run_dir, name) is None:
            raise ValueError(f"Stage {name!r} has not run in {cfg.run_dir}; run `peft-post {name}` first.")


# ------------------------------------------------------------------------------------------------------- models
def model_source(name: str, flag: str) -> str:
    """The local folder or Hub id `name` (a `--target_model` or `--student_model` value) stands for, refused when it
    is neither a folder holding a saved model nor a valid Hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from ..assets import AssetError, resolve_model

    try:
        path = resolve_model(name)
    except (ValueError, AssetError) as err:
        raise ValueError(f"`--{flag}` {name!r}: {err}") from None
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"`--{flag}` {name!r} is a folder without config.json: not a saved model. Give the "
                             "folder `save_pretrained` wrote (config, weights, tokenizer), or a Hub id.")
        return path
    if os.path.exists(path):
        raise ValueError(f"`--{flag}` {name!r} is a file; give the model's folder (the one `save_pretrained` wrote) "
                         "or a Hub id.")
    try:
        if path.startswith((".", "~", os.sep)):
            raise HFValidationError("a path")
        validate_repo_id(path)
    except HFValidationError:
        raise ValueError(f"`--{flag}` {name!r}: no such folder, and not a Hub id (a Hub id is 'name' or "
                         "'org/name'). Check the path, or give a Hub id.") from None
    return path


def model_and_tokenizer(name: str, flag: str):
    """`model_source` and the tokenizer there (loading it is cheap; the model is not loaded)."""
    path = model_source(name, flag)
    try:
        return path, load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"`--{flag}` {name!r}: could not load its tokenizer ({type(err).__name__}: {err}). A model "
                         "folder needs its tokenizer files beside the weights (`tokenizer.save_pretrained`).") from None


def model_config(path: str, flag: str):
    """The config saved at `path` (no weights), as `AutoConfig` reads it; a `ValueError` naming `--flag` if it
    cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"`--{flag}` {path!r}: could not read its config ({type(err).__name__}: {err}).") from None


def language_model_config(path: str, flag: str):
    """The config of the language model at `path`: a multimodal wrapper's ``text_config`` (Gemma-3 4B+ is saved as
    `Gemma3ForConditionalGeneration`, and POST uses its text model only: `text_models.load_text_model`), the config
    itself otherwise. Its layer count, hidden size and vocabulary are the ones the pipeline works with."""
    return model_config(path, flag).get_text_config()


def check_model_head(cfg: PipelineConfig, path: str, flag: str) -> None:
    """The model has the head the template needs: a masked LM for a ``{mask}`` template, a causal LM otherwise (a
    multimodal wrapper whose language model is a causal LM counts: it is loaded text-only)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = model_config(path, flag)
    auto = AutoModelForMaskedLM if cfg.masked else AutoModelForCausalLM
    candidates = [config] if cfg.masked else [config, config.get_text_config()]
    try:
        fits = any(type(c) in auto._model_mapping for c in candidates)
    except Exception:  # a remote-code or unusual config: leave it to the loader
        return
    if not fits:
        kind = "masked" if cfg.masked else "causal"
        fix = ("a template with '{mask}' needs a masked LM (BERT, RoBERTa); drop '{mask}' for a causal LM"
               if cfg.masked else "a template without '{mask}' needs a causal LM; add a '{mask}' label slot to "
               "`--template` for a masked LM")
        raise ValueError(f"`--{flag}` {path!r} is a {config.model_type!r} model without a {kind}-LM head: {fix}.")


def check_student_layers(cfg: PipelineConfig, target_path: str) -> list[int]:
    """`--student_layers` resolved against the target's layer count (its language model's config; no weights are
    loaded). A list that does not fit is refused naming the flag, with the same layers counted from the top when
    the list looks written for a deeper model (``0,1,2,3,26,27,28,29`` for a 28-layer target:
    ``0,1,2,3,-4,-3,-2,-1``)."""
    from ..distill.student import normalize_layer_indices

    config = language_model_config(target_path, "target_model")
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        return cfg.keep_layers()
    try:
        return normalize_layer_indices(cfg.keep_layers(), n)
    except ValueError as err:
        hint = relative_layers_hint(cfg.keep_layers(), n)
        raise ValueError(f"`--student_layers` {cfg.student_layers!r} does not fit `--target_model` ({n} layers): "
                         f"{err}{hint}") from None


def relative_layers_hint(layers: list, num_layers: int) -> str:
    """For absolute `layers` beyond a model of `num_layers` layers: a sentence giving the same layers counted from
    the top when that fits (they look written for a deeper model), the general advice when it does not; nothing for
    other errors (a layer repeated or out of order, or already counted from the top)."""
    from ..distill.student import normalize_layer_indices

    general = (f" A student of this model keeps at most {num_layers} of its layers; count the top ones from the end "
               "(-1 is the last), e.g. '0,1,-2,-1', and the list fits any model deep enough.")
    if not layers or any(i < 0 for i in layers) or max(layers) < num_layers:
        return ""  # already counted from the top, or in range (a repeated or unsorted layer): the error says it all
    written_for = max(layers) + 1
    # The upper half of the layers the list was written for counts from the top; the lower half from the bottom.
    relative = [i - written_for if i >= written_for / 2 else i for i in layers]
    try:
        normalize_layer_indices(relative, num_layers)
    except ValueError:
        return general
    text = ",".join(str(i) for i in relative)
    return (f" The list looks written for a {written_for}-layer model; the same layers counted from the top are "
            f"`--student_layers {text}` (-1 is the last layer), which fits this model and any other at least "
            f"{len(layers)} layers deep.")


# --------------------------------------------------------------------------------------------------------- task
def check_task(cfg: PipelineConfig, tokenizer, flag: str) -> None:
    """Label words (for classification), template and init text against the tokenizer of `flag`'s model."""
    if cfg.task_kind == "classification":
        check_label_words(cfg, tokenizer, flag)
    check_template(cfg, tokenizer, flag)


def check_label_words(cfg: PipelineConfig, tokenizer, flag: str) -> None:
    from ..tasks import Verbalizer

    words = cfg.label_word_lists()
    owners: dict = {}
    for c, class_words in enumerate(words):
        for word in class_words:
            if owners.setdefault(word, c) != c:
                raise ValueError(f"`--label_words` {cfg.label_words!r}: {word!r} is a label word of classes "
                                 f"{owners[word]} and {c}; each word belongs to one class (classes are separated by "
                                 "'|', synonyms by ',').")
    try:
        Verbalizer(tokenizer, words)
    except ValueError as err:
        raise ValueError(
            f"`--label_words` {cfg.label_words!r} with the tokenizer of `--{flag}`: {err} Each label word must be "
            "made of the model's vocabulary (with a leading space), and no word may serve two classes: pick "
            "another word or a synonym.") from None


def check_template(cfg: PipelineConfig, tokenizer, flag: str) -> None:
    from ..tasks import TaskTemplate

    try:
        template = TaskTemplate.from_config(cfg.post_config(), tokenizer)
        template.encode("text")
    except ValueError as err:
        raise ValueError(f"`--template` {cfg.template!r} with the tokenizer of `--{flag}`: {err}") from None
    if not cfg.prompt_init_text.strip() or not tokenizer(cfg.prompt_init_text, add_special_tokens=False)["input_ids"]:
        raise ValueError(f"`--prompt_init_text` {cfg.prompt_init_text!r} is empty: both prompts are initialised from "
                         "its tokens. Give an instruction for the task, about `--num_virtual_tokens` tokens long.")


def warn_about_init_text(cfg: PipelineConfig, tokenizer) -> None:
    """Warn when the task is the user's (template or label words changed from the preset's) but the init text is
    still the preset's, with its length in tokens against `num_virtual_tokens` (PEFT repeats a short text, cuts a
    long one)."""
    preset = PRESETS[cfg.preset]
    if cfg.prompt_init_text != preset["prompt_init_text"]:
        return
    changed = [f"--{name}" for name in ("template", "label_words") if getattr(cfg, name) != preset[name]]
    if not changed:
        return
    n = len(tokenizer(cfg.prompt_init_text, add_special_tokens=False)["input_ids"])
    warnings.warn(
        f"{' and '.join(f'`{c}`' for c in changed)} are set for your task, but `--prompt_init_text` is still the "
        f"{cfg.preset!r} preset's {cfg.prompt_init_text!r}, so both prompts start from an instruction for that "
        f"preset's task. It is {n} tokens against `--num_virtual_tokens` {cfg.num_virtual_tokens} (PEFT repeats a "
        f"shorter text and cuts a longer one to fit). Give an instruction for your task of about "
        f"{cfg.num_virtual_tokens} tokens as `--prompt_init_text`.", UserWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------------------- data
@contextlib.contextmanager
def named_errors(flag: str, value: str):
    """Loading the data of `--flag`: every error becomes a `ValueError` naming the flag (those that already name one
    pass as they are), so a bad file, folder or Hub id exits with a message, not a traceback."""
    try:
        yield
    except ValueError as err:
        if str(err).startswith("`--"):
            raise
        raise ValueError(f"`--{flag}` {value!r}: {err}") from None
    except Exception as err:  # datasets' own errors: no such Hub dataset, no network, a broken file
        raise ValueError(f"`--{flag}` {value!r} could not be loaded ({type(err).__name__}: {err}). Give an "
                         "embedded: name, an existing local file or folder, or a reachable Hub id.") from None


def check_labelled(dataset, where: str, cfg: PipelineConfig) -> None:
    """A labelled split is non-empty, has the text and label columns, string texts and integer labels in range (for
    generation: the answer column, with non-empty answer texts); `where` names it (the flag, the dataset and the
    split)."""
    from ..tasks import label_problem

    if len(dataset) == 0:
        raise ValueError(f"{where} is empty (a CSV file with only its header?); it needs examples.")
    check_text_column(dataset, where, cfg)
    if cfg.task_kind == "generation":
        check_answer_column(dataset, where, cfg)
        return
    if cfg.label_column not in dataset.column_names:
        raise ValueError(f"{where} has no label column {cfg.label_column!r} (columns: {dataset.column_names}); set "
                         "`--label_column`.")
    problem = label_problem(dataset[cfg.label_column], len(cfg.label_word_lists()))
    if problem:
        raise ValueError(f"{where} {problem} (`--label_words` {cfg.label_words!r})")


def check_answer_column(dataset, where: str, cfg: PipelineConfig) -> None:
    if cfg.answer_column not in dataset.column_names:
        raise ValueError(f"{where} has no answer column {cfg.answer_column!r} (columns: {dataset.column_names}); set "
                         "`--answer_column`.")
    bad = [i for i, a in enumerate(dataset[cfg.answer_column]) if not isinstance(a, str) or not a.strip()]
    if bad:
        raise ValueError(f"{where} has {len(bad)} empty or non-string answer(s) in column {cfg.answer_column!r} "
                         f"(first at row {bad[0]}); every example of a generation task needs an answer text.")


def check_text_column(dataset, where: str, cfg: PipelineConfig) -> None:
    if cfg.text_column not in dataset.column_names:
        raise ValueError(f"{where} has no text column {cfg.text_column!r} (columns: {dataset.column_names}); set "
                         "`--text_column`.")
    bad = next((t for t in dataset[cfg.text_column] if not isinstance(t, str)), "") if \
        getattr(dataset.features.get(cfg.text_column), "dtype", None) != "string" else ""
    if bad != "":
        raise ValueError(f"{where} has a text that is not a string ({bad!r}, a {type(bad).__name__}): column "
                         f"{cfg.text_column!r} must hold texts (an empty CSV cell reads as None).")


def check_private_data(cfg: PipelineConfig) -> dict:
    """The private train and test splits as the stages will read them (`data.private_splits`); returns their sizes."""
    with named_errors("private_dataset", cfg.private_dataset):
        splits = private_splits(cfg)
    sizes = {}
    for which, name in (("train", cfg.private_train_split), ("test", cfg.private_test_split)):
        if name not in splits:
            raise ValueError(missing_split_message(cfg, which, sorted(splits)))
        check_labelled(splits[name], f"`--private_dataset` {cfg.private_dataset!r} split {name!r}", cfg)
        sizes[which] = len(splits[name])
    used = min(sizes["train"], cfg.max_train_examples)
    batches = {"tune_batch_size": cfg.tune_batch_size}
    if cfg.full_baseline:
        batches["full_tuning_batch_size"] = cfg.full_tuning_value("full_tuning_batch_size")
    for name, batch in batches.items():
        if used < batch:
            raise ValueError(f"`--{name}` {batch} is more than the {used} training examples of `--private_dataset` "
                             f"{cfg.private_dataset!r} (split {cfg.private_train_split!r}"
                             f"{', capped by `--max_train_examples`' if used < sizes['train'] else ''}); lower "
                             f"`--{name}` or give more training data.")
    return sizes


def check_public_data(cfg: PipelineConfig) -> int:
    """The public examples the transfer uses (`store.public_pool`'s first ``num_public_examples +
    num_public_eval_examples``); returns the size of the public split."""
    from ..assets import load_text_dataset

    with named_errors("public_dataset", cfg.public_dataset):
        splits = load_text_dataset(cfg.public_dataset)
    if cfg.public_split not in splits:
        raise ValueError(f"`--public_dataset` {cfg.public_dataset!r} has no split {cfg.public_split!r} (its splits: "
                         f"{sorted(splits)}); set `--public_split`.")
    with named_errors("public_dataset", cfg.public_dataset):
        pool = public_pool(cfg)
    needed = cfg.num_public_examples + cfg.num_public_eval_examples
    where = f"`--public_dataset` {cfg.public_dataset!r} split {cfg.public_split!r}"
    if len(pool) < needed:
        raise ValueError(f"{where} has {len(pool)} examples, fewer than `--num_public_examples` + "
                         f"`--num_public_eval_examples` = {cfg.num_public_examples} + {cfg.num_public_eval_examples} "
                         f"= {needed}; lower them or give a larger public dataset.")
    check_labelled(pool.select(range(needed)), where, cfg)
    return len(pool)


def check_distillation_text(cfg: PipelineConfig) -> int:
    """The distillation text: the split exists, is not empty and has the text column; returns its size."""
    from ..assets import load_text_dataset

    with named_errors("distill_dataset", cfg.distill_dataset):
        splits = load_text_dataset(cfg.distill_dataset)
    if cfg.distill_split not in splits:
        raise ValueError(f"`--distill_dataset` {cfg.distill_dataset!r} has no split {cfg.distill_split!r} (its "
                         f"splits: {sorted(splits)}); set `--distill_split`.")
    text = splits[cfg.distill_split]
    where = f"`--distill_dataset` {cfg.distill_dataset!r} split {cfg.distill_split!r}"
    if len(text) == 0:
        raise ValueError(f"{where} is empty; distillation needs public text.")
    check_text_column(text, where, cfg)
    return len(text)
