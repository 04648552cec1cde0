"""Text-only causal LMs from any checkpoint, multimodal wrappers included.

Gemma-3 4B and larger are published as `Gemma3ForConditionalGeneration` (model_type ``"gemma3"``): a SigLIP vision
tower and a projector around a Gemma-3 language model. `AutoModelForCausalLM` loads such a checkpoint whole, vision
tower included, and `make_student` cannot find its layers. POST needs only the language model, so `load_text_model`
builds the text-only causal LM from the checkpoint's ``text_config`` and loads the language model's weights into it
through transformers' own ``key_mapping=`` renaming; the vision and projector tensors match no parameter, so they
are never read from disk, let alone materialised.
"""

from __future__ import annotations

import contextlib
import logging

__all__ = ["is_multimodal_wrapper", "load_text_model", "text_config", "text_model_key_mapping"]

# The prefixes a multimodal wrapper keeps its language model under, in the layouts transformers reads and writes:
# ``language_model.model.*`` / ``language_model.lm_head.*`` (the Hub's Gemma-3 and LLaVA checkpoints, and what
# transformers 5 still writes on save) and ``model.language_model.*`` (checkpoints saved by transformers 4.52-4.57).
# Regexes over checkpoint keys, as `from_pretrained(key_mapping=...)` takes them; ``{prefix}`` is the text model's
# `base_model_prefix`.
_KEY_MAPPING = {
    r"^language_model\.model\.": "{prefix}.",
    r"^model\.language_model\.": "{prefix}.",
    r"^language_model\.lm_head\.": "lm_head.",
}


def _full_config(path: str, **kwargs):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, **kwargs)


def _text_part(config):
    # `get_text_config` returns the config itself for a text-only model and the ``text_config`` sub-config for a
    # multimodal one (Gemma3Config, LlavaConfig, ...).
    return config.get_text_config()


def is_multimodal_wrapper(config) -> bool:
    """Whether `config` (a loaded config) wraps a separate text model config (``text_config``) that a causal LM of
    its own can be built from."""
    from transformers import AutoModelForCausalLM

    text = _text_part(config)
    return text is not config and type(text) in AutoModelForCausalLM._model_mapping


def text_config(path: str, **config_kwargs):
    """The config of the language model at `path` (a folder or Hub id): its ``text_config`` for a multimodal wrapper
    (Gemma-3 4B+ ``Gemma3ForConditionalGeneration``: a `Gemma3TextConfig`), the config itself otherwise. No weights
    are read. Its ``name_or_path`` is `path`, so a student made from it records its teacher."""
    config = _full_config(path, **config_kwargs)
    text = _text_part(config)
    if text is not config:
        text._name_or_path = str(path)
    return text


def text_model_key_mapping(model_class) -> dict:
    """The ``key_mapping=`` that renames a multimodal wrapper's language-model keys to `model_class`'s own."""
    prefix = getattr(model_class, "base_model_prefix", "") or "model"
    return {pattern: target.format(prefix=prefix) for pattern, target in _KEY_MAPPING.items()}


@contextlib.contextmanager
def _quiet_unexpected_keys_report():
    # transformers logs every checkpoint key that matches no parameter as a warning table: for a text-only load of
    # Gemma-3 4B that is every vision and projector tensor (hundreds of lines), all expected. `load_text_model`
    # checks the keys that matter (missing ones) itself.
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_text_model(path: str, **from_pretrained_kwargs):
    """The causal LM at `path` (a folder or Hub id), text only.

    For a multimodal wrapper with a ``text_config`` (Gemma-3 ``Gemma3ForConditionalGeneration`` first; other
    LLaVA-style wrappers whose language model sits under ``language_model``), the causal LM of the text config
    (``Gemma3ForCausalLM``) with the language model's weights: the vision tower and projector are never built or
    read. Any weight of the text model the checkpoint does not provide is an error (no silently random layer). For
    anything else, ``AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)``.

    `from_pretrained_kwargs` go to `from_pretrained` either way: loading options (``dtype``, ``device_map``,
    ``quantization_config``, ``attn_implementation``, ...). Config overrides as keyword arguments are for the
    plain path only; for a wrapper, change the config `text_config` returns and pass it as ``config=``. The model
    is returned as `from_pretrained` returns it (eval mode).
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(from_pretrained_kwargs)
    config_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only",
                                            "trust_remote_code") if k in kwargs}
    given = kwargs.pop("config", None)
    # Whether to go text-only is the checkpoint's config's call, not a given one (which may already be the text part).
    saved = _full_config(path, **config_kwargs)
    if not is_multimodal_wrapper(saved):
        # Without a given config, from_pretrained reads it itself, so keyword config overrides keep their meaning.
        return AutoModelForCausalLM.from_pretrained(path, **({"config": given} if given is not None else {}), **kwargs)
    text = _text_part(given if given is not None else saved)
    if given is None:
        text._name_or_path = str(path)
    model_class = AutoModelForCausalLM._model_mapping[type(text)]
    mapping = {**text_model_key_mapping(model_class), **(kwargs.pop("key_mapping", None) or {})}
    kwargs.pop("output_loading_info", None)
    with _quiet_unexpected_keys_report():
        model, info = model_class.from_pretrained(path, config=text, key_mapping=mapping, output_loading_info=True,
                                                  **kwargs)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"{path!r} is a {saved.model_type!r} multimodal checkpoint, but its language-model weights do not load "
            f"into {model_class.__name__}: {len(missing)} weights are missing (e.g. {missing[:3]}). Its keys keep "
            f"the language model under another prefix than {sorted(_KEY_MAPPING)}; pass `key_mapping=` for it.")
    return model
