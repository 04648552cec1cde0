"""`POSTConfig`: a PEFT prompt-tuning config that also carries the POST task, transfer and privacy metadata."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from peft import PromptTuningConfig, PromptTuningInit
from peft.utils import CONFIG_NAME, PeftType

from .io import atomic_write_text, read_json_object

# POST fields live in a side file, not in adapter_config.json: plain PEFT builds a PromptTuningConfig from
# adapter_config.json and would warn "Unexpected keyword arguments ... upgrade PEFT" for every POST key,
# which is misleading. The side file keeps plain PEFT silent and is uploaded with the adapter.
POST_CONFIG_NAME = "post_config.json"

SUPPORTED_TASK_TYPES = ("CAUSAL_LM", "FEATURE_EXTRACTION")
PRIVACY_KEYS = ("epsilon", "delta", "accountant", "noise_multiplier", "max_grad_norm", "sample_rate", "steps")
# "pld" (replace-one, dp_accounting) is what the trainer writes; the Opacus names load ledgers written before it.
ACCOUNTANTS = ("pld", "prv", "rdp", "gdp")
ADJACENCIES = ("replace_one", "add_or_remove_one")
DEFAULT_TEMPLATE = "Review: {text}\nSentiment:"
DEFAULT_LABEL_WORDS = (("negative",), ("positive",))
TASK_KINDS = ("classification", "generation")


def validate_privacy_ledger(ledger: dict, name: str = "privacy") -> None:
    """Raise `ValueError` unless `ledger` is a complete, well-formed DP ledger."""
    if not isinstance(ledger, dict):
        raise ValueError(f"`{name}` must be a dict with keys {PRIVACY_KEYS}, got {type(ledger).__name__}.")
    missing = [k for k in PRIVACY_KEYS if k not in ledger]
    if missing:
        raise ValueError(f"`{name}` is missing {missing}; a DP ledger states all of {PRIVACY_KEYS}.")
    eps, delta = ledger["epsilon"], ledger["delta"]
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"`{name}['epsilon']` must be > 0, got {eps!r}.")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"`{name}['delta']` must be in (0, 1), got {delta!r}.")
    if ledger["accountant"] not in ACCOUNTANTS:
        raise ValueError(f"`{name}['accountant']` must be one of {ACCOUNTANTS}, got {ledger['accountant']!r}.")
    if not ledger["noise_multiplier"] >= 0:
        raise ValueError(f"`{name}['noise_multiplier']` must be >= 0, got {ledger['noise_multiplier']!r}.")
    if not ledger["max_grad_norm"] > 0:
        raise ValueError(f"`{name}['max_grad_norm']` must be > 0, got {ledger['max_grad_norm']!r}.")
    if not 0 < ledger["sample_rate"] <= 1:
        raise ValueError(f"`{name}['sample_rate']` must be in (0, 1], got {ledger['sample_rate']!r}.")
    if not (isinstance(ledger["steps"], int) and ledger["steps"] >= 0):
        raise ValueError(f"`{name}['steps']` must be a non-negative int, got {ledger['steps']!r}.")
    if "adjacency" in ledger and ledger["adjacency"] not in ADJACENCIES:
        raise ValueError(f"`{name}['adjacency']` must be one of {ADJACENCIES}, got {ledger['adjacency']!r}.")
    if "history" in ledger and sum(int(h[2]) for h in ledger["history"]) != ledger["steps"]:
        raise ValueError(f"`{name}['history']` counts {sum(int(h[2]) for h in ledger['history'])} steps, "
                         f"`steps` says {ledger['steps']}; the ledger is inconsistent.")


def guarantee_holds(ledger: Optional[dict]) -> bool:
    """Whether a ledger states a DP guarantee that holds (False for no ledger, or one its trainer declared void)."""
    return ledger is not None and ledger.get("guarantee_holds", True) is not False


@dataclass
class POSTConfig(PromptTuningConfig):
    """
    Configuration of a POST soft prompt. It *is* a `PromptTuningConfig` (``peft_type=PROMPT_TUNING``), so
    `get_peft_model(model, POSTConfig(...))` builds an ordinary prompt-tuning adapter that plain PEFT saves and
    loads. The POST fields (task, transfer, privacy ledger) are written to ``post_config.json`` beside
    ``adapter_config.json`` and read back by `POSTConfig.from_pretrained`.

    Causal LMs use ``task_type="CAUSAL_LM"``; masked LMs (``*ForMaskedLM``) use ``task_type="FEATURE_EXTRACTION"``,
    the PEFT model class that prepends the prompt and returns the base model's own (MLM) logits.
    """

    task_type: Optional[str] = field(
        default="CAUSAL_LM",
        metadata={"help": "PEFT task type: 'CAUSAL_LM' for causal LMs, 'FEATURE_EXTRACTION' for masked LMs."},
    )
    num_virtual_tokens: int = field(
        default=20,
        metadata={"help": "Number of virtual tokens n of the soft prompt (the paper uses 100; 20 is enough on CPU)."},
    )
    prompt_tuning_init: str = field(
        default=PromptTuningInit.SAMPLE_VOCAB,
        metadata={
            "help": "How to initialise the prompt: 'TEXT' (from `prompt_tuning_init_text`), 'SAMPLE_VOCAB' (random "
            "real token embeddings) or 'RANDOM' (not recommended: ~50x larger than real embeddings)."
        },
    )
    task_kind: str = field(
        default="classification",
        metadata={
            "help": "'classification' (the template ends at a label slot scored by `label_words`) or 'generation' "
            "(the template ends where a free-form answer begins; causal LMs only)."
        },
    )
    max_answer_tokens: int = field(
        default=16,
        metadata={"help": "Generation: the most tokens of an answer, EOS included (training cuts longer answers; "
                          "evaluation generates at most this many)."},
    )
    template: str = field(
        default=DEFAULT_TEMPLATE,
        metadata={
            "help": "Task template with a '{text}' placeholder, ending at the label slot. Masked LMs also need "
            "'{mask}' where the label word goes, e.g. '{text} It was {mask}.'."
        },
    )
    label_words: list = field(
        default_factory=lambda: [list(w) for w in DEFAULT_LABEL_WORDS],
        metadata={
            "help": "One list of label words per class, in label-id order, written without the leading space "
            "(the verbalizer scores ' word'; a word of several tokens by its mean token log-probability)."
        },
    )
    max_length: int = field(
        default=256,
        metadata={"help": "Maximum tokens of a rendered example (without virtual tokens); the text is cut from the left."},
    )
    source_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "The small (source) model the prompt was tuned on, for a transferred prompt."},
    )
    transfer_alpha: Optional[float] = field(
        default=None,
        metadata={"help": "POST loss weight of the direction term, in [0, 1]; None until a transfer sets it."},
    )
    transfer_temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T of the transfer KL terms (> 0)."},
    )
    privacy: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Differential-privacy ledger of the prompt's training: epsilon, delta, accountant, "
            "noise_multiplier, max_grad_norm, sample_rate, steps. None for a non-private prompt."
        },
    )
    provenance: Optional[dict] = field(
        default=None,
        metadata={"help": "Free-form record of how the prompt was made (stage, data names, sizes, hashes, seed, steps)."},
    )

    def __post_init__(self):
        if self.task_type not in SUPPORTED_TASK_TYPES:
            raise ValueError(
                f"`task_type` must be one of {SUPPORTED_TASK_TYPES} (CAUSAL_LM for causal LMs, FEATURE_EXTRACTION "
                f"for masked LMs), got {self.task_type!r}."
            )
        super().__post_init__()
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"`num_virtual_tokens` must be a positive int, got {self.num_virtual_tokens!r}.")
        if not isinstance(self.template, str) or self.template.count("{text}") != 1:
            raise ValueError(f"`template` must contain '{{text}}' exactly once, got {self.template!r}.")
        if self.task_type == "FEATURE_EXTRACTION" and self.template.count("{mask}") != 1:
            raise ValueError(
                f"`template` of a masked LM must contain '{{mask}}' exactly once (the label slot), got {self.template!r}."
            )
        if self.task_type == "CAUSAL_LM" and "{mask}" in self.template:
            raise ValueError("`template` of a causal LM must not contain '{mask}': it ends at the label slot.")
        self._validate_label_words()
        if self.task_kind not in TASK_KINDS:
            raise ValueError(f"`task_kind` must be one of {TASK_KINDS}, got {self.task_kind!r}.")
        if self.task_kind == "generation" and self.task_type != "CAUSAL_LM":
            raise ValueError("`task_kind='generation'` needs `task_type='CAUSAL_LM'`: a masked LM does not generate.")
        if isinstance(self.max_answer_tokens, bool) or not isinstance(self.max_answer_tokens, int) or \
                self.max_answer_tokens < 1:
            raise ValueError(f"`max_answer_tokens` must be an int >= 1, got {self.max_answer_tokens!r}.")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"`max_length` must be an int >= 2, got {self.max_length!r}.")
        if self.transfer_alpha is not None and not (0.0 <= float(self.transfer_alpha) <= 1.0):
            raise ValueError(f"`transfer_alpha` must be in [0, 1], got {self.transfer_alpha!r}.")
        if not (isinstance(self.transfer_temperature, (int, float)) and self.transfer_temperature > 0):
            raise ValueError(f"`transfer_temperature` must be > 0, got {self.transfer_temperature!r}.")
        if not math.isfinite(float(self.transfer_temperature)):
            raise ValueError("`transfer_temperature` must be finite.")
        if self.privacy is not None:
            validate_privacy_ledger(self.privacy)
        if self.provenance is not None and not isinstance(self.provenance, dict):
            raise ValueError(f"`provenance` must be a dict or None, got {type(self.provenance).__name__}.")

    def _validate_label_words(self) -> None:
        words = self.label_words
        if not isinstance(words, (list, tuple)) or len(words) < 2:
            raise ValueError(f"`label_words` must list at least two classes (one list of words each), got {words!r}.")
        normalised = []
        for c, class_words in enumerate(words):
            if isinstance(class_words, str):
                class_words = [class_words]
            if not isinstance(class_words, (list, tuple)) or not class_words:
                raise ValueError(f"`label_words[{c}]` must be a non-empty list of words, got {class_words!r}.")
            for w in class_words:
                if not isinstance(w, str) or not w.strip():
                    raise ValueError(f"`label_words[{c}]` holds an empty or non-string word: {w!r}.")
            normalised.append([w.strip() for w in class_words])
        self.label_words = normalised

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    @classmethod
    def post_field_names(cls) -> list[str]:
        """Names of the fields that POSTConfig adds to `PromptTuningConfig`."""
        base = {f.name for f in fields(PromptTuningConfig)}
        return [f.name for f in fields(cls) if f.name not in base]

    def post_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.post_field_names()}

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` ({save_directory}) must be a directory, not a file.")
        os.makedirs(save_directory, exist_ok=True)
        auto_mapping_dict = kwargs.pop("auto_mapping_dict", None)
        post_names = set(self.post_field_names())
        adapter_dict = {k: v for k, v in self.to_dict().items() if k not in post_names}
        adapter_dict = {k: (list(v) if isinstance(v, set) else v) for k, v in adapter_dict.items()}
        if auto_mapping_dict is not None:
            adapter_dict["auto_mapping"] = auto_mapping_dict
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(adapter_dict, indent=2, sort_keys=True))
        atomic_write_text(
            os.path.join(save_directory, POST_CONFIG_NAME), json.dumps(self.post_dict(), indent=2, sort_keys=True)
        )

    @classmethod
    def from_peft_type(cls, **kwargs):
        # PEFT dispatches on peft_type and would hand back a plain PromptTuningConfig, dropping every POST field.
        peft_type = kwargs.get("peft_type", PeftType.PROMPT_TUNING)
        if peft_type not in (PeftType.PROMPT_TUNING, PeftType.PROMPT_TUNING.value):
            raise ValueError(f"A POST adapter is a PROMPT_TUNING adapter, this one is {peft_type!r}.")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load `adapter_config.json` and the POST side file from a folder or a Hub repo.

        A plain prompt-tuning adapter without the side file loads with the POST fields at their defaults.
        """
        post_fields = _read_post_side_file(pretrained_model_name_or_path, subfolder, kwargs)
        post_fields.update({k: kwargs.pop(k) for k in list(kwargs) if k in post_fields})
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **post_fields, **kwargs)


def _read_post_side_file(path: str, subfolder: Optional[str], kwargs: dict) -> dict:
    local = os.path.join(path, subfolder) if subfolder else path
    candidate = os.path.join(local, POST_CONFIG_NAME)
    if not os.path.isfile(candidate):
        if os.path.isdir(local):
            return {}
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError

        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
        try:
            candidate = hf_hub_download(path, POST_CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        except EntryNotFoundError:
            return {}
        except HFValidationError:
            # A missing local folder is not a repo id either; say so the way PEFT's own configs do.
            raise ValueError(f"Can't find 'adapter_config.json' at {local!r}: no such folder, and not a Hub repo id.") \
                from None
    return read_json_object(candidate, "The prompt's POST fields are damaged: restore the adapter folder, or make it "
                            "again.")
