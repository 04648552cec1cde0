"""Publish a POST soft prompt to the Hugging Face Hub with an honest model card, and load it back.

`model.push_to_hub` is not used: it replaces PEFT's card with a transformers card (wrong ``library_name``, PEFT tags
lost; DESIGN §4). Instead the adapter files (``adapter_config.json``, ``adapter_model.safetensors`` and the POST side
file ``post_config.json``: written with ``save_pretrained`` by `push_transferred_prompt`, or taken from a saved
folder by `push_adapter_folder`, which loads no model) go up with our card as ``README.md`` in one commit with
``HfApi().upload_folder``. The card's text is the Jinja2 template ``templates/model_card.md``, rendered by
`ModelCard.from_template`; this module only computes its variables (formatted numbers, table rows)."""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import shutil
import tempfile
from typing import Mapping, Optional, Sequence, Union

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .config import POST_CONFIG_NAME, POSTConfig, guarantee_holds
from .io import atomic_write_text

PAPER_URL = "https://arxiv.org/abs/2506.16196"
DEFAULT_COMMIT_MESSAGE = "Upload POST soft prompt"
BASE_TAGS = ("peft", "prompt-tuning", "post")
DP_TAG = "differential-privacy"
MODEL_CARD_TEMPLATE = "model_card.md"  # Jinja2, in peft_post/templates/
ADAPTER_WEIGHT_NAMES = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)

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
    ("target_epsilon", "ε budget asked for"),
    ("target_delta", "δ asked for (None: 1/N, the default)"),
    ("class_weights", "per-class weights on the clipped gradients (each ≤ 1: C still bounds an example)"),
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
            # An evaluate_generation result is scored by its exact match.
            key = "accuracy" if "accuracy" in result else "exact_match"
            if key not in result:
                raise ValueError(f"`evaluation[{name!r}]` has no 'accuracy' (or 'exact_match') key (pass an "
                                 "evaluate_prompt or evaluate_generation result).")
            accuracy, count, dataset = result[key], result.get("num_examples"), result.get("dataset")
        else:
            accuracy, count, dataset = result, None, None
        if not isinstance(accuracy, (int, float)) or not math.isfinite(accuracy) or not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"`evaluation[{name!r}]` accuracy must be a fraction in [0, 1], got {accuracy!r}.")
        if count is not None and (not isinstance(count, int) or count < 1):
            raise ValueError(f"`evaluation[{name!r}]['num_examples']` must be a positive int, got {count!r}.")
        rows.append((str(name), float(accuracy), count, None if dataset is None else str(dataset)))
    return rows


def _ledger_rows(ledger: dict) -> list[tuple[str, str]]:
    """(label, value) rows of a DP ledger: the known keys in `_LEDGER_ROWS` order, then any others by name."""
    labels = dict(_LEDGER_ROWS)
    keys = [k for k, _ in _LEDGER_ROWS if k in ledger] + sorted(k for k in ledger if k not in labels)
    return [(labels.get(key, key), _fmt(ledger[key])) for key in keys]


def _provenance_rows(config: POSTConfig, base_model: str) -> list[tuple[str, str]]:
    rows = [("target (base) model", base_model)]
    if config.source_model_name_or_path is not None:
        rows.append(("source model", config.source_model_name_or_path))
    rows += [
        ("transfer α (direction-term weight)", "not recorded" if config.transfer_alpha is None else config.transfer_alpha),
        ("transfer temperature T", config.transfer_temperature),
        ("virtual tokens", config.num_virtual_tokens),
    ]
    provenance = config.provenance or {}
    rows += [(key, provenance[key]) for key in sorted(provenance)]
    return [(_fmt(k), _fmt(v)) for k, v in rows]


