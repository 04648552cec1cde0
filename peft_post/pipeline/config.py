"""`PipelineConfig`: the arguments of `peft-post run` and of each stage subcommand, with their presets.

The config validates itself on construction, from the arguments alone: ranges, the template and label words, the
student's layer list, and public or distillation data that is the private data by name (the measured text overlap is
`store.check_private_data_separation`'s, since it reads the data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..assets import DEFAULT_DISTILLATION_DATASET, DEFAULT_MODEL, DEFAULT_PRIVATE_DATASET, DEFAULT_PUBLIC_DATASET
from ..config import POSTConfig
from ..data_overlap import same_dataset
from ..tuning.config import DP_ACCOUNTANTS

# A public split of a dataset that also holds the private task, built disjoint from its train and test splits:
# `assets.load_trec` keeps every question in one split only, and its `public` split plays the provider's data.
PUBLIC_SPLITS_OF_PRIVATE_DATASETS = {"embedded:trec": "public"}

PRESETS: dict[str, dict[str, Any]] = {
    # Chosen by measurement on 2 CPU cores with SmolLM2-135M-Instruct; see docs/pipeline.md for the figures.
    "default": dict(
        student_layers="0,1,2,3,26,27,28,29", distill_max_steps=1500, distill_learning_rate=1e-3,
        distill_templated_fraction=0.5, distill_label_slot_weight=5.0,
        max_train_examples=100_000, max_test_examples=1000,
        tune_max_steps=300, tune_learning_rate=3e-2, tune_batch_size=16,
        num_public_examples=256, num_public_eval_examples=128, transfer_max_steps=120, transfer_learning_rate=1e-2,
        num_virtual_tokens=20,
    ),
    "quick": dict(
        student_layers="0,1,28,29", distill_max_steps=20, distill_learning_rate=1e-3,
        distill_templated_fraction=0.5, distill_label_slot_weight=5.0,
        max_train_examples=256, max_test_examples=200,
        tune_max_steps=20, tune_learning_rate=3e-2, tune_batch_size=16,
        num_public_examples=64, num_public_eval_examples=64, transfer_max_steps=20, transfer_learning_rate=1e-2,
        num_virtual_tokens=10,
    ),
}


@dataclass
class PipelineConfig:
    """Arguments of `peft-post run` (and of each stage subcommand). Fields left None take the preset's value."""

    run_dir: str = field(default="runs/post", metadata={"help": "Folder of this run: one sub-folder per stage."})
    preset: str = field(
        default="default",
        metadata={"help": f"Settings for fields left unset: one of {sorted(PRESETS)} ('quick' is a first look that "
                  "may not beat zero-shot; its report says so)."},
    )
    target_model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "The large model Φ_t: 'embedded:smollm2-135m-instruct', a Hub id or a local folder."},
    )
    student_model: Optional[str] = field(
        default=None,
        metadata={"help": "A ready small model Φ_s (Hub id or folder). None distils one from the target (cached)."},
    )
    student_layers: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated target layers the student keeps, e.g. '0,1,-2,-1'."}
    )
    distill_dataset: str = field(
        default=DEFAULT_DISTILLATION_DATASET,
        metadata={"help": "Public text for distillation (never the private task): embedded name, file or Hub id."},
    )
    distill_split: str = field(
        default="train",
        metadata={"help": "Split of the distillation data ('without_trec' of embedded:distillation_text when the "
                  "private task is embedded:trec, so the student never sees the private questions)."},
    )
    distill_max_steps: Optional[int] = field(default=None, metadata={"help": "Distillation optimizer steps."})
    distill_learning_rate: Optional[float] = field(default=None, metadata={"help": "Distillation learning rate."})
    distill_batch_size: int = field(default=8, metadata={"help": "Distillation blocks per step."})
    distill_templated_fraction: Optional[float] = field(
        default=None,
        metadata={"help": "Share of the distillation texts wrapped in the task template (without a label), so the "
                  "student learns the teacher's behaviour at the label slot. Causal LMs only."},
    )
    distill_label_slot_weight: Optional[float] = field(
        default=None,
        metadata={"help": "Weight of the extra KL at the label slots of the templated distillation texts "
                  "(DistillationConfig.alpha_label_slot; 0 turns it off)."},
    )
    distill_freeze_embeddings: bool = field(
        default=True,
        metadata={"help": "Freeze the student's (tied) embeddings and LM head while distilling, so soft prompts live in "
                  "the target's input space (direct transfer and the prompt initialisation rely on it)."},
    )
    distill_block_size: int = field(default=64, metadata={"help": "Tokens per distillation block."})
    private_dataset: str = field(
        default=DEFAULT_PRIVATE_DATASET,
        metadata={"help": "The user's private task: embedded name, local CSV/JSON or Hub id, with train/test splits."},
    )
    private_train_split: str = field(default="train", metadata={"help": "Split the prompt is tuned on."})
    private_test_split: str = field(default="test", metadata={"help": "Split the report scores (never selects on)."})
    max_train_examples: Optional[int] = field(default=None, metadata={"help": "Cap on private training examples."})
    max_test_examples: Optional[int] = field(default=None, metadata={"help": "Cap on private test examples scored."})
    public_dataset: str = field(
        default=DEFAULT_PUBLIC_DATASET,
        metadata={"help": "Public transfer data with labels (labels only score the public held-out part)."},
    )
    public_split: str = field(default="train", metadata={"help": "Split of the public dataset."})
    num_public_examples: Optional[int] = field(default=None, metadata={"help": "Public examples the transfer trains on."})
    num_public_eval_examples: Optional[int] = field(
        default=None, metadata={"help": "Public held-out examples: α heuristic and transfer accuracy curve."}
    )
    max_private_overlap: float = field(
        default=0.01,
        metadata={"help": "Largest share of the public transfer texts, and of a sample of the distillation texts, "
                  "allowed to be texts of the private dataset (compared after normalising case, spacing and "
                  "punctuation); above it the run is refused before any work. 1 turns the check off."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column of every dataset."})
    label_column: str = field(default="label", metadata={"help": "Label column of the labelled datasets."})
    template: str = field(default="Review: {text}\nSentiment:", metadata={"help": "Task template (see POSTConfig)."})
    label_words: str = field(
        default="negative|positive",
        metadata={"help": "Label words: classes separated by '|', synonyms by ',' (e.g. 'bad,awful|good,great')."},
    )
    num_virtual_tokens: Optional[int] = field(default=None, metadata={"help": "Soft prompt length n."})
    prompt_init_text: str = field(
        default="Predict if sentiment of this review is positive or negative",
        metadata={"help": "Text both p_s and p_t are initialised from (the paper's choice)."},
    )
    tune_max_steps: Optional[int] = field(default=None, metadata={"help": "Prompt-tuning optimizer steps."})
    tune_learning_rate: Optional[float] = field(default=None, metadata={"help": "Prompt-tuning Adam learning rate."})
    tune_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "Prompt-tuning batch size (the expected batch under DP, where larger batches drown less "
                  "of the signal in noise)."},
    )
    dp: bool = field(default=True, metadata={"help": "Tune p_s with differential privacy (DP-SGD on the prompt)."})
    target_epsilon: float = field(default=8.0, metadata={"help": "DP budget ε (the paper uses 8)."})
    target_delta: Optional[float] = field(default=None, metadata={"help": "DP δ; None = 1/N."})
    dp_max_grad_norm: float = field(default=1.0, metadata={"help": "DP per-example clipping bound C."})
    accountant: str = field(
        default="pld",
        metadata={"help": "Privacy accountant: 'pld' (dp_accounting, replace-one adjacency; see docs/privacy.md)."},
    )
    transfer_max_steps: Optional[int] = field(default=None, metadata={"help": "Fixed number of transfer steps."})
    transfer_learning_rate: Optional[float] = field(default=None, metadata={"help": "Transfer Adam learning rate."})
    transfer_batch_size: int = field(default=8, metadata={"help": "Public examples per transfer step."})
    alpha: Optional[float] = field(
        default=None,
        metadata={"help": "POST α in [0, 1]; None picks it with the paper's heuristic on the PUBLIC held-out split."},
    )
    temperature: float = field(default=2.0, metadata={"help": "Transfer temperature T."})
    transfer_cache_top_k: Optional[int] = field(
        default=None,
        metadata={"help": "Compare the transfer distributions on a small token set (the label words and the "
                  "source's top-k tokens; see TransferConfig.cache_top_k) instead of the whole vocabulary."},
    )
    full_baseline: bool = field(
        default=False, metadata={"help": "Also tune a prompt directly on the target: the upper bound and cost baseline."}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of every evaluation."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every this many steps (resume after a stop)."})
    seed: int = field(default=0, metadata={"help": "Seed of every stage and of the data splits."})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {self.preset!r}.")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("distill_max_steps", "tune_max_steps", "transfer_max_steps", "num_virtual_tokens",
                     "max_train_examples", "max_test_examples", "num_public_examples", "num_public_eval_examples",
                     "distill_batch_size", "distill_block_size", "tune_batch_size", "transfer_batch_size",
                     "eval_batch_size", "save_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        for name in ("distill_learning_rate", "tune_learning_rate", "transfer_learning_rate", "temperature",
                     "target_epsilon", "dp_max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"`{name}` must be > 0, got {value!r}.")
        if not (isinstance(self.distill_label_slot_weight, (int, float)) and self.distill_label_slot_weight >= 0):
            raise ValueError(f"`distill_label_slot_weight` must be >= 0, got {self.distill_label_slot_weight!r}.")
        if not 0 <= self.distill_templated_fraction <= 1:
            raise ValueError(f"`distill_templated_fraction` must be in [0, 1], got {self.distill_templated_fraction!r}.")
        if self.transfer_cache_top_k is not None and (
                not isinstance(self.transfer_cache_top_k, int) or self.transfer_cache_top_k < 1):
            raise ValueError(f"`transfer_cache_top_k` must be None (the whole vocabulary) or an int >= 1, got "
                             f"{self.transfer_cache_top_k!r}.")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"`alpha` must be in [0, 1] or None (heuristic), got {self.alpha!r}.")
        if self.target_delta is not None and not 0 < self.target_delta < 1:
            raise ValueError(f"`target_delta` must be in (0, 1) or None (1/N), got {self.target_delta!r}.")
        if self.accountant not in DP_ACCOUNTANTS:
            raise ValueError(f"`accountant` must be one of {DP_ACCOUNTANTS} (Opacus's 'prv' and 'rdp' analyse "
                             f"add/remove adjacency only; docs/privacy.md), got {self.accountant!r}.")
        if isinstance(self.max_private_overlap, bool) or not (
                isinstance(self.max_private_overlap, (int, float)) and 0 <= self.max_private_overlap <= 1):
            raise ValueError(f"`max_private_overlap` must be in [0, 1] (1 turns the check off), got "
                             f"{self.max_private_overlap!r}.")
        self._check_private_data_names()
        if self.student_model is None:
            self.keep_layers()  # validates the layer list before any work
        self.post_config()  # validates template and label words

    def _check_private_data_names(self) -> None:
        """Refuse, from the arguments alone, public or distillation data that is the private dataset, and a test
        split that is the training split. `check_private_data_separation` measures the text overlap names miss."""
        if self.private_test_split == self.private_train_split:
            raise ValueError(
                f"`private_test_split` and `private_train_split` are both {self.private_train_split!r}: the report "
                "would score the prompt on the examples it was tuned on. Give the held-out split as "
                "`private_test_split` (e.g. 'test').")
        if same_dataset(self.public_dataset, self.private_dataset) and \
                PUBLIC_SPLITS_OF_PRIVATE_DATASETS.get(self.private_dataset) != self.public_split:
            # Any split: every split of the private dataset is the user's data, whatever its name.
            raise ValueError(
                f"`public_dataset` and `private_dataset` are the same dataset ({self.private_dataset!r}): every split "
                "of the private dataset is the user's data, and the provider's transfer trains on the public data "
                "without any privacy protection. Give a public dataset the private data is not drawn from as "
                f"`public_dataset` (e.g. {DEFAULT_PUBLIC_DATASET!r}).")
        if self.student_model is None and same_dataset(self.distill_dataset, self.private_dataset):
            raise ValueError(
                f"`distill_dataset` and `private_dataset` are the same dataset ({self.private_dataset!r}): the "
                "student is distilled on it without any privacy protection and handed to every user. Give public "
                f"text as `distill_dataset` (e.g. {DEFAULT_DISTILLATION_DATASET!r}), or a ready `student_model`.")

    def keep_layers(self) -> list[int]:
        try:
            layers = [int(x) for x in str(self.student_layers).split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"`student_layers` must be comma-separated ints, got {self.student_layers!r}.") from None
        if not layers:
            raise ValueError("`student_layers` is empty; list the target layers the student keeps.")
        return layers

    def label_word_lists(self) -> list[list[str]]:
        return [[w.strip() for w in cls.split(",") if w.strip()] for cls in self.label_words.split("|")]

    @property
    def masked(self) -> bool:
        """A masked-LM run: the template has a '{mask}' label slot."""
        return "{mask}" in self.template

    def post_config(self, tokenizer_path: Optional[str] = None, **overrides) -> POSTConfig:
        init = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=self.prompt_init_text,
                    tokenizer_name_or_path=tokenizer_path) if tokenizer_path else {}
        return POSTConfig(
            task_type="FEATURE_EXTRACTION" if self.masked else "CAUSAL_LM",
            num_virtual_tokens=self.num_virtual_tokens,
            template=self.template,
            label_words=self.label_word_lists(),
            **init,
            **overrides,
        )
