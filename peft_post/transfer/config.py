"""`TransferConfig`: the training arguments of POST stage 3 (prompt transfer on public data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

CACHE_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
CONTINUATIONS = ("source_greedy", "public_answers")


@dataclass
class TransferConfig(TrainingArguments):
    """
    Arguments of [`TransferTrainer`]. Defaults follow the authors' reference code where it is sound: Adam (no
    weight decay) at a constant lr 1e-3 (5e-4 for Llama targets), temperature 2, a fixed number of steps because
    the provider has no private data to select a prompt on.

    Only the public data enters the transfer: the loss needs no labels, so the public training set only needs
    its text column; labels are read only from the optional public held-out split to report accuracy.
    """

    alpha: Optional[float] = field(
        default=None,
        metadata={
            "help": "Weight α in [0, 1] of the direction term KL_T(a_t − b_t, a_s − b_s); 1 − α weighs the "
            "imitation term KL_T(a_t, a_s). Required: pick it or compute it with `suggest_alpha`."
        },
    )
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T of both KL terms (> 0)."})
    cache_source_outputs: bool = field(
        default=True,
        metadata={
            "help": "Compute the prompted-source, plain-source and plain-target label logits once per public example "
            "before training (they never change), so a step is one prompted forward + backward of the target. "
            "False runs the reference code's four forwards per step (same loss, for comparison)."
        },
    )
    cache_top_k: Optional[int] = field(
        default=None,
        metadata={
            "help": "None (default) keeps the full vocabulary: exact. An int k keeps, per example, the label words, "
            "the top-k tokens of the prompted source a_s and the top-k of the source direction a_s − b_s, filled up "
            "to 2k + #label-words tokens with the next tokens of a_s; both KL terms then compare the source and "
            "target distributions renormalised over that set."
        },
    )
    cache_batch_size: int = field(
        default=32, metadata={"help": "Batch size of the no-grad forwards that build the cache."}
    )
    cache_dtype: str = field(
        default="auto",
        metadata={
            "help": "Storage dtype of the cached logits: 'auto' (the target's compute dtype: bfloat16 or float16 when "
            "its weights are, or when `bf16`/`fp16` is set; float32 otherwise), 'float32', 'bfloat16' or "
            "'float16'. The loss always computes in float32; bfloat16 halves the cache."
        },
    )
    cache_memory_budget_mb: float = field(
        default=2048,
        metadata={
            "help": "Largest cache (MiB, as projected before the build and logged) held in host memory by each "
            "process. A larger one is written once to a safetensors file in `cache_dir` and memory-mapped by every "
            "process; a resumed run with the same models, data and settings reuses that file."
        },
    )
    cache_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Folder of the on-disk cache (see `cache_memory_budget_mb`); None: `<output_dir>/transfer_cache`. "
            "Under several processes it must be on a filesystem they all read."
        },
    )
    init_from_source: bool = field(
        default=False,
        metadata={
            "help": "Copy p_s into p_t before training. Needs the same prompt length and hidden size; a clear "
            "error otherwise."
        },
    )
    init_from_source_text: bool = field(
        default=True,
        metadata={
            "help": "When not copying p_s: re-initialise p_t from the source adapter's `prompt_tuning_init_text` "
            "(the paper's choice). False keeps the target adapter's own initialisation."
        },
    )
    continuation: str = field(
        default="source_greedy",
        metadata={
            "help": "Generation tasks: the answer tokens the POST loss is applied at, under teacher forcing. "
            "'source_greedy': the prompted source's own greedy answer to each public input (needs no public labels; "
            "what the source prompt makes the small model say); 'public_answers': the public set's `answer_column`."
        },
    )
    answer_column: str = field(
        default="answer",
        metadata={"help": "Generation tasks: answer column of the public held-out split (evaluation) and, with "
                          "continuation='public_answers', of the public transfer set."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column of the public datasets."})
    label_column: str = field(
        default="label", metadata={"help": "Label column of the public held-out split (evaluation only)."}
    )
    public_dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "Name of the public transfer dataset, recorded in the adapter's provenance (the dataset's own "
            "`info.dataset_name` when None)."
        },
    )

    # Overridden TrainingArguments defaults.
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of p_t (reference: 1e-3)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule (reference: constant)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of p_t (reference: none)."})
    max_steps: int = field(
        default=1000,
        metadata={"help": "Fixed number of transfer steps (the paper converges in ~1000-2000 with 128 examples)."},
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Public examples per step."})
    logging_steps: float = field(default=50, metadata={"help": "Log the transfer loss every this many steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpointing; save the result with `save_model`."})
    report_to: Optional[str] = field(default="none", metadata={"help": "Experiment trackers to report to."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the trainer's own collator reads the raw text column."}
    )

    def __post_init__(self):
        if self.continuation not in CONTINUATIONS:
            raise ValueError(f"`continuation` must be one of {CONTINUATIONS}, got {self.continuation!r}.")
        if not isinstance(self.answer_column, str) or not self.answer_column:
            raise ValueError(f"`answer_column` must be a non-empty column name, got {self.answer_column!r}.")
        if self.alpha is None:
            raise ValueError(
                "`alpha` is required: set it in [0, 1], or compute it with "
                "peft_post.suggest_alpha(zero_shot_acc, source_acc, num_classes)."
            )
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {self.alpha!r}.")
        if isinstance(self.learning_rate, bool) or not (isinstance(self.learning_rate, (int, float))
                                                         and 0 < self.learning_rate < float("inf")):
            raise ValueError(f"`learning_rate` must be a finite number > 0, got {self.learning_rate!r}.")
        if not isinstance(self.temperature, (int, float)) or not 0 < self.temperature < float("inf"):
            raise ValueError(f"`temperature` must be a finite number > 0, got {self.temperature!r}.")
        if self.cache_top_k is not None and (not isinstance(self.cache_top_k, int) or self.cache_top_k < 1):
            raise ValueError(f"`cache_top_k` must be None (full vocabulary) or an int >= 1, got {self.cache_top_k!r}.")
        if not isinstance(self.cache_batch_size, int) or self.cache_batch_size < 1:
            raise ValueError(f"`cache_batch_size` must be an int >= 1, got {self.cache_batch_size!r}.")
        if self.cache_dtype not in CACHE_DTYPE_CHOICES:
            raise ValueError(f"`cache_dtype` must be one of {CACHE_DTYPE_CHOICES}, got {self.cache_dtype!r}.")
        budget = self.cache_memory_budget_mb
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
            raise ValueError(
                f"`cache_memory_budget_mb` must be a number >= 0 (MiB; 0 always writes the cache to disk, inf never "
                f"does), got {budget!r}."
            )
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise ValueError(f"`cache_dir` must be a folder path or None (<output_dir>/transfer_cache), got "
                             f"{self.cache_dir!r}.")
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(
                f"`max_steps` must be an int >= 1, got {self.max_steps!r}: the transfer runs a fixed number of steps "
                "(there is no private data to pick a stopping point on)."
            )
        if self.remove_unused_columns:
            raise ValueError("`remove_unused_columns` must be False: the transfer collator reads the raw text column.")
        super().__post_init__()