def _card_variables(config: POSTConfig, repo_id: str, base_model: str, rows) -> dict:
    """The variables of ``templates/model_card.md``: values already formatted for a Markdown table or code line."""
    ledger = config.privacy
    cleared = None if ledger is not None else (config.provenance or {}).get("dp_claim_cleared")
    masked = config.task_type == "FEATURE_EXTRACTION"
    return dict(
        paper_url=PAPER_URL,
        repo_id=repo_id,
        base_model=base_model,
        source_model=config.source_model_name_or_path,
        num_virtual_tokens=config.num_virtual_tokens,
        dp_holds=guarantee_holds(ledger),
        # the loading snippet
        masked=masked,
        generation=config.task_kind == "generation",
        max_answer_tokens=config.max_answer_tokens,
        score_name="exact match" if config.task_kind == "generation" else "accuracy",
        auto_class="AutoModelForMaskedLM" if masked else "AutoModelForCausalLM",
        template_repr=repr(config.template),
        label_words_repr=repr(config.label_words),
        # the task
        template_text=_fmt(config.template),
        max_length=config.max_length,
        label_rows=[(c, _fmt(words)) for c, words in enumerate(config.label_words)],
        # provenance
        provenance_rows=_provenance_rows(config, base_model),
        provenance_recorded=bool(config.provenance),
        # privacy: `ledger_rows` is None without a ledger
        ledger_rows=None if ledger is None else _ledger_rows(ledger),
        void_reasons=None if ledger is None else "; ".join(ledger.get("guarantee_void_reasons", [])),
        replace_one=ledger is not None and ledger.get("adjacency") == "replace_one",
        adjacency=None if ledger is None else _fmt(ledger.get("adjacency", "add/remove-one (not recorded)")),
        cleared=None if not cleared else {
            "previous_epsilon": _fmt(cleared.get("previous_epsilon")), "reason": _fmt(cleared.get("reason")),
        },
        # evaluation: (name, accuracy, examples, data)
        evaluation_rows=[
            (_fmt(name), f"{100 * accuracy:.2f}%", "" if count is None else count, _fmt(dataset or ""))
            for name, accuracy, count, dataset in rows
        ],
    )


