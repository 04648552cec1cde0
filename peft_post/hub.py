"""Publish a POST soft prompt to the Hugging Face Hub with an honest model card, and load it back.

`model.push_to_hub` is not used: it replaces PEFT's card with a transformers card (wrong ``library_name``, PEFT tags
lost; DESIGN §4). Instead the adapter is written with ``save_pretrained`` (``adapter_config.json``,
``adapter_model.safetensors`` and the POST side file ``post_config.json``), our card replaces ``README.md``, and
the folder goes up in one commit with ``HfApi().upload_folder``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Mapping, Optional, Union

from peft.utils import CONFIG_NAME

from .config import POSTConfig, guarantee_holds
from .io import atomic_write_text

PAPER_URL = "https://arxiv.org/abs/2506.16196"
DEFAULT_COMMIT_MESSAGE = "Upload POST soft prompt"
BASE_TAGS = ("peft", "prompt-tuning", "post")
DP_TAG = "differential-privacy"

_LEDGER_ROWS = (
    ("epsilon", "ε (epsilon)"),
    ("delta", "δ (delta)"),
    ("accountant", "accountant"),
    ("noise_multiplier", "noise multiplier σ"),
    ("max_grad_norm", "per-example clipping norm C"),
    ("sample_rate", "Poisson sampling rate q"),
    ("steps", "steps"),
    ("adjacency", "neighbouring datasets"),
    ("history", "history [σ, q, steps] per phase"),
    ("epsilon_add_remove", "ε under add/remove-one (not the guarantee: N is published)"),
    ("noise_source", "noise and batch randomness"),
    ("guarantee_holds", "guarantee holds"),
)


def _is_local_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def _check_hub_id(name: str, what: str, fix: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or not name:
        raise ValueError(f"`{what}` must be a Hub id like 'org/name', got {name!r}. {fix}")
    if _is_local_path(name):
        raise ValueError(f"`{what}` is the local path {name!r}, which readers of the Hub cannot load. {fix}")
    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise ValueError(f"`{what}` {name!r} is not a valid Hub id: {e} {fix}") from e


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", "\\n")


def _normalise_evaluation(evaluation: Optional[Mapping]) -> list[tuple[str, float, Optional[int], Optional[str]]]:
    """Rows (name, accuracy, num_examples, dataset) from ``{name: accuracy}`` or ``{name: evaluate_prompt result}``."""
    if evaluation is None:
        return []
    if not isinstance(evaluation, Mapping) or not evaluation:
        raise ValueError(
            "`evaluation` must be a non-empty dict {row name: accuracy or evaluate_prompt(...) result}, "
            f"got {evaluation!r}."
        )
    rows = []
    for name, result in evaluation.items():
        if isinstance(result, Mapping):
            if "accuracy" not in result:
                raise ValueError(f"`evaluation[{name!r}]` has no 'accuracy' key (pass an evaluate_prompt result).")
            accuracy, count, dataset = result["accuracy"], result.get("num_examples"), result.get("dataset")
        else:
            accuracy, count, dataset = result, None, None
        if not isinstance(accuracy, (int, float)) or not math.isfinite(accuracy) or not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"`evaluation[{name!r}]` accuracy must be a fraction in [0, 1], got {accuracy!r}.")
        if count is not None and (not isinstance(count, int) or count < 1):
            raise ValueError(f"`evaluation[{name!r}]['num_examples']` must be a positive int, got {count!r}.")
        rows.append((str(name), float(accuracy), count, None if dataset is None else str(dataset)))
    return rows


def _snippet(config: POSTConfig, base_model: str, repo_id: str) -> str:
    masked = config.task_type == "FEATURE_EXTRACTION"
    auto = "AutoModelForMaskedLM" if masked else "AutoModelForCausalLM"
    lines = [
        "import torch",
        f"from transformers import {auto}, AutoTokenizer",
        "from peft import PeftModel",
        "",
        f'base = {auto}.from_pretrained("{base_model}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base_model}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}").eval()',
        "",
        f"template = {config.template!r}",
        f"label_words = {config.label_words!r}",
        "# Each label word is scored by the first token of ' word' (with the leading space).",
        'label_ids = [[tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in words] for words in label_words]',
        "",
        'text = "A moving, beautifully acted film."',
    ]
    if masked:
        lines += [
            "inputs = tokenizer(template.format(text=text, mask=tokenizer.mask_token), return_tensors=\"pt\")",
            "# PEFT prepends the virtual tokens, so the <mask> slot moves right by their number.",
            "slot = model.peft_config[\"default\"].num_virtual_tokens + int((inputs.input_ids[0] == tokenizer.mask_token_id).nonzero()[0, 0])",
            "with torch.no_grad():",
            "    logits = model(**inputs).logits[0, slot]",
        ]
    else:
        lines += [
            "inputs = tokenizer(template.format(text=text), return_tensors=\"pt\")",
            "with torch.no_grad():",
            "    logits = model(**inputs).logits[0, -1]  # the label is the token after the template",
        ]
    lines += [
        "scores = [logits[ids].mean().item() for ids in label_ids]",
        "print(label_words[scores.index(max(scores))][0], scores)",
    ]
    return "\n".join(lines)


def _provenance_section(config: POSTConfig, base_model: str) -> str:
    transferred = config.source_model_name_or_path is not None
    out = ["## Transfer provenance", ""]
    if transferred:
        out += [
            f"This prompt was not trained on `{base_model}` directly. A prompt was tuned on the small source model "
            f"`{config.source_model_name_or_path}` and transferred to `{base_model}` with POST, which trains only the "
            "target prompt to make the prompted target mimic the prompted source, on public data only:",
            "",
            "L = (1 − α)·KL_T(a_t, a_s) + α·KL_T(a_t − b_t, a_s − b_s)",
            "",
            "where a/b are the label-slot logits with/without the prompt on the source (s) and target (t) models.",
            "",
        ]
    else:
        out += [
            "No source model is recorded: this prompt was not produced by a POST transfer (it was tuned on "
            f"`{base_model}` directly, or its provenance was not recorded).",
            "",
        ]
    rows = [("target (base) model", base_model)]
    if transferred:
        rows.append(("source model", config.source_model_name_or_path))
    rows += [
        ("transfer α (direction-term weight)", "not recorded" if config.transfer_alpha is None else config.transfer_alpha),
        ("transfer temperature T", config.transfer_temperature),
        ("virtual tokens", config.num_virtual_tokens),
    ]
    for key in sorted(config.provenance or {}):
        rows.append((key, (config.provenance or {})[key]))
    out += ["| field | value |", "|---|---|"] + [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in rows]
    if not config.provenance:
        out += ["", "No further provenance (public data set, step count, seed) was recorded with this prompt."]
    return "\n".join(out)


def _privacy_section(config: POSTConfig) -> str:
    out = ["## Privacy", ""]
    ledger = config.privacy
    transferred = config.source_model_name_or_path is not None
    if ledger is None:
        out += [
            "**This prompt has no differential-privacy guarantee.** Its training did not use DP-SGD, so the prompt "
            "may reveal information about the examples it was trained on (soft prompts trained without DP are "
            "measurably vulnerable to membership inference). Do not publish it if that training data is private.",
        ]
        cleared = (config.provenance or {}).get("dp_claim_cleared")
        if cleared:
            out += ["", f"An earlier DP ledger (ε = {_fmt(cleared.get('previous_epsilon'))}) was cleared: "
                        f"{_fmt(cleared.get('reason'))}."]
        return "\n".join(out)
    where = (
        f"on the source model `{config.source_model_name_or_path}`" if transferred else "on the base model"
    )
    if not guarantee_holds(ledger):
        out += ["**The differential-privacy guarantee does not hold for this prompt**, although it was trained with "
                "DP-SGD: " + "; ".join(ledger.get("guarantee_void_reasons", [])) + ". Treat it as non-private.", ""]
    out += [
        f"The prompt was trained {where} with DP-SGD updating the prompt only: each example's gradient was clipped to "
        "norm C, Gaussian noise of standard deviation σ·C was added to the sum, and batches were drawn by Poisson "
        "sampling with rate q. The accountant turns these into the (ε, δ) guarantee below. The table is the whole "
        "ledger, as saved in `post_config.json`.",
        "",
        "| privacy ledger | value |",
        "|---|---|",
    ]
    labels = dict(_LEDGER_ROWS)
    keys = [k for k, _ in _LEDGER_ROWS if k in ledger] + sorted(k for k in ledger if k not in labels)
    out += [f"| {labels.get(key, key)} | {_fmt(ledger[key])} |" for key in keys]
    relation = ("replacing any single example of the private data set by another (replace-one adjacency; the data "
                "set's size is public, as q reveals it)" if ledger.get("adjacency") == "replace_one"
                else f"the neighbouring relation {_fmt(ledger.get('adjacency', 'add/remove-one (not recorded)'))}")
    out += [
        "",
        f"**What this protects:** each single example of the private data set the prompt was tuned on, against "
        f"{relation}. Anything derived from the published prompt (its values, or outputs of a model using it) is "
        "(ε, δ)-close to what it would have been with that example changed.",
    ]
    if transferred:
        out[-1] += (
            " The transfer to the target model read only the DP-trained source prompt and public data, never the "
            "private data, so by the post-processing property of DP the transferred prompt keeps the same (ε, δ)."
        )
    out += [
        "",
        "**What this does not protect:**",
        "",
        "- inference queries: texts sent to a model that uses this prompt are seen by whoever runs that model;",
        "- the public data used for the transfer, which is used without noise (it is public by assumption);",
        "- the base models' own training and distillation data;",
        "- groups: k related examples (e.g. one person's many reviews) are protected only at roughly k·ε;",
        "- the numbers themselves: they are the training code's record, not an audit of it.",
    ]
    return "\n".join(out)


def _evaluation_section(rows) -> str:
    out = ["## Evaluation", ""]
    if not rows:
        return "\n".join(out + ["No evaluation results were published with this prompt."])
    out += [
        "Accuracy of the verbalized classification task (template and label words above), as reported by the "
        "publisher:",
        "",
        "| model / prompt | accuracy | examples | data |",
        "|---|---|---|---|",
    ]
    for name, accuracy, count, dataset in rows:
        out.append(f"| {_fmt(name)} | {100 * accuracy:.2f}% | {'' if count is None else count} | {_fmt(dataset or '')} |")
    return "\n".join(out)


def build_model_card(
    config: POSTConfig,
    repo_id: str,
    *,
    base_model: Optional[str] = None,
    evaluation: Optional[Mapping] = None,
):
    """The `huggingface_hub.ModelCard` of a POST prompt published as `repo_id`.

    YAML metadata: ``library_name: peft``, ``base_model`` (``base_model`` or ``config.base_model_name_or_path``,
    which must be a Hub id, not a local path), tags ``peft``, ``prompt-tuning``, ``post`` and, only when
    ``config.privacy`` holds a DP ledger, ``differential-privacy``. Sections: loading with plain PEFT (a runnable
    snippet), the task, transfer provenance, privacy (ledger and scope, or a plain statement that there is no DP
    guarantee) and evaluation (``evaluation``: ``{row name: accuracy in [0, 1] or evaluate_prompt(...) result}``,
    a result may add a ``"dataset"`` key).
    """
    from huggingface_hub import ModelCard, ModelCardData

    if not isinstance(config, POSTConfig):
        raise ValueError(
            f"`config` must be a POSTConfig, got {type(config).__name__}; build the adapter with "
            "get_peft_model(model, POSTConfig(...)) so the card can state the prompt's task and provenance."
        )
    base_model = base_model if base_model is not None else config.base_model_name_or_path
    _check_hub_id(
        base_model, "base_model",
        "Pass base_model='org/name', the Hub id of the same weights the prompt was made for.",
    )
    _check_hub_id(repo_id, "repo_id", "Use 'user/name' or 'org/name'.")
    rows = _normalise_evaluation(evaluation)
    # The tag means a guarantee that holds: not for a ledger its own trainer declared void (replayable noise).
    tags = list(BASE_TAGS) + ([DP_TAG] if guarantee_holds(config.privacy) else [])
    data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        tags=tags,
        pipeline_tag="fill-mask" if config.task_type == "FEATURE_EXTRACTION" else "text-generation",
    )
    transferred = config.source_model_name_or_path is not None
    summary = (
        f"A soft prompt ({config.num_virtual_tokens} virtual tokens) for `{base_model}`, "
        + (f"transferred from `{config.source_model_name_or_path}` with " if transferred else "published with ")
        + f"[POST]({PAPER_URL}) (Privacy Of Soft-prompt Transfer, ICML 2025). "
        + ("It carries a differential-privacy guarantee; see Privacy." if guarantee_holds(config.privacy)
           else "It carries **no** differential-privacy guarantee; see Privacy.")
    )
    label_table = ["| label id | label words |", "|---|---|"] + [
        f"| {c} | {_fmt(words)} |" for c, words in enumerate(config.label_words)
    ]
    body = "\n\n".join([
        f"# POST soft prompt for {base_model}",
        summary,
        "## How to load it with plain PEFT\n\n"
        "The adapter is an ordinary PEFT prompt-tuning adapter: `transformers` and `peft` are all you need.\n\n"
        f"```python\n{_snippet(config, base_model, repo_id)}\n```\n\n"
        "With `peft_post` installed, `load_transferred_prompt(base, repo_id)` also restores the POST fields "
        "(template, label words, provenance, privacy ledger) from `post_config.json` as a `POSTConfig`.",
        "## Task\n\n"
        f"Classification as text infilling: each input is rendered through the template `{_fmt(config.template)}` "
        f"(at most {config.max_length} tokens, cut from the left) and class c scores the mean logit of its label "
        "words at the label slot.\n\n" + "\n".join(label_table),
        _provenance_section(config, base_model),
        _privacy_section(config),
        _evaluation_section(rows),
        "## Citation\n\n"
        "Wang, Xu, Boenisch, Backes, Choquette-Choo, Dziedzic. *Efficient and Privacy-Preserving Soft Prompt "
        f"Transfer for LLMs.* ICML 2025. {PAPER_URL}",
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def push_transferred_prompt(
    peft_model,
    repo_id: str,
    *,
    private: bool = True,
    token: Union[str, bool, None] = None,
    evaluation: Optional[Mapping] = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    base_model: Optional[str] = None,
    adapter_name: str = "default",
):
    """Upload a POST prompt and its model card to the Hub repo `repo_id` (created private by default).

    ``base_model`` overrides the adapter's ``base_model_name_or_path`` in the card *and* in the uploaded
    ``adapter_config.json`` (needed when the model was loaded from a local folder). Refuses to upload into an
    existing public repo when ``private=True``. Returns the `huggingface_hub.CommitInfo` of the upload.
    """
    from huggingface_hub import HfApi
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel) or adapter_name not in getattr(peft_model, "peft_config", {}):
        raise ValueError(
            f"`peft_model` must be a PeftModel with an adapter named {adapter_name!r}, got {type(peft_model).__name__}."
        )
    config = peft_model.peft_config[adapter_name]
    card = build_model_card(config, repo_id, base_model=base_model, evaluation=evaluation)
    base_model = card.data.base_model
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError("`commit_message` must be a non-empty string.")

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="post-push-") as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name])
        # PEFT saves a non-default adapter into a subfolder named after it.
        folder = tmp if adapter_name == "default" else os.path.join(tmp, adapter_name)
        # The Hub id goes in after saving: during save PEFT probes base_model_name_or_path for config.json, and a
        # local folder answers without a network request.
        adapter_config_path = os.path.join(folder, CONFIG_NAME)
        with open(adapter_config_path, encoding="utf-8") as f:
            adapter_config = json.load(f)
        adapter_config["base_model_name_or_path"] = base_model
        atomic_write_text(adapter_config_path, json.dumps(adapter_config, indent=2, sort_keys=True))
        atomic_write_text(os.path.join(folder, "README.md"), str(card))

        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if private and not api.repo_info(repo_id, repo_type="model").private:
            raise ValueError(
                f"`private=True` but the Hub repo {repo_id!r} already exists and is public; nothing was uploaded. "
                "Make the repo private first, or pass private=False to publish there."
            )
        return api.upload_folder(
            folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message
        )


def load_transferred_prompt(
    base_model,
    repo_id_or_path: str,
    *,
    adapter_name: str = "default",
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Optional[str] = None,
    **model_kwargs,
):
    """A `PeftModel` (eval mode) of `base_model` with the POST prompt at `repo_id_or_path` (Hub id or folder).

    Its ``peft_config[adapter_name]`` is a `POSTConfig` carrying every POST field. ``base_model`` is a loaded
    transformers model or a name/path, loaded with the Auto class matching the prompt's task type
    (``model_kwargs`` go to that ``from_pretrained``).
    """
    from peft import PeftModel

    hub_kwargs = {k: v for k, v in (("revision", revision), ("token", token), ("cache_dir", cache_dir)) if v is not None}
    config = POSTConfig.from_pretrained(repo_id_or_path, **hub_kwargs)
    masked = config.task_type == "FEATURE_EXTRACTION"
    if isinstance(base_model, str):
        import transformers

        auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
        base_kwargs = {"token": token, **model_kwargs} if token is not None else model_kwargs
        base_model = auto.from_pretrained(base_model, **base_kwargs)
    elif model_kwargs:
        raise ValueError(f"`model_kwargs` {sorted(model_kwargs)} apply only when `base_model` is a name or path.")
    if isinstance(base_model, PeftModel):
        raise ValueError("`base_model` is already a PeftModel; pass its base model (peft_model.get_base_model()).")
    is_masked = "ForMaskedLM" in type(base_model).__name__
    if is_masked != masked:
        raise ValueError(
            f"The prompt at {repo_id_or_path!r} is for a {'masked' if masked else 'causal'} LM (task_type "
            f"{config.task_type}), but `base_model` is a {type(base_model).__name__}."
        )
    width = base_model.get_input_embeddings().weight.shape[1]
    if config.token_dim is not None and config.token_dim != width:
        raise ValueError(
            f"The prompt at {repo_id_or_path!r} has token_dim {config.token_dim} but `base_model` embeds into "
            f"{width} dimensions; load it on the model it was made for ({config.base_model_name_or_path})."
        )
    model = PeftModel.from_pretrained(base_model, repo_id_or_path, adapter_name=adapter_name, config=config, **hub_kwargs)
    return model.eval()
