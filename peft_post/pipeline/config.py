"""`PipelineConfig`: the arguments of `peft-post run` and of each stage subcommand, with their presets.

`PipelineConfig` is the pipeline's one source of stage settings: `distill_args`, `tune_args`,
`full_tuning_args`, `dp_config`, `transfer_args` and `post_config` build the stage configs from its fields (the
field maps below say which field becomes which argument), so every caller (the stages, the audits, the benchmarks)
trains with the same arguments. Each field has one stage prefix (``distill_``, ``tune_``, ``full_tuning_``, ``dp_``,
``transfer_``) or belongs to a dataset (``private_``, ``public_``) or to the whole run.

The config validates itself on construction, from the arguments alone. It builds every stage config once, so each
range is checked by the config that owns it (an error names the pipeline field), and it checks its own fields: sizes,
the student's layer list, and public or distillation data that is the private data by name (the measured text
overlap is `store.check_private_data_separation`'s, since it reads the data).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from ..assets import DEFAULT_DISTILLATION_DATASET, DEFAULT_MODEL, DEFAULT_PRIVATE_DATASET, DEFAULT_PUBLIC_DATASET
from ..config import POSTConfig
from ..data_overlap import same_dataset

CONFIG_FILE = "config.json"
# The pipeline's stages, in order (`runner.STAGES`; `overwrite` names them).
STAGE_NAMES = ("distill", "tune", "transfer", "full_tuning", "evaluate")
# The earlier stages whose outputs each stage reads (evaluate: every stage the run plans). A stage subcommand
# (`peft-post transfer`) reuses them finished; the student is distilled on demand, since it lives in a shared cache.
STAGE_INPUTS = {"distill": (), "tune": ("distill",), "transfer": ("distill", "tune"), "full_tuning": (),
                "evaluate": STAGE_NAMES[:-1]}
# The stages made from each stage's output (`STAGE_INPUTS` lists every input, direct or not): what `--overwrite`
# discards with it.
STAGE_DEPENDANTS = {stage: tuple(s for s in STAGE_NAMES if stage in STAGE_INPUTS[s]) for stage in STAGE_NAMES}

# Fields renamed so that each carries its stage's prefix. Old run folders' config.json files, `--config` files and
# command lines that use the old names still work, with a warning.
RENAMED_FIELDS = {
    "alpha": "transfer_alpha",
    "temperature": "transfer_temperature",
    "accountant": "dp_accountant",
    "target_epsilon": "dp_target_epsilon",
    "target_delta": "dp_target_delta",
}

# Stage config argument -> PipelineConfig field, per stage: how the builders below fill each stage config, and how a
# stage config's error is reported under the field name the user gave.
COMMON_TRAINER_FIELDS = {"seed": "seed", "save_steps": "save_steps", "per_device_eval_batch_size": "eval_batch_size",
                         "ddp_timeout": "ddp_timeout"}
DISTILL_FIELDS = {
    "max_steps": "distill_max_steps", "learning_rate": "distill_learning_rate",
    "per_device_train_batch_size": "distill_batch_size", "block_size": "distill_block_size",
    "dataset_text_field": "text_column", "freeze_embeddings": "distill_freeze_embeddings",
    "freeze_lm_head": "distill_freeze_embeddings", "alpha_label_slot": "distill_label_slot_weight",
}
TUNE_FIELDS = {
    "max_steps": "tune_max_steps", "learning_rate": "tune_learning_rate",
    "per_device_train_batch_size": "tune_batch_size", "text_column": "text_column", "label_column": "label_column",
    "answer_column": "answer_column",
}
# The full-tuning baseline's own recipe (on the target, never under DP): each field left None takes the user's tuning
# value (`FULL_TUNING_FALLBACKS`), so a run that sets none of them tunes both prompts alike, as before they existed.
FULL_TUNING_FIELDS = {**TUNE_FIELDS, "max_steps": "full_tuning_max_steps", "learning_rate": "full_tuning_learning_rate",
                      "per_device_train_batch_size": "full_tuning_batch_size"}
FULL_TUNING_FALLBACKS = {"full_tuning_max_steps": "tune_max_steps", "full_tuning_learning_rate": "tune_learning_rate",
                         "full_tuning_batch_size": "tune_batch_size"}
DP_FIELDS = {
    "target_epsilon": "dp_target_epsilon", "target_delta": "dp_target_delta", "max_grad_norm": "dp_max_grad_norm",
    "accountant": "dp_accountant", "max_physical_batch_size": "dp_max_physical_batch_size",
    "class_weights": "dp_class_weights",
}
TRANSFER_FIELDS = {
    "max_steps": "transfer_max_steps", "learning_rate": "transfer_learning_rate",
    "per_device_train_batch_size": "transfer_batch_size", "alpha": "transfer_alpha",
    "temperature": "transfer_temperature", "cache_top_k": "transfer_cache_top_k", "text_column": "text_column",
    "label_column": "label_column", "public_dataset_name": "public_dataset", "answer_column": "answer_column",
    "continuation": "transfer_continuation",
}
# The α a transfer config is validated with (and `transfer_args` builds with) while `transfer_alpha` is None: the
# heuristic picks α only when the transfer stage runs.
ALPHA_PLACEHOLDER = 0.5

# A public split of a dataset that also holds the private task, built disjoint from its train and test splits:
# `assets.load_trec` (and `load_tweet_sentiment`) keep every text in one split only, and the `public` split plays
# the provider's data.
PUBLIC_SPLITS_OF_PRIVATE_DATASETS = {"embedded:trec": "public", "embedded:tweet_sentiment": "public"}

# The Rotten Tomatoes task: its reviews private, VADER's Amazon reviews public (the same family, no overlap:
# benchmarks/results/assets_overlap.json), the paper's sentiment label words and init text.
ROTTEN_TOMATOES_TASK: dict[str, Any] = dict(
    private_dataset=DEFAULT_PRIVATE_DATASET, public_dataset=DEFAULT_PUBLIC_DATASET, public_split="train",
    distill_split="train", template="Review: {text}\nSentiment:", label_words="negative|positive",
    prompt_init_text="Predict if sentiment of this review is positive or negative",
)
# TREC's six coarse answer types: its `public` split (disjoint from train and test) is the provider's data, and the
# student is distilled on text without TREC questions.
TREC_TASK: dict[str, Any] = dict(
    private_dataset="embedded:trec", public_dataset="embedded:trec", public_split="public",
    distill_split="without_trec", template="Question: {text}\nAnswer type:",
    label_words="abbreviation|description|entity|human|location|number",
    prompt_init_text="Classify the type of answer this question asks for",
)
# The Rotten Tomatoes recipe, chosen by measurement on 2 CPU cores with SmolLM2-135M-Instruct (docs/pipeline.md has
# the figures); the default until TREC replaced it.
ROTTEN_TOMATOES_PRESET: dict[str, Any] = dict(
    **ROTTEN_TOMATOES_TASK,
    student_layers="0,1,2,3,-4,-3,-2,-1", distill_max_steps=1500, distill_learning_rate=1e-3,
    distill_templated_fraction=0.5, distill_label_slot_weight=5.0,
    max_train_examples=100_000, max_test_examples=1000,
    tune_max_steps=300, tune_learning_rate=3e-2, tune_batch_size=16,
    num_public_examples=256, num_public_eval_examples=128, transfer_max_steps=120, transfer_learning_rate=1e-2,
    num_virtual_tokens=20,
)
# The TREC headline run (benchmarks/README.md, "Headline over seeds"): a task with 58 points between zero-shot and
# full prompt tuning, where POST's DP gain over zero-shot has an interval that excludes 0 (Rotten Tomatoes leaves 6
# points, too few for it). The DP recipe (expected batch 512, 2 epochs, lr 0.1: 15 steps at TREC's N) was chosen on
# a public proxy task (benchmarks/results/dp_recipe_trec.json, where 128:2:0.1, tried later, ties it), a 300-step
# student, and the transfer's stopping rule on the public held-out split (a cap of 600 steps, scored every 60,
# patience 4); the rest is the Rotten Tomatoes recipe. The full-tuning baseline keeps the non-private recipe the
# headline's full prompt tuning was measured with (300 steps of 16 at lr 0.1): the DP recipe's 15 steps of 512 would
# make a weak upper bound and overstate gap closed.
TREC_PRESET: dict[str, Any] = {**ROTTEN_TOMATOES_PRESET, **TREC_TASK, **dict(
    distill_max_steps=300, tune_batch_size=512, tune_max_steps=15, tune_learning_rate=0.1,
    full_tuning_max_steps=300, full_tuning_batch_size=16, full_tuning_learning_rate=0.1,
    transfer_max_steps=600, transfer_eval_steps=60, transfer_early_stopping_patience=4,
)}
PRESETS: dict[str, dict[str, Any]] = {
    "default": TREC_PRESET,
    "trec": TREC_PRESET,
    "rotten_tomatoes": ROTTEN_TOMATOES_PRESET,
    # The Rotten Tomatoes recipe with tiny budgets: a smaller student, few steps, little data.
    "quick": {**ROTTEN_TOMATOES_PRESET, **dict(
        student_layers="0,1,-2,-1", distill_max_steps=20, max_train_examples=256, max_test_examples=200,
        tune_max_steps=20, num_public_examples=64, num_public_eval_examples=64, transfer_max_steps=20,
        num_virtual_tokens=10,
    )},
}


@dataclass
class PipelineConfig:
    """Arguments of `peft-post run` (and of each stage subcommand). Fields left None take the preset's value."""

    run_dir: str = field(default="runs/post", metadata={"help": "Folder of this run: one sub-folder per stage."})
    preset: str = field(
        default="default",
        metadata={"help": f"Settings for fields left unset, the task's included: one of {sorted(PRESETS)} "
                  "('default', the same as 'trec': TREC answer types, where POST's DP gain over zero-shot is clear; "
                  "'rotten_tomatoes': the paper's sentiment task, with too little headroom for that gain to clear "
                  "its interval; 'quick': Rotten Tomatoes with tiny budgets, a first look that may not beat "
                  "zero-shot, as its report says)."},
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
    distill_split: Optional[str] = field(
        default=None,
        metadata={"help": "Split of the distillation data ('without_trec' of embedded:distillation_text when the "
                  "private task is embedded:trec, 'without_tweets' for embedded:tweet_sentiment, so the student "
                  "never sees a private text)."},
    )
    distill_max_steps: Optional[int] = field(default=None, metadata={"help": "Distillation optimizer steps."})
    distill_learning_rate: Optional[float] = field(default=None, metadata={"help": "Distillation learning rate."})
    distill_batch_size: int = field(default=8, metadata={"help": "Distillation blocks per step (global: each of N launched processes takes 1/N)."})
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
    private_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "The user's private task: embedded name, local CSV/JSON or Hub id, with train/test splits."},
    )
    private_train_split: str = field(default="train", metadata={"help": "Split the prompt is tuned on."})
    private_test_split: str = field(default="test", metadata={"help": "Split the report scores (never selects on)."})
    private_test_size: Optional[float] = field(
        default=None,
        metadata={"help": "For a private dataset without a test split (e.g. one CSV file): the share (0 < x < 1) or "
                  "count (>= 1) of its training split held out as the test split, seeded by `seed` and stratified by "
                  "label. None: the dataset must have the test split."},
    )
    max_train_examples: Optional[int] = field(default=None, metadata={"help": "Cap on private training examples."})
    max_test_examples: Optional[int] = field(default=None, metadata={"help": "Cap on private test examples scored."})
    public_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Public transfer data with labels (labels only score the public held-out part)."},
    )
    public_split: Optional[str] = field(default=None, metadata={"help": "Split of the public dataset."})
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
    template: Optional[str] = field(default=None, metadata={"help": "Task template (see POSTConfig)."})
    label_words: Optional[str] = field(
        default=None,
        metadata={"help": "Label words: classes separated by '|', synonyms by ',' (e.g. 'bad,awful|good,great')."},
    )
    task_kind: str = field(
        default="classification",
        metadata={"help": "'classification' (label words score a label slot; scored by accuracy) or 'generation' (a "
                  "free-form answer from `answer_column` follows the template; scored by exact match and token F1 "
                  "of greedy answers). See docs/generation.md."},
    )
    answer_column: str = field(default="answer", metadata={"help": "Generation: answer column of the datasets."})
    max_answer_tokens: int = field(
        default=16, metadata={"help": "Generation: the most tokens of an answer, EOS included (training and "
                                      "generation)."})
    num_virtual_tokens: Optional[int] = field(default=None, metadata={"help": "Soft prompt length n."})
    prompt_init_text: Optional[str] = field(
        default=None,
        metadata={"help": "Text both p_s and p_t are initialised from (the paper's choice)."},
    )
    tune_max_steps: Optional[int] = field(default=None, metadata={"help": "Prompt-tuning optimizer steps."})
    tune_learning_rate: Optional[float] = field(default=None, metadata={"help": "Prompt-tuning Adam learning rate."})
    tune_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "Prompt-tuning batch size (the expected batch under DP, where larger batches drown less "
                  "of the signal in noise). Global: each of N launched processes takes 1/N."},
    )
    dp: bool = field(default=True, metadata={"help": "Tune p_s with differential privacy (DP-SGD on the prompt)."})
    dp_target_epsilon: float = field(default=8.0, metadata={"help": "DP budget ε (the paper uses 8)."})
    dp_target_delta: Optional[float] = field(default=None, metadata={"help": "DP δ; None = 1/N."})
    dp_max_grad_norm: float = field(default=1.0, metadata={"help": "DP per-example clipping bound C."})
    dp_accountant: str = field(
        default="pld",
        metadata={"help": "Privacy accountant: 'pld' (dp_accounting, replace-one adjacency; see docs/privacy.md)."},
    )
    dp_class_weights: Optional[str] = field(
        default=None,
        metadata={"help": "DP tuning: one weight in (0, 1] per class, 'w0|w1|...' in label-word order, on each "
                  "example's clipped gradient: a vote that does not favour the majority class (DPConfig."
                  "class_weights). Take them from public knowledge of the class shares: weights computed from the "
                  "private counts release them outside the ledger."},
    )
    dp_max_physical_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "DP tuning: the most examples one forward and backward hold. A larger Poisson batch is "
                  "split into chunks whose clipped gradients are summed before the noise is added once: the same "
                  "DP step, in less memory. None: the whole batch at once (the trec preset's expected 512 questions "
                  "took 11 GB)."},
    )
    transfer_max_steps: Optional[int] = field(default=None, metadata={"help": "Fixed number of transfer steps."})
    transfer_learning_rate: Optional[float] = field(default=None, metadata={"help": "Transfer Adam learning rate."})
    transfer_batch_size: int = field(default=8, metadata={"help": "Public examples per transfer step (global: each of N launched processes takes 1/N)."})
    transfer_alpha: Optional[float] = field(
        default=None,
        metadata={"help": "POST α in [0, 1], used as given; None picks it on PUBLIC data by `transfer_alpha_method`."},
    )
    transfer_alpha_method: str = field(
        default="heuristic",
        metadata={"help": "How α is picked when `transfer_alpha` is None: 'heuristic' (the paper's, from the unprompted "
                  "target's and the source's accuracies on the public held-out split; refused, with a warning, for "
                  "public labels outside the private task's label space, and then α = 0.5) or 'agreement' (one transfer "
                  "per α in 0, 0.25, 0.5, 0.75, 1, keeping the prompt whose predictions on the public held-out texts "
                  "agree most with the source's: no public labels, 5x the transfer steps; it tends to pick α = 0, "
                  "which on the quick preset cost POST 24 points: see docs/transfer.md)."},
    )
    transfer_temperature: float = field(default=2.0, metadata={"help": "Transfer temperature T."})
    transfer_continuation: str = field(
        default="source_greedy",
        metadata={"help": "Generation: the answer tokens the POST loss is applied at on each public input: "
                  "'source_greedy' (the prompted source's own greedy answer; no public labels) or 'public_answers' "
                  "(the public set's `answer_column`)."},
    )
    transfer_eval_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Score the transferred prompt on the public held-out split every this many transfer steps "
                  "(the public curve); None: transfer_max_steps / 5."},
    )
    transfer_early_stopping_patience: Optional[int] = field(
        default=None,
        metadata={"help": "The transfer's stopping rule, on public data only: stop when the public held-out accuracy "
                  "has not improved for this many evaluations, and keep the prompt of the best one (Trainer's "
                  "EarlyStoppingCallback and load_best_model_at_end). Then transfer_max_steps is a cap. None: train "
                  "transfer_max_steps and keep the last prompt. Needs public labels of the private task's classes."},
    )
    transfer_cache_top_k: Optional[int] = field(
        default=None,
        metadata={"help": "Compare the transfer distributions on a small token set (the label words and the "
                  "source's top-k tokens; see TransferConfig.cache_top_k) instead of the whole vocabulary."},
    )
    full_baseline: bool = field(
        default=False, metadata={"help": "Also tune a prompt directly on the target: the upper bound and cost baseline."}
    )
    full_tuning_max_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Full-tuning baseline: optimizer steps (never under DP). None: `tune_max_steps`. The upper "
                  "bound of gap closed, so it needs a recipe that converges: a DP recipe's few large steps do not."},
    )
    full_tuning_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Full-tuning baseline: Adam learning rate. None: `tune_learning_rate`."}
    )
    full_tuning_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "Full-tuning baseline: batch size (global, like `tune_batch_size`). None: "
                  "`tune_batch_size`."},
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of every evaluation."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every this many steps (resume after a stop)."})
    seed: int = field(default=0, metadata={"help": "Seed of every stage and of the data splits."})
    overwrite: Optional[str] = field(
        default=None,
        metadata={"help": "Comma-separated stages to discard and run again in this run folder (" + ", ".join(
            STAGE_NAMES) + "), or 'all' (every run-folder stage; the student, shared by other runs, only when "
                  "'distill' is named): each one's outputs and those of the stages that depend on it. Needed to "
                  "rerun a finished stage with other settings, which is refused otherwise."},
    )
    threads: Optional[int] = field(
        default=None, metadata={"help": "CPU threads torch uses (torch.set_num_threads); None keeps torch's default."}
    )
    ddp_timeout: int = field(
        default=1800,
        metadata={"help": "Under `accelerate launch` on GPUs: seconds a process waits for the others (the process "
                  "group's timeout), e.g. for the main process's evaluation. CPU processes (gloo) keep 30 minutes."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass instead of keeping them (every trainer): less "
                  "memory for a large target or batch, about one more forward of time; the same numbers."},
    )
    device: str = field(
        default="auto",
        metadata={"help": "Where every stage runs: 'auto' (CUDA when available), 'cpu' or 'cuda' (the first visible "
                  "GPU: choose it with CUDA_VISIBLE_DEVICES)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Compute dtype: 'auto', 'float32', 'bfloat16' or 'float16'. Frozen models load in it and "
                  "forwards run under autocast; prompts and a student being distilled keep fp32 weights. 'auto': "
                  "bf16 on a CUDA device with bf16, and on a CPU whose bf16 matmuls a one-off probe finds clearly "
                  "faster (AMX); fp32 elsewhere. See docs/precision.md."},
    )
    device_map: Optional[str] = field(
        default=None,
        metadata={"help": "Spread the target over several CUDA devices (accelerate's device_map): 'auto', "
                  "'balanced', 'balanced_low_0', 'sequential', or a JSON object of module -> device."},
    )
    quantization: Optional[str] = field(
        default=None,
        metadata={"help": "Load the frozen target in '8bit' or '4bit' (NF4) through bitsandbytes, on CUDA: "
                  "`pip install 'peft-post[quantization]'`."},
    )

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {self.preset!r}.")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        # Sizes no stage config checks: a Trainer reads max_steps <= 0 as "train by epochs" and takes any batch size.
        for name in ("distill_max_steps", "tune_max_steps", "max_train_examples",
                     "max_test_examples", "num_public_examples", "num_public_eval_examples", "distill_batch_size",
                     "tune_batch_size", "transfer_batch_size", "eval_batch_size", "save_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        for name in ("transfer_eval_steps", "transfer_early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive int or None, got {value!r}.")
        for name in ("full_tuning_max_steps", "full_tuning_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive int, or None for `{FULL_TUNING_FALLBACKS[name]}`'s "
                                 f"value; got {value!r}.")
        # Checked here because `distill_args` passes the weight on only when templated texts are used.
        if not (isinstance(self.distill_label_slot_weight, (int, float))
                and 0 <= self.distill_label_slot_weight < float("inf")):
            raise ValueError(f"`distill_label_slot_weight` must be >= 0, got {self.distill_label_slot_weight!r}.")
        if not 0 <= self.distill_templated_fraction <= 1:
            raise ValueError(f"`distill_templated_fraction` must be in [0, 1], got {self.distill_templated_fraction!r}.")
        if isinstance(self.max_private_overlap, bool) or not (
                isinstance(self.max_private_overlap, (int, float)) and 0 <= self.max_private_overlap <= 1):
            raise ValueError(f"`max_private_overlap` must be in [0, 1] (1 turns the check off), got "
                             f"{self.max_private_overlap!r}.")
        self._check_private_test_size()
        from ..transfer.alpha import ALPHA_METHODS

        if self.transfer_alpha_method not in ALPHA_METHODS:
            raise ValueError(f"`transfer_alpha_method` must be one of {ALPHA_METHODS}, got "
                             f"{self.transfer_alpha_method!r}.")
        if self.task_kind == "generation":
            if self.masked:
                raise ValueError("`task_kind` generation needs a causal LM template (no '{mask}'): a masked LM does "
                                 "not generate.")
            if self.transfer_alpha_method == "agreement" and self.transfer_alpha is None:
                raise ValueError("`transfer_alpha_method` agreement compares predicted classes and is not defined for "
                                 "`task_kind` generation: give `--transfer_alpha`, or use the heuristic (on exact "
                                 "match).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"`seed` must be an int in [0, 2**32 - 1] (numpy's seed range), got {self.seed!r}.")
        self.overwrite_stages()  # validates the stage names
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"`threads` must be a positive int (or None for torch's default), got {self.threads!r}.")
        if isinstance(self.ddp_timeout, bool) or not isinstance(self.ddp_timeout, int) or self.ddp_timeout < 1:
            raise ValueError(f"`ddp_timeout` must be a positive int (seconds), got {self.ddp_timeout!r}.")
        self._check_private_data_names()
        if self.dp and self.dtype == "float16":
            raise ValueError("`dtype` float16 cannot train with `dp`: its loss scaler would rescale the gradient after "
                             "the DP noise is added. Pass `--dtype bfloat16` (or float32) for a DP run.")
        self.precision()  # a device, dtype or extra this machine lacks is refused before any work
        if self.student_model is None:
            self.keep_layers()  # validates the layer list before any work
        # Every stage config once, so each checks its own fields before any work (building one costs < 1 ms).
        self.post_config()
        if self.student_model is None:
            self.distill_args(os.curdir)
        self.tune_args(os.curdir)
        self.full_tuning_args(os.curdir)
        weights = self.dp_config().class_weights
        if weights is not None and not self.dp:
            raise ValueError("`dp_class_weights` weigh the clipped gradients of a DP step; with `--dp false` they "
                             "would do nothing. Leave them unset, or tune with DP.")
        if weights is not None and self.task_kind == "generation":
            raise ValueError("`dp_class_weights` weigh the classes of a classification task; a generation task has "
                             "none. Leave it unset.")
        if weights is not None and len(weights) != len(self.label_word_lists()):
            raise ValueError(f"`dp_class_weights` has {len(weights)} weights for the {len(self.label_word_lists())} "
                             f"classes of `label_words` {self.label_words!r}: give one per class, in that order.")
        self.transfer_args(os.curdir)

    # ---------------------------------------------------------------------------------------- the stage configs
    def trainer_arguments(self) -> dict:
        """The `TrainingArguments` every stage shares: seed, checkpointing, logging, the device and mixed precision."""
        from ..evaluation import progress_bars_wanted

        # Two checkpoints kept: a job killed after its final checkpoint resumes from the one before it (see
        # `checkpoints.resume_checkpoint`) instead of training again from step 0.
        return dict(
            **{arg: getattr(self, name) for arg, name in COMMON_TRAINER_FIELDS.items()},
            save_strategy="steps", save_total_limit=2, logging_steps=10, report_to="none",
            # Bars on a terminal or in a notebook only: in a redirected log each redraw is another line.
            disable_tqdm=not progress_bars_wanted(), **self.precision().trainer_arguments(),
            **(checkpointing_arguments() if self.gradient_checkpointing else {}),
        )

    def precision(self):
        """The run's `Precision`: `device`, `dtype`, `device_map` and `quantization` resolved on this machine (a
        dtype of 'auto' measures the CPU once per machine; see `peft_post.precision`)."""
        from ..precision import resolve_precision

        # Not cached on the instance (its __dict__ must stay its fields): resolving reads the probe's small cache file.
        device_map = self.device_map
        if isinstance(device_map, str) and device_map.lstrip().startswith("{"):
            try:
                device_map = json.loads(device_map)
            except json.JSONDecodeError as err:
                raise ValueError(f"`device_map` {self.device_map!r} is not a valid JSON object ({err}).") from None
        return resolve_precision(self.device, self.dtype, device_map, self.quantization)

    def distill_args(self, output_dir: str):
        """The `DistillationConfig` of the student's distillation, checkpointing into `output_dir`."""
        from ..distill import DistillationConfig

        values = self._stage_values(DISTILL_FIELDS)
        if self.masked or self.distill_templated_fraction == 0:
            values["alpha_label_slot"] = 0.0  # no templated texts, hence no label slots to weigh
        return _named_errors(lambda: DistillationConfig(output_dir=output_dir, **self.trainer_arguments(), **values),
                             {**COMMON_TRAINER_FIELDS, **DISTILL_FIELDS})

    def tune_args(self, output_dir: str):
        """The `PromptTrainingConfig` of the user's prompt tuning."""
        from ..tuning import PromptTrainingConfig

        return _named_errors(lambda: PromptTrainingConfig(output_dir=output_dir, **self.trainer_arguments(),
                                                          **self._stage_values(TUNE_FIELDS)),
                             {**COMMON_TRAINER_FIELDS, **TUNE_FIELDS})

    def full_tuning_args(self, output_dir: str):
        """The `PromptTrainingConfig` of the full-tuning baseline: `full_tuning_*`, each unset one from `tune_*`."""
        from ..tuning import PromptTrainingConfig

        return _named_errors(lambda: PromptTrainingConfig(output_dir=output_dir, **self.trainer_arguments(),
                                                          **self._stage_values(FULL_TUNING_FIELDS)),
                             {**COMMON_TRAINER_FIELDS, **FULL_TUNING_FIELDS})

    def full_tuning_value(self, name: str):
        """Field `name` of the full-tuning recipe (``full_tuning_max_steps`` ...) as the baseline uses it: its own
        value, or the user's tuning value (`FULL_TUNING_FALLBACKS`) when it is None."""
        value = getattr(self, name)
        return getattr(self, FULL_TUNING_FALLBACKS[name]) if value is None else value

    def dp_config(self):
        """The `DPConfig` of the user's DP tuning (built whether or not `dp` is on, so its fields are checked)."""
        from ..tuning import DPConfig

        return _named_errors(lambda: DPConfig(**self._stage_values(DP_FIELDS)), DP_FIELDS)

    def transfer_args(self, output_dir: str, alpha: Optional[float] = None):
        """The `TransferConfig` of the provider's transfer, with `alpha` (else `transfer_alpha`, else a placeholder
        for callers that only need the config's shape: the transfer stage passes the heuristic's α)."""
        from ..transfer import TransferConfig

        values = self._stage_values(TRANSFER_FIELDS)
        if alpha is not None:
            values["alpha"] = alpha
        elif values["alpha"] is None:
            values["alpha"] = ALPHA_PLACEHOLDER
        eval_steps = self.transfer_eval_steps or max(self.transfer_max_steps // 5, 1)
        common = self.trainer_arguments()
        if self.transfer_early_stopping_patience is not None:
            # Trainer's own best-model rule: a checkpoint at every evaluation, the best reloaded at the end.
            common.update(save_steps=eval_steps, load_best_model_at_end=True,
                          metric_for_best_model=self.public_metric, greater_is_better=True)
        return _named_errors(
            lambda: TransferConfig(output_dir=output_dir, **common, **values, eval_strategy="steps",
                                   eval_steps=eval_steps),
            {**COMMON_TRAINER_FIELDS, **TRANSFER_FIELDS})

    def transfer_callbacks(self) -> list:
        """The transfer trainer's callbacks: the stopping rule when `transfer_early_stopping_patience` is set."""
        from transformers import EarlyStoppingCallback

        if self.transfer_early_stopping_patience is None:
            return []
        return [EarlyStoppingCallback(early_stopping_patience=self.transfer_early_stopping_patience)]

    def _stage_values(self, fields: Mapping[str, str]) -> dict:
        from .processes import per_process_batch

        values = {arg: self.full_tuning_value(name) if name in FULL_TUNING_FALLBACKS else getattr(self, name)
                  for arg, name in fields.items()}
        if "per_device_train_batch_size" in values:
            # The config's batch sizes are global: each process of an `accelerate launch` takes its share.
            values["per_device_train_batch_size"] = per_process_batch(values["per_device_train_batch_size"],
                                                                      fields["per_device_train_batch_size"])
        return values

    # ---------------------------------------------------------------------------------------- building and saving
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PipelineConfig":
        """A config from a mapping of field values (a run's ``config.json``, a parsed ``--config`` file): old field
        names are renamed with a warning, unknown ones are refused."""
        values = rename_legacy_fields(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown PipelineConfig field(s) {unknown}; see `peft-post run --help`.")
        return cls(**values)

    @classmethod
    def from_run_dir(cls, run_dir: str) -> "PipelineConfig":
        """The config a run folder was made with (its ``config.json``, written when the run started)."""
        path = os.path.join(run_dir, CONFIG_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{run_dir!r} has no {CONFIG_FILE}: it is not a pipeline run folder "
                             "(`peft-post run` writes one when it starts).") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); restore it or start a new run folder.") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object of PipelineConfig fields.")
        values = rename_legacy_fields(values)
        cfg = cls.from_dict(values)
        # A saved config is resolved: a field it holds as None was None in that run, even where today's preset of
        # the same name sets it (the default preset was Rotten Tomatoes, with no transfer evaluation, until
        # 2026-12-07).
        for name, value in values.items():
            if value is None:
                setattr(cfg, name, None)
        # A folder saved before the full-tuning baseline had its own recipe tuned it with the `tune_*` values.
        for name in FULL_TUNING_FALLBACKS:
            if name not in values:
                setattr(cfg, name, None)
        return cfg

    def save(self, run_dir: str) -> str:
        """Write the config to ``<run_dir>/config.json`` atomically; returns the path."""
        from ..io import atomic_write_json

        path = os.path.join(run_dir, CONFIG_FILE)
        atomic_write_json(path, dataclasses.asdict(self))
        return path

    def with_overrides(self, overrides: Union[Mapping[str, Any], Iterable[str]]) -> "PipelineConfig":
        """A copy with some fields changed and validated again: a mapping of field values, or ``KEY=VALUE`` strings
        (the benchmarks' ``--set``) parsed with the types `peft-post` flags have. Preset values already filled in
        stay: to change the preset, build a new config."""
        changes = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
        changes = rename_legacy_fields(changes)
        if changes.get("preset", self.preset) != self.preset:
            raise ValueError("`with_overrides` cannot change `preset` (the preset's values are already filled in); "
                             "build a new PipelineConfig(preset=...) instead.")
        return type(self).from_dict({**dataclasses.asdict(self), **changes})

    def _check_private_test_size(self) -> None:
        """`private_test_size`: None, a fraction in (0, 1) or a count >= 1 (a whole float, as a flag parses it, is
        stored as the int count)."""
        size = self.private_test_size
        if size is None:
            return
        if isinstance(size, float) and size.is_integer() and size >= 1:
            self.private_test_size = size = int(size)
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not (
                isinstance(size, int) and size >= 1 or isinstance(size, float) and 0 < size < 1):
            raise ValueError(f"`private_test_size` must be a fraction in (0, 1) or a whole count >= 1 of the private "
                             f"training split, got {size!r} (e.g. 0.2).")

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

    def overwrite_stages(self) -> list[str]:
        """The stages `overwrite` names, in `STAGE_NAMES` order ('all': every run-folder stage, not 'distill')."""
        if self.overwrite is None:
            return []
        names = {n.strip() for n in str(self.overwrite).split(",") if n.strip()}
        unknown = sorted(names - set(STAGE_NAMES) - {"all"})
        if unknown or not names:
            raise ValueError(f"`overwrite` must name stages among {list(STAGE_NAMES)} (comma-separated) or 'all', "
                             f"got {self.overwrite!r}.")
        if "all" in names:
            names |= set(STAGE_NAMES) - {"distill"}
        return [n for n in STAGE_NAMES if n in names]


    def discarded_stages(self) -> list[str]:
        """The stages `overwrite` discards: those it names and every stage made from them (`STAGE_DEPENDANTS`)."""
        named = self.overwrite_stages()
        return [s for s in STAGE_NAMES if s in named or any(s in STAGE_DEPENDANTS[n] for n in named)]

    @property
    def target_column(self) -> str:
        """The column a private example is scored against: its label, or for generation its answer."""
        return self.answer_column if self.task_kind == "generation" else self.label_column

    @property
    def public_metric(self) -> str:
        """What the transfer's public held-out curve and stopping rule read: accuracy, or for generation token F1
        (graded, where exact match of a weak prompt sits at 0 for many evaluations)."""
        return "token_f1" if self.task_kind == "generation" else "accuracy"

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
            task_kind=self.task_kind,
            max_answer_tokens=self.max_answer_tokens,
            **init,
            **overrides,
        )


def checkpointing_arguments() -> dict:
    """The `TrainingArguments` that turn on activation (gradient) checkpointing: transformers 5.25 renamed
    ``gradient_checkpointing`` to ``activation_checkpointing`` and warns on the old name."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}


def _named_errors(build: Callable, fields: Mapping[str, str]):
    """`build()`, with a stage config's error reworded to name the PipelineConfig field the user set (``alpha`` is
    ``transfer_alpha`` there): the error must name the argument to fix."""
    try:
        return build()
    except ValueError as err:
        message = str(err)
        for arg, name in fields.items():
            message = message.replace(f"`{arg}`", f"`{name}`")
        raise ValueError(message) from None


def rename_legacy_fields(values: Mapping[str, Any]) -> dict:
    """`values` with `RENAMED_FIELDS`' old names replaced by the new ones (warning once per name)."""
    values = dict(values)
    for old, new in RENAMED_FIELDS.items():
        if old in values:
            if new in values:
                raise ValueError(f"Both `{old}` and `{new}` are set; `{old}` is the old name of `{new}`: keep one.")
            warnings.warn(f"`{old}` is now called `{new}`; the old name will stop working in a later version.",
                          FutureWarning, stacklevel=3)
            values[new] = values.pop(old)
    return values