def build_model_card(
    config: POSTConfig,
    repo_id: str,
    *,
    base_model: Optional[str] = None,
    evaluation: Optional[Mapping] = None,
    license: Optional[str] = None,
    datasets: Optional[Sequence[str]] = None,
):
    """The `huggingface_hub.ModelCard` of a POST prompt published as `repo_id`, rendered from
    ``peft_post/templates/model_card.md`` with `ModelCard.from_template`.

    YAML metadata: ``library_name: peft``, ``base_model`` (``base_model`` or ``config.base_model_name_or_path``,
    which must be a Hub id, not a local path), tags ``peft``, ``prompt-tuning``, ``post`` and, only when
    ``config.privacy`` holds a DP ledger whose guarantee holds, ``differential-privacy``; ``license`` and
    ``datasets`` (Hub ids) only when given. Sections: loading with plain PEFT (a runnable snippet), the task,
    transfer provenance, privacy (ledger and scope, or a plain statement that there is no DP guarantee) and
    evaluation (``evaluation``: ``{row name: accuracy in [0, 1] or evaluate_prompt(...) result}``, a result may
    add a ``"dataset"`` key).
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
    if license is not None and (not isinstance(license, str) or not license.strip()):
        raise ValueError(f"`license` must be a license id such as 'apache-2.0', got {license!r}.")
    if datasets is not None:
        if isinstance(datasets, str) or not datasets:
            raise ValueError(f"`datasets` must be a non-empty list of Hub dataset ids, got {datasets!r}.")
        for name in datasets:
            _check_hub_id(name, "datasets", "List the Hub ids ('org/name') of the public data sets used.")
    rows = _normalise_evaluation(evaluation)
    # The tag means a guarantee that holds: not for a ledger its own trainer declared void (replayable noise).
    tags = list(BASE_TAGS) + ([DP_TAG] if guarantee_holds(config.privacy) else [])
    data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        tags=tags,
        license=license,
        datasets=None if datasets is None else list(datasets),
        pipeline_tag="fill-mask" if config.task_type == "FEATURE_EXTRACTION" else "text-generation",
    )
    template = importlib.resources.files(__package__) / "templates" / MODEL_CARD_TEMPLATE
    with importlib.resources.as_file(template) as path:
        return ModelCard.from_template(data, template_path=str(path),
                                       **_card_variables(config, repo_id, base_model, rows))


def _require_token(token: Union[str, bool, None]) -> str:
    """The token to push with (`token`, else the saved login or HF_TOKEN); a `ValueError` before any request if none."""
    from huggingface_hub import get_token

    if token is False:
        raise ValueError("`token=False`: pushing to the Hub needs a token with write access.")
    if token is not None and token is not True:
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"`token` must be a Hub access token string, got {type(token).__name__}.")
        return token
    found = get_token()
    if not found:
        raise ValueError(
            "No Hugging Face token: pushing needs one with write access. Run `hf auth login`, or set the HF_TOKEN "
            "environment variable (or pass a token). Nothing was uploaded."
        )
    return found


def _check_token_with_hub(api) -> None:
    """Ask the Hub whether it accepts `api`'s token; a clear error when it does not or cannot be reached."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.whoami()
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status == 401:
            raise ValueError(
                f"The Hub rejected the token ({e}). Run `hf auth login --force` with a token that has write access, "
                "or set HF_TOKEN to one. Nothing was uploaded."
            ) from e
        raise ConnectionError(f"The Hub at {api.endpoint} answered {status} when checking the token: {e}") from e
    except Exception as e:  # offline mode, DNS, refused connection: the HTTP client's own error classes
        raise ConnectionError(
            f"Could not reach the Hub at {api.endpoint} to check the token ({type(e).__name__}: {e}). Pushing needs "
            "a network connection (and HF_HUB_OFFLINE unset). Nothing was uploaded."
        ) from e


def read_adapter_folder(adapter: str) -> POSTConfig:
    """The `POSTConfig` of the POST adapter saved in the folder `adapter`, read from its JSON files only.

    A `ValueError` naming `adapter` when it is not a folder, lacks ``adapter_config.json``, the adapter weights or
    ``post_config.json``, or holds another kind of adapter. No model is loaded and no request is made.
    """
    if not isinstance(adapter, (str, os.PathLike)) or not os.path.isdir(adapter):
        raise ValueError(
            f"`adapter` {adapter!r} is not a folder: pass the folder of a saved POST prompt, e.g. "
            "runs/post/transferred_prompt."
        )
    adapter = os.fspath(adapter)
    missing = [name for name in (CONFIG_NAME, POST_CONFIG_NAME) if not os.path.isfile(os.path.join(adapter, name))]
    if not any(os.path.isfile(os.path.join(adapter, name)) for name in ADAPTER_WEIGHT_NAMES):
        missing.append(" or ".join(ADAPTER_WEIGHT_NAMES))
    if missing:
        raise ValueError(
            f"`adapter` {adapter!r} is not a saved POST prompt: it lacks {', '.join(missing)}. Pass the folder that "
            "save_pretrained wrote (e.g. runs/post/transferred_prompt), not a run folder or a checkpoint."
        )
    try:
        return POSTConfig.from_pretrained(adapter)
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"`adapter` {adapter!r} does not hold a valid POST prompt: {e}") from e


