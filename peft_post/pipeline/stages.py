"""The whole POST pipeline: distil (provider, cached), tune (user, optionally DP), transfer (provider), evaluate.

Each stage writes one folder under the run directory. The provider's stages (distill, transfer) finish by writing
``stage.json`` into theirs atomically. The user's stages (tune, and the full-tuning baseline) read the private
training split: their folder is what the user hands over, so it holds exactly the adapter and its DP ledger
(`RELEASED_FILES`), and their record (losses, N, wall time, memory), their checkpoints and every private test score
stay in the run's private workspace, ``<run_dir>/private/``. A finished stage is skipped on the next run, and an
interrupted one resumes from its last Trainer checkpoint. The distilled student is the provider's one-time cost: it
lives in the shared cache (``$PEFT_POST_CACHE/students/<key>``), keyed by everything that determines it, and is
reused by later runs.

Data flow respects the actors: the tuning stage is the only one that reads the private training split; the
transfer stage reads the source prompt and public data only; the private test split is read once, by the final
evaluation, and nothing is ever selected on it. Before any stage, public or distillation data that is the private
data is refused: by name in `PipelineConfig`, by measured text overlap in `check_private_data_separation`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .assets import DEFAULT_DISTILLATION_DATASET, DEFAULT_MODEL, DEFAULT_PRIVATE_DATASET, DEFAULT_PUBLIC_DATASET
from .config import POST_CONFIG_NAME, POSTConfig
from .data_overlap import same_dataset
from .io import atomic_write_json
from .tuning.config import DP_ACCOUNTANTS

STAGE_FILE = "stage.json"
# The user's own part of a run folder: records and scores computed from private data, and the checkpoints of the
# stages that read it. Nothing in it is handed to anyone.
PRIVATE_DIR = "private"
# Stages that train on the private training split. Their folder is what the user hands over, so it holds
# `RELEASED_FILES` only, and their record (losses, N, wall time, memory) lives in the private workspace.
USER_STAGES = ("tune", "full_tuning")
STAGE_FOLDERS = {"tune": "source_prompt", "transfer": "transferred_prompt", "full_tuning": "full_prompt"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Exactly what a user stage releases: the adapter PEFT writes (config, weights, its README card), the POST fields
# (`post_config.json`, with the DP ledger) and the DP accountant's history (`tuning.privacy.ACCOUNTANT_STATE_NAME`,
# which holds the accountant's steps and the ledger only). An allow-list, not a deny-list: whatever else a trainer
# saves (`training_args.bin` with the seed, the tokenizer, a future log) stays out unless someone decides it may go.
RELEASED_FILES = frozenset({"adapter_config.json", ADAPTER_WEIGHTS, POST_CONFIG_NAME, "README.md",
                            "dp_accountant.json"})
SCORES_FILE = "test_scores.json"
# The private test split's scores are cached per prompt under this fingerprint for the bare target (zero-shot).
NO_PROMPT = "no_prompt"
# A public split of a dataset that also holds the private task, built disjoint from its train and test splits:
# `assets.load_trec` keeps every question in one split only, and its `public` split plays the provider's data.
PUBLIC_SPLITS_OF_PRIVATE_DATASETS = {"embedded:trec": "public"}
# Distillation corpora can be large: the preflight checks a uniform sample of this many texts (a 1% overlap shows
# as about 50 of them), so the check costs the same on every run.
DISTILL_OVERLAP_SAMPLE = 5000
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


# ------------------------------------------------------------------------------------------------ stage plumbing
def stage_done(folder: str) -> Optional[dict]:
    """The stage record of a finished provider stage folder (distill, transfer), or None. A user stage keeps its
    record in the private workspace: see `private_stage_done` and `stage_record`."""
    path = os.path.join(folder, STAGE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _finish_stage(partial: str, final: str, record: dict) -> dict:
    """Publish a stage: write its record into the partial folder, then rename it into place (atomic).

    The record carries the stage's peak resident memory (`track_stage` reset the high-water mark on entry), so a
    later run that reuses the stage still reports what it cost.
    """
    from .report import peak_rss_mb

    record = {**record, "peak_memory_mb": round(peak_rss_mb(), 1)}
    atomic_write_json(os.path.join(partial, STAGE_FILE), record)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(partial, final)
    return record


def private_workspace(folder: str) -> str:
    """The private workspace beside a stage folder: ``<run_dir>/private`` for ``<run_dir>/source_prompt``."""
    return os.path.join(os.path.dirname(os.path.abspath(folder)), PRIVATE_DIR)


def private_record_path(folder: str, stage: str) -> str:
    """Where the record of user stage `stage`, whose released folder is `folder`, lives: ``private/<stage>.json``."""
    return os.path.join(private_workspace(folder), f"{stage}.json")


def adapter_fingerprint(folder: str) -> Optional[str]:
    """sha256 of the adapter weights in `folder` (None without them): what ties a private record, or a cached
    test score, to the exact prompt it describes, wherever the folder was copied."""
    from .assets import sha256_file

    path = os.path.join(folder, ADAPTER_WEIGHTS)
    return sha256_file(path) if os.path.isfile(path) else None


def private_stage_done(folder: str, stage: str) -> Optional[dict]:
    """The private record of a finished user stage (`USER_STAGES`, or the audit's shadows) released as `folder`,
    or None.

    Finished means the record exists *and* names the adapter the folder holds: a released folder without its record
    (a crash between publishing and recording, a folder copied in without `private/`) counts as unfinished, and so
    does a record whose folder was replaced since.
    """
    path = private_record_path(folder, stage)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    fingerprint = adapter_fingerprint(folder)
    if fingerprint is None or record.get("adapter_sha256") != fingerprint:
        return None
    return record


def stage_record(run_dir: str, name: str) -> Optional[dict]:
    """The record of finished run-folder stage `name` ('tune', 'transfer', 'full_tuning') of `run_dir`, or None;
    for the user stages it is read from the private workspace."""
    if name not in STAGE_FOLDERS:
        raise ValueError(f"`name` must be one of {sorted(STAGE_FOLDERS)}, got {name!r}.")
    folder = os.path.join(run_dir, STAGE_FOLDERS[name])
    return private_stage_done(folder, name) if name in USER_STAGES else stage_done(folder)


def _release_stage(saved: str, folder: str, stage: str, record: dict, workspace: str) -> dict:
    """Publish a user stage. `folder` receives exactly the `RELEASED_FILES` the trainer saved in `saved` (renamed
    into place, atomic); the record (with the released adapter's fingerprint and the stage's peak memory) is written
    to the private workspace after it; the workspace (checkpoints: optimizer and RNG state) is removed last. A crash
    in between leaves a folder without its record, which `private_stage_done` treats as unfinished, and the
    checkpoints it resumes from."""
    from .report import peak_rss_mb

    release = os.path.join(workspace, "release")
    shutil.rmtree(release, ignore_errors=True)
    os.makedirs(release)
    names = sorted(os.listdir(saved))
    for name in names:
        if name in RELEASED_FILES:
            os.replace(os.path.join(saved, name), os.path.join(release, name))
    fingerprint = adapter_fingerprint(release)
    if fingerprint is None:
        raise RuntimeError(f"The trainer saved no {ADAPTER_WEIGHTS} in {saved} (it saved {names}).")
    record = {**record, "peak_memory_mb": round(peak_rss_mb(), 1), "adapter_sha256": fingerprint,
              "released_files": sorted(set(names) & RELEASED_FILES),
              "withheld_files": sorted(set(names) - RELEASED_FILES)}
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(release, folder)
    atomic_write_json(private_record_path(folder, stage), record)
    shutil.rmtree(workspace, ignore_errors=True)
    return record


def _migrate_legacy_stage(folder: str, stage: str) -> None:
    """A user stage published before the private workspace existed kept its record (losses, N) and its private test
    scores inside the released folder. Move the record into the workspace and delete every file that is not
    released, so such a run is reused, not retrained, and its folder becomes safe to hand over. Idempotent: the
    legacy record goes last, so an interrupted migration is finished by the next run."""
    legacy = os.path.join(folder, STAGE_FILE)
    if not os.path.isfile(legacy):
        return
    with open(legacy, encoding="utf-8") as f:
        record = json.load(f)
    withheld = sorted(set(os.listdir(folder)) - RELEASED_FILES - {STAGE_FILE})
    for name in withheld:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    fingerprint = adapter_fingerprint(folder)
    if fingerprint is not None:  # without weights the stage is unfinished anyway, and tuned again
        released = sorted(set(os.listdir(folder)) - {STAGE_FILE})
        atomic_write_json(private_record_path(folder, stage), {**record, "adapter_sha256": fingerprint,
                                                               "released_files": released, "withheld_files": withheld})
    os.remove(legacy)


def _last_checkpoint(folder: str) -> Optional[str]:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(folder) if os.path.isdir(folder) else None


def _load_lm(path: str, masked: bool):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _subset(dataset, n: Optional[int], seed: int):
    if n is None or len(dataset) <= n:
        return dataset
    return dataset.shuffle(seed=seed).select(range(n))


def _trainer_args(cls, output_dir: str, cfg: PipelineConfig, **kwargs):
    return cls(
        output_dir=output_dir, seed=cfg.seed, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        logging_steps=10, report_to="none", disable_tqdm=False, use_cpu=not torch.cuda.is_available(),
        per_device_eval_batch_size=cfg.eval_batch_size, **kwargs,
    )


# ------------------------------------------------------------------------------------------------ the stages
def _spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _model_id(path: str) -> str:
    return os.path.abspath(path) if os.path.isdir(path) else path


def student_cache_key(cfg: PipelineConfig, target_path: str) -> str:
    """Everything that determines the distilled student, hashed: same key, same student."""
    spec = {
        "target": _model_id(target_path),
        "layers": cfg.keep_layers(), "data": cfg.distill_dataset, "steps": cfg.distill_max_steps,
        "lr": cfg.distill_learning_rate, "batch": cfg.distill_batch_size, "block": cfg.distill_block_size,
        "templated": cfg.distill_templated_fraction, "template": cfg.template, "seed": cfg.seed,
        # float(): `5` and `5.0` are the same student, and json writes them differently.
        "label_slot_weight": float(cfg.distill_label_slot_weight), "freeze_embeddings": cfg.distill_freeze_embeddings,
    }
    if cfg.distill_split != "train":  # keeps the keys of students distilled before the field existed
        spec["split"] = cfg.distill_split
    return _spec_key(spec)


def student_folder(cfg: PipelineConfig, target_path: str) -> str:
    """The folder of `cfg`'s distilled student in the shared cache (there or not yet)."""
    from .assets import cache_dir

    return os.path.join(cache_dir(), "students", student_cache_key(cfg, target_path))


def distill_stage(cfg: PipelineConfig, target_path: str, masked: bool) -> tuple[str, dict]:
    """Distil (or reuse) the student; returns its folder and its stage record."""
    from .assets import load_text_dataset
    from .distill import DistillationConfig, DistillationTrainer, make_student, with_task_template
    from .evaluation import evaluate_prompt

    final = student_folder(cfg, target_path)
    record = stage_done(final)
    if record is not None:
        return final, {**record, "reused": True}
    partial = final + ".partial"
    os.makedirs(partial, exist_ok=True)
    start = time.perf_counter()
    teacher = _load_lm(target_path, masked)
    tokenizer = _load_tokenizer(target_path)
    student = make_student(teacher, cfg.keep_layers())
    text = load_text_dataset(cfg.distill_dataset, split=cfg.distill_split)
    if not masked and cfg.distill_templated_fraction > 0:
        text = with_task_template(text, cfg.template, cfg.distill_templated_fraction, cfg.seed, cfg.text_column)
    args = _trainer_args(
        DistillationConfig, os.path.join(partial, "checkpoints"), cfg, max_steps=cfg.distill_max_steps,
        learning_rate=cfg.distill_learning_rate, per_device_train_batch_size=cfg.distill_batch_size,
        block_size=cfg.distill_block_size, dataset_text_field=cfg.text_column,
        alpha_label_slot=cfg.distill_label_slot_weight if not masked and cfg.distill_templated_fraction > 0 else 0.0,
        freeze_embeddings=cfg.distill_freeze_embeddings, freeze_lm_head=cfg.distill_freeze_embeddings,
    )
    trainer = DistillationTrainer(student, teacher, args, train_dataset=text, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=_last_checkpoint(args.output_dir))
    student.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    wall_time = time.perf_counter() - start
    # The provider's check before handing the student out (public labelled data only): a student that cannot do
    # the task zero-shot gives prompts that mostly correct its own bias, which transfers badly.
    _, public_eval = _public_splits(cfg)
    student_zs = evaluate_prompt(student.eval(), tokenizer, public_eval, cfg.post_config(target_path),
                                 text_column=cfg.text_column, label_column=cfg.label_column,
                                 batch_size=cfg.eval_batch_size, desc="student: public zero-shot")
    record = {"stage": "distill", "teacher": target_path, "keep_layers": cfg.keep_layers(),
              "steps": trainer.state.global_step, "wall_time_s": wall_time,
              "public_zero_shot": {"dataset": cfg.public_dataset, "split": cfg.public_split,
                                   "accuracy": student_zs["accuracy"], "num_examples": student_zs["num_examples"],
                                   "per_class": student_zs["per_class"]},
              "log_history": trainer.state.log_history}
    return final, _finish_stage(partial, final, record)


def tune_stage(cfg: PipelineConfig, model_path: str, masked: bool, folder: str, stage: str, dp: bool) -> dict:
    """Tune a prompt on `model_path` with the private training split (the user's stage). Returns the record."""
    from peft import get_peft_model

    from .assets import load_text_dataset
    from .tuning import DPConfig, DPPromptTrainer, PromptTrainer, PromptTrainingConfig

    record = private_stage_done(folder, stage)
    # Checkpoints (optimizer and RNG state, computed from private data) and the trainer's full output stay in the
    # private workspace; only `_release_stage`'s allow-list reaches `folder`.
    workspace = os.path.join(private_workspace(folder), stage + ".partial")
    if record is not None:
        shutil.rmtree(workspace, ignore_errors=True)  # left by a crash after the record was written
        return {**record, "reused": True}
    start = time.perf_counter()
    train = _subset(load_text_dataset(cfg.private_dataset, split=cfg.private_train_split), cfg.max_train_examples,
                    cfg.seed)
    tokenizer = _load_tokenizer(model_path)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(_load_lm(model_path, masked), cfg.post_config(model_path))
    args = _trainer_args(
        PromptTrainingConfig, os.path.join(workspace, "checkpoints"), cfg, max_steps=cfg.tune_max_steps,
        learning_rate=cfg.tune_learning_rate, per_device_train_batch_size=cfg.tune_batch_size,
        text_column=cfg.text_column, label_column=cfg.label_column,
    )
    common = dict(train_dataset=train, processing_class=tokenizer)
    if dp:
        dp_config = DPConfig(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                             max_grad_norm=cfg.dp_max_grad_norm, accountant=cfg.accountant)
        trainer = DPPromptTrainer(model, args, dp_config=dp_config, **common)
    else:
        trainer = PromptTrainer(model, args, **common)
    trainer.train(resume_from_checkpoint=_last_checkpoint(args.output_dir))
    saved = os.path.join(workspace, "saved")
    shutil.rmtree(saved, ignore_errors=True)
    trainer.save_model(saved)
    # Everything below is computed from private data without noise (losses, N) or describes the user's run: it is
    # the user's record, never released.
    record = {"stage": stage, "model": model_path, "steps": trainer.state.global_step, "num_train_examples": len(train),
              "privacy": trainer.privacy_report() if dp else None, "wall_time_s": time.perf_counter() - start,
              "log_history": trainer.state.log_history}
    return _release_stage(saved, folder, stage, record, workspace)


def public_pool(cfg: PipelineConfig):
    """The public dataset in the pipeline's order: the transfer's training examples, then its held-out ones, then
    the rest, which no stage sees."""
    from .assets import load_text_dataset

    return load_text_dataset(cfg.public_dataset, split=cfg.public_split).shuffle(seed=cfg.seed)


def _public_splits(cfg: PipelineConfig):
    public = public_pool(cfg)
    n_train, n_eval = cfg.num_public_examples, cfg.num_public_eval_examples
    if len(public) < n_train + n_eval:
        raise ValueError(f"The public dataset has {len(public)} examples, fewer than num_public_examples + "
                         f"num_public_eval_examples = {n_train + n_eval}; lower them.")
    return public.select(range(n_train)), public.select(range(n_train, n_train + n_eval))


def _texts(dataset, column: str) -> list:
    # One slice, not row by row: iterating a `datasets` column formats each row separately (10x slower here).
    return dataset.select_columns([column])[:][column]


def check_private_data_separation(cfg: PipelineConfig) -> dict:
    """Refuse public transfer or distillation texts that are texts of the private dataset; returns the overlaps.

    Measured after `assets.normalize_text`, against every split of the private dataset (all of them are the user's;
    a split `PUBLIC_SPLITS_OF_PRIVATE_DATASETS` designates as public excepted): the share of the public transfer
    texts (the ``num_public_examples + num_public_eval_examples`` the transfer trains and picks α on) and of a
    uniform sample of up to `DISTILL_OVERLAP_SAMPLE` distillation texts (when the student is distilled here). A
    share above ``cfg.max_private_overlap`` raises a ValueError naming both datasets. `PipelineConfig` already
    refused the same dataset by name; this catches the same sentences under another name.

    It reads the private data, so only the user runs it: in a deployment the provider never holds that data, and the
    user checks the public sets the provider names before handing a prompt over. `run_pipeline` plays every actor
    in one process and runs it before any stage.
    """
    from .assets import load_text_dataset
    from .data_overlap import measure_overlap, sample_indices, text_keys

    start = time.perf_counter()
    result: dict = {"max_private_overlap": cfg.max_private_overlap, "private_dataset": cfg.private_dataset}
    if cfg.max_private_overlap >= 1:
        return {**result, "checked": False}
    exempt = PUBLIC_SPLITS_OF_PRIVATE_DATASETS.get(cfg.private_dataset)
    private = load_text_dataset(cfg.private_dataset)
    splits = [name for name, ds in private.items() if name != exempt and cfg.text_column in ds.column_names]
    if not splits:
        raise ValueError(f"`private_dataset` {cfg.private_dataset!r} has no split with the text column "
                         f"{cfg.text_column!r}; set `text_column`.")
    keys = text_keys(t for name in splits for t in _texts(private[name], cfg.text_column))
    result["private_splits"] = splits
    fix = ("Use public data the private data is not drawn from, or drop the private texts from it first "
           "(`peft_post.assets.remove_overlap`); raise `max_private_overlap` only for texts that are public anyway.")

    public_train, public_eval = _public_splits(cfg)
    public = measure_overlap(_texts(public_train, cfg.text_column) + _texts(public_eval, cfg.text_column), keys)
    result["public"] = {"dataset": cfg.public_dataset, "split": cfg.public_split, **public.to_dict()}
    if public.fraction > cfg.max_private_overlap:
        raise ValueError(
            f"{public.fraction:.1%} of the public transfer texts ({public.num_private} of {public.num_texts}: the "
            f"examples the transfer trains and picks α on) of `public_dataset` {cfg.public_dataset!r} (split "
            f"{cfg.public_split!r}) are texts of `private_dataset` {cfg.private_dataset!r}, above "
            f"`max_private_overlap` = {cfg.max_private_overlap:g}. The provider would train on private data without "
            f"any privacy protection. {fix}")
    if cfg.student_model is None:
        distill = load_text_dataset(cfg.distill_dataset, split=cfg.distill_split)
        sample = distill.select(sample_indices(len(distill), DISTILL_OVERLAP_SAMPLE, cfg.seed))
        measured = measure_overlap(_texts(sample, cfg.text_column), keys)
        result["distill"] = {"dataset": cfg.distill_dataset, "split": cfg.distill_split, "size": len(distill),
                             **measured.to_dict()}
        if measured.fraction > cfg.max_private_overlap:
            hint = (" (its 'without_trec' split leaves the TREC questions out, for a private embedded:trec task)"
                    if cfg.distill_dataset == DEFAULT_DISTILLATION_DATASET and cfg.distill_split != "without_trec"
                    else "")
            raise ValueError(
                f"{measured.fraction:.1%} of a sample of the distillation texts ({measured.num_private} of "
                f"{measured.num_texts}) of `distill_dataset` {cfg.distill_dataset!r} (split {cfg.distill_split!r})"
                f"{hint} are texts of `private_dataset` {cfg.private_dataset!r}, above `max_private_overlap` = "
                f"{cfg.max_private_overlap:g}. The student would be distilled on private data without any privacy "
                f"protection and handed to every user. {fix}")
    return {**result, "checked": True, "seconds": time.perf_counter() - start}


def _load_prompted(model_path: str, adapter: str, masked: bool):
    from peft import PeftModel

    return PeftModel.from_pretrained(_load_lm(model_path, masked), adapter, config=POSTConfig.from_pretrained(adapter))


def transfer_stage(cfg: PipelineConfig, target_path: str, student_path: str, source_prompt: str, masked: bool,
                   folder: str) -> dict:
    """Transfer p_s to the target with public data only (the provider's stage). Returns the record."""
    from peft import get_peft_model

    from .evaluation import evaluate_prompt
    from .transfer import TransferConfig, TransferTrainer, suggest_alpha

    record = stage_done(folder)
    if record is not None:
        return {**record, "reused": True}
    partial = folder + ".partial"
    start = time.perf_counter()
    public_train, public_eval = _public_splits(cfg)
    tokenizer = _load_tokenizer(target_path)
    source = _load_prompted(student_path, source_prompt, masked)
    task = source.active_peft_config
    target_base = _load_lm(target_path, masked)
    alpha, alpha_inputs = cfg.alpha, None
    if alpha is None:
        # The heuristic's accuracies come from PUBLIC labelled data: the provider holds no private data.
        zs = evaluate_prompt(target_base, tokenizer, public_eval, task, text_column=cfg.text_column,
                             label_column=cfg.label_column, batch_size=cfg.eval_batch_size, desc="alpha: zero-shot")
        src = evaluate_prompt(source, tokenizer, public_eval, task, text_column=cfg.text_column,
                              label_column=cfg.label_column, batch_size=cfg.eval_batch_size, desc="alpha: source")
        alpha = suggest_alpha(zs["accuracy"], src["accuracy"], task.num_classes)
        alpha_inputs = {"public_zero_shot": zs["accuracy"], "public_source": src["accuracy"]}
    torch.manual_seed(cfg.seed)
    # Prompt tuning leaves the base weights untouched, so the model scored zero-shot above is the one wrapped here.
    target = get_peft_model(target_base, cfg.post_config(target_path))
    args = _trainer_args(
        TransferConfig, os.path.join(partial, "checkpoints"), cfg, max_steps=cfg.transfer_max_steps,
        learning_rate=cfg.transfer_learning_rate, per_device_train_batch_size=cfg.transfer_batch_size,
        alpha=alpha, temperature=cfg.temperature, text_column=cfg.text_column, label_column=cfg.label_column,
        public_dataset_name=cfg.public_dataset, eval_strategy="steps", cache_top_k=cfg.transfer_cache_top_k,
        eval_steps=max(cfg.transfer_max_steps // 5, 1),
    )
    trainer = TransferTrainer(target, source, args, public_dataset=public_train, public_eval_dataset=public_eval,
                              processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=_last_checkpoint(args.output_dir))
    trainer.save_model(partial)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    # Trainer pickles its arguments beside the adapter; they hold the run's seed, which the user's stages share, and
    # the provider publishes this folder.
    training_args = os.path.join(partial, "training_args.bin")
    if os.path.isfile(training_args):
        os.remove(training_args)
    record = {"stage": "transfer", "alpha": alpha, "alpha_inputs": alpha_inputs, "steps": trainer.state.global_step,
              "num_public_examples": len(public_train), "wall_time_s": time.perf_counter() - start,
              "log_history": trainer.state.log_history}
    return _finish_stage(partial, folder, record)


def _evaluation_key(cfg: PipelineConfig, target_path: str, method: str, student_path: Optional[str] = None) -> str:
    """Everything a test-split score depends on besides the prompt it scores (`adapter_fingerprint`), hashed."""
    spec = {"method": method, "target": _model_id(target_path), "data": cfg.private_dataset,
            "split": cfg.private_test_split, "n": cfg.max_test_examples, "seed": cfg.seed,
            "template": cfg.template, "labels": cfg.label_word_lists(), "columns": [cfg.text_column, cfg.label_column]}
    if student_path is not None:  # methods that run the student
        spec["student"] = _model_id(student_path)
    return _spec_key(spec)


def _scores_path(run_dir: str) -> str:
    return os.path.join(run_dir, PRIVATE_DIR, SCORES_FILE)


def _read_scores(run_dir: str) -> dict:
    path = _scores_path(run_dir)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _cached_evaluation(run_dir: str, prompt: Optional[str], key: str, compute) -> dict:
    """``compute()``, cached in the run's private workspace under the fingerprint of the prompt it scores (`prompt`,
    its folder; None for the bare target) and `key`.

    Private test scores are the user's: they never go into a prompt folder, which is handed to the provider. Keyed
    by the prompt's content, a stage reused in this run folder, or copied in with `copy_stage`, is not scored twice,
    and a score never outlives the prompt it was measured on.
    """
    fingerprint = NO_PROMPT if prompt is None else adapter_fingerprint(prompt)
    cached = _read_scores(run_dir)
    if key not in cached.get(fingerprint, {}):
        cached.setdefault(fingerprint, {})[key] = compute()
        atomic_write_json(_scores_path(run_dir), cached)
    return cached[fingerprint][key]


def copy_stage(source_run: str, run_dir: str, name: str) -> bool:
    """Copy finished stage `name` ('tune', 'transfer', 'full_tuning') of run folder `source_run` into `run_dir`:
    its folder, its private record (user stages) and the cached private test scores of its prompt, so `run_dir`
    reuses the stage and its scores (an α sweep over one source prompt). Returns False, copying nothing, when
    `source_run` has not finished the stage. Both run folders must be the user's: this copies private files.
    """
    if stage_record(source_run, name) is None:
        return False
    folder = os.path.join(run_dir, STAGE_FOLDERS[name])
    source = os.path.join(source_run, STAGE_FOLDERS[name])
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    shutil.copytree(source, folder)
    if name in USER_STAGES:  # last: until the record is there, the copied folder counts as unfinished
        os.makedirs(private_workspace(folder), exist_ok=True)
        shutil.copyfile(private_record_path(source, name), private_record_path(folder, name))
    fingerprint = adapter_fingerprint(folder)
    theirs = _read_scores(source_run).get(fingerprint)
    if theirs:
        ours = _read_scores(run_dir)
        ours[fingerprint] = {**ours.get(fingerprint, {}), **theirs}
        atomic_write_json(_scores_path(run_dir), ours)
    return True


def evaluate_stage(cfg: PipelineConfig, target_path: str, student_path: str, folders: dict, masked: bool) -> dict:
    """Accuracy of every method on the private test split: scored once, used for nothing but the report.

    Each score is cached in the run's private workspace under the fingerprint of the prompt it scores, so a run that
    reuses a stage reuses its scores too (`_cached_evaluation`).
    """
    from .assets import load_text_dataset
    from .evaluation import evaluate_prompt
    from .transfer import direct_transfer

    test = _subset(load_text_dataset(cfg.private_dataset, split=cfg.private_test_split), cfg.max_test_examples, cfg.seed)
    tokenizer = _load_tokenizer(target_path)
    task = cfg.post_config()
    kw = dict(text_column=cfg.text_column, label_column=cfg.label_column, batch_size=cfg.eval_batch_size)

    def score(method: str, prompt: Optional[str], load, desc: str, student: Optional[str] = None) -> dict:
        return _cached_evaluation(cfg.run_dir, prompt, _evaluation_key(cfg, target_path, method, student),
                                  lambda: evaluate_prompt(load(), tokenizer, test, task, desc=desc, **kw))

    results = {
        "zero_shot": score("zero_shot", None, lambda: _load_lm(target_path, masked), "zero-shot"),
        "student_prompt": score("student_prompt", folders["tune"],
                                lambda: _load_prompted(student_path, folders["tune"], masked), "student p_s",
                                student_path),
        "direct_transfer": score("direct_transfer", folders["tune"], lambda: direct_transfer(
            _load_prompted(student_path, folders["tune"], masked), _load_lm(target_path, masked)), "direct transfer",
            student_path),
        "post": score("post", folders["transfer"], lambda: _load_prompted(target_path, folders["transfer"], masked),
                      "POST"),
    }
    if cfg.full_baseline:
        results["full_prompt_tuning"] = score(
            "full_prompt_tuning", folders["full_tuning"],
            lambda: _load_prompted(target_path, folders["full_tuning"], masked), "full PT")
    return {"num_test_examples": len(test), "results": results}


STAGES = ("distill", "tune", "transfer", "full_tuning", "evaluate")


class StageMissing(ValueError):
    """A stage subcommand needs an earlier stage's output that is not there yet."""


def run_pipeline(cfg: PipelineConfig, only: Optional[str] = None, command: Optional[str] = None):
    """Run the stages in order, skipping finished ones, then write the report; returns the `POSTResults`.

    ``only`` runs a single stage (the `peft-post <stage>` subcommands): the earlier run-folder stages must already be
    done; the student, which lives in the shared cache, is distilled on demand when it is missing.
    """
    from .assets import resolve_model
    from .report import POSTResults, curve_from_log_history, track_stage, write_report

    if only is not None and only not in STAGES:
        raise ValueError(f"`only` must be one of {STAGES}, got {only!r}.")
    if only == "full_tuning" and not cfg.full_baseline:
        raise ValueError("The full_tuning stage runs only with --full_baseline.")
    # Before any work, and before the run folder exists: public or distillation data that is the private data.
    overlap = check_private_data_separation(cfg)
    os.makedirs(cfg.run_dir, exist_ok=True)
    atomic_write_json(os.path.join(cfg.run_dir, "config.json"), dataclasses.asdict(cfg))
    atomic_write_json(os.path.join(cfg.run_dir, PRIVATE_DIR, "data_overlap.json"), overlap)
    masked = cfg.masked
    target_path = resolve_model(cfg.target_model)
    folders = {name: os.path.join(cfg.run_dir, folder) for name, folder in STAGE_FOLDERS.items()}
    for name in USER_STAGES:
        _migrate_legacy_stage(folders[name], name)
    # Older runs also cached private test scores inside the provider's transferred_prompt/ (rescored on demand now).
    legacy_scores = os.path.join(folders["transfer"], "test_evaluation.json")
    if os.path.isfile(legacy_scores):
        os.remove(legacy_scores)
    stages: list = []
    records: dict = {}
    student = {"path": None if cfg.student_model is None else resolve_model(cfg.student_model)}

    def distill():
        student["path"], record = distill_stage(cfg, target_path, masked)
        return record

    steps = {
        "distill": distill,
        "tune": lambda: tune_stage(cfg, student["path"], masked, folders["tune"], "tune", cfg.dp),
        "transfer": lambda: transfer_stage(cfg, target_path, student["path"], folders["tune"], masked,
                                           folders["transfer"]),
        "full_tuning": lambda: tune_stage(cfg, target_path, masked, folders["full_tuning"], "full_tuning", False),
        "evaluate": lambda: evaluate_stage(cfg, target_path, student["path"], folders, masked),
    }
    planned = [s for s in STAGES if (s != "distill" or cfg.student_model is None)
               and (s != "full_tuning" or cfg.full_baseline)]
    evaluation_path = os.path.join(cfg.run_dir, "evaluation.json")
    ran_fresh = False
    for name in planned:
        if only is not None and STAGES.index(name) > STAGES.index(only):
            break
        if name == "evaluate" and not ran_fresh and only is None and os.path.isfile(evaluation_path):
            with open(evaluation_path, encoding="utf-8") as f:
                previous = json.load(f)
            # A baseline stage copied in after the evaluation ran is scored (the others come from their caches).
            if not cfg.full_baseline or "full_prompt_tuning" in previous["results"]:
                records[name] = previous
                stages.append(_stage_stats(name, previous, reused=True))
                continue
        if only is not None and name != only and name != "distill":
            record = stage_record(cfg.run_dir, name) if name in folders else None
            if record is None:
                raise StageMissing(f"Stage {name!r} has not run in {cfg.run_dir}; run `peft-post {name}` first.")
            records[name] = {**record, "reused": True}
            stages.append(_stage_stats(name, record, reused=True))
            continue
        fresh: list = []
        with track_stage(name, fresh):
            record = steps[name]()
        records[name] = record
        if record.get("reused"):
            stages.append(_stage_stats(name, record, reused=True))
        else:
            ran_fresh = True
            if name == "evaluate":
                record["wall_time_s"] = fresh[0].wall_time_s
                record["peak_memory_mb"] = fresh[0].peak_memory_mb
                atomic_write_json(evaluation_path, record)
            stages.append(_stage_stats(name, record, reused=False))
    if "evaluate" not in records:
        return None
    evaluation, tune, transfer = records["evaluate"], records["tune"], records["transfer"]
    notes = []
    if cfg.preset == "quick":
        notes.append("Preset 'quick': a first look with tiny budgets; it is not expected to beat zero-shot.")
    if transfer.get("alpha_inputs"):
        notes.append(f"alpha={transfer['alpha']:.3f} from the paper's heuristic on the public held-out split "
                     f"(zero-shot {transfer['alpha_inputs']['public_zero_shot']:.3f}, "
                     f"source {transfer['alpha_inputs']['public_source']:.3f}).")
    results = POSTResults(
        target_model=cfg.target_model, private_dataset=cfg.private_dataset,
        num_test_examples=evaluation["num_test_examples"],
        accuracy={m: r["accuracy"] for m, r in evaluation["results"].items()},
        student_model=cfg.student_model or f"{cfg.target_model} layers {cfg.student_layers}",
        public_dataset=cfg.public_dataset, num_public_examples=cfg.num_public_examples,
        privacy=_ledger(tune.get("privacy")), stages=stages,
        transfer_curve=curve_from_log_history(transfer.get("log_history", [])), transfer_alpha=transfer["alpha"],
        preset=cfg.preset, seed=cfg.seed, command=command or " ".join(shlex.quote(a) for a in sys.argv), notes=notes,
    )
    write_report(results, cfg.run_dir)
    return results


def _stage_stats(name: str, record: dict, reused: bool):
    """A stage's report row from its record, so a fresh and a reused run of it report the same figures."""
    from .report import StageStats

    peak = record.get("peak_memory_mb")
    return StageStats(name=name, wall_time_s=float(record.get("wall_time_s", 0.0)), reused=reused,
                      peak_memory_mb=None if peak is None else float(peak))


def _ledger(privacy: Optional[dict]) -> Optional[dict]:
    if privacy is None:
        return None
    # The whole ledger: the report states adjacency, the add/remove figure and whether the guarantee holds too.
    return dict(privacy)