def rename_legacy_flags(argv: list[str]) -> list[str]:
    """A command line with `RENAMED_FIELDS`' old flags (``--alpha 0.5``, ``--alpha=0.5``) renamed, with a warning."""
    renamed = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        if flag.startswith("--") and flag[2:] in RENAMED_FIELDS:
            new = RENAMED_FIELDS[flag[2:]]
            warnings.warn(f"`{flag}` is now `--{new}`; the old flag will stop working in a later version.",
                          FutureWarning, stacklevel=2)
            arg = f"--{new}{sep}{value}"
        renamed.append(arg)
    return renamed


def parse_overrides(pairs: Iterable[str]) -> dict:
    """``KEY=VALUE`` strings -> {field: value}, typed as `peft-post` parses its flags (``dp=false`` -> False)."""
    from transformers import HfArgumentParser

    flags, keys = [], []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"Override {pair!r}: expected KEY=VALUE with KEY a PipelineConfig field.")
        key = RENAMED_FIELDS.get(key, key)
        keys.append(key)
        flags += [f"--{key}", value]
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"Override(s) of unknown PipelineConfig field(s) {unknown}; see `peft-post run --help`.")
    namespace, rest = HfArgumentParser(PipelineConfig).parse_known_args(flags)
    if rest:
        raise ValueError(f"Could not parse the override(s) {rest}.")
    return {key: getattr(namespace, key) for key in keys}