def push_adapter_folder(
    adapter: str,
    repo_id: str,
    *,
    private: bool = True,
    token: Union[str, bool, None] = None,
    evaluation: Optional[Mapping] = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    datasets: Optional[Sequence[str]] = None,
):
    """Upload the POST prompt saved in the folder `adapter` and its model card to the Hub repo `repo_id` (created
    private by default). No model is loaded or downloaded.

    In order: the token (`token`, else ``HF_TOKEN`` or the ``hf auth login`` one; a `ValueError` saying how to log in
    when there is none), the folder (`read_adapter_folder`) and the card (`build_model_card`, from the folder's
    ``adapter_config.json`` and ``post_config.json``) are checked before any request; then the Hub is asked whether
    it accepts the token (a `ValueError` when it does not, a `ConnectionError` when it cannot be reached). Only the
    adapter files (``adapter_config.json``, the weights, ``post_config.json``) and the card as ``README.md`` go up,
    in one commit; other files in the folder (trainer state, checkpoints) stay. ``base_model`` overrides the
    adapter's ``base_model_name_or_path`` in the card *and* in the uploaded ``adapter_config.json`` (needed when
    the prompt was made on a local folder), so that `AutoPeftModel*` finds the base weights on the Hub. Refuses to
    upload into an existing public repo when ``private=True``. Returns the `huggingface_hub.CommitInfo`.
    """
    from huggingface_hub import HfApi

    token = _require_token(token)
    config = read_adapter_folder(adapter)
    card = build_model_card(config, repo_id, base_model=base_model, evaluation=evaluation, license=license,
                            datasets=datasets)
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError("`commit_message` must be a non-empty string.")

    api = HfApi(token=token)
    _check_token_with_hub(api)
    with tempfile.TemporaryDirectory(prefix="post-push-") as folder:
        for name in (CONFIG_NAME, POST_CONFIG_NAME) + ADAPTER_WEIGHT_NAMES:
            if os.path.isfile(os.path.join(adapter, name)):
                shutil.copyfile(os.path.join(adapter, name), os.path.join(folder, name))
        adapter_config_path = os.path.join(folder, CONFIG_NAME)
        with open(adapter_config_path, encoding="utf-8") as f:
            adapter_config = json.load(f)
        adapter_config["base_model_name_or_path"] = card.data.base_model
        atomic_write_text(adapter_config_path, json.dumps(adapter_config, indent=2, sort_keys=True))
        atomic_write_text(os.path.join(folder, "README.md"), str(card))

        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if private and not api.repo_info(repo_id, repo_type="model").private:
            raise ValueError(
                f"`private=True` but the Hub repo {repo_id!r} already exists and is public; nothing was uploaded. "
                "Make the repo private first, or pass private=False to publish there."
            )
        return api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message)


def push_transferred_prompt(peft_model, repo_id: str, *, adapter_name: str = "default", **push_options):
    """Upload the POST prompt `adapter_name` of the PeftModel `peft_model` and its model card to the Hub repo
    `repo_id`: `push_adapter_folder` of the folder its ``save_pretrained`` writes.

    ``push_options`` are those of `push_adapter_folder`: ``private=True``, ``token=None``, ``evaluation=None``,
    ``commit_message``, ``base_model=None``, ``license=None``, ``datasets=None``. The token is checked first, then
    that the adapter is a POSTConfig one; both before anything is written or sent.
    """
    from peft import PeftModel

    push_options["token"] = _require_token(push_options.get("token"))
    if not isinstance(peft_model, PeftModel) or adapter_name not in getattr(peft_model, "peft_config", {}):
        raise ValueError(
            f"`peft_model` must be a PeftModel with an adapter named {adapter_name!r}, got {type(peft_model).__name__}."
        )
    # The card's inputs are checked before saving (push_adapter_folder builds the card again from the saved files):
    # the folder of a plain PromptTuningConfig would only say that it lacks post_config.json.
    card_options = {k: v for k, v in push_options.items() if k in ("base_model", "evaluation", "license", "datasets")}
    build_model_card(peft_model.peft_config[adapter_name], repo_id, **card_options)
    with tempfile.TemporaryDirectory(prefix="post-save-") as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name])
        # PEFT saves a non-default adapter into a subfolder named after it.
        return push_adapter_folder(tmp if adapter_name == "default" else os.path.join(tmp, adapter_name), repo_id,
                                   **push_options)


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
