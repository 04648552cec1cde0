"""The whole POST pipeline: distil (provider, cached), tune (user, optionally DP), transfer (provider), evaluate.

Each stage writes one folder under the run directory and finishes by writing ``stage.json`` into it atomically; a
stage whose folder holds ``stage.json`` is skipped on the next run, and an interrupted stage resumes from its last
Trainer checkpoint. The distilled student is the provider's one-time cost: it lives in the shared cache
(``$PEFT_POST_CACHE/students/<key>``), keyed by everything that determines it, and is reused by later runs.

Data flow respects the actors: the tuning stage is the only one that reads the private training split; the
transfer stage reads the source prompt and public data only; the private test split is read once, by the final
evaluation, and nothing is ever selected on it.
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
from .config import PRIVACY_KEYS, POSTConfig
from .io import atomic_write_json

STAGE_FILE = "stage.json"
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
    accountant: str = field(default="prv", metadata={"help": "Opacus accountant: 'prv' or 'rdp'."})
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
        if self.accountant not in ("prv", "rdp"):
            raise ValueError(f"`accountant` must be 'prv' or 'rdp', got {self.accountant!r}.")
        if self.student_model is None:
            self.keep_layers()  # validates the layer list before any work
        self.post_config()  # validates template and label words

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
    """The stage record of a finished stage folder, or None."""
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

    record = stage_done(folder)
    if record is not None:
        return {**record, "reused": True}
    partial = folder + ".partial"
    start = time.perf_counter()
    train = _subset(load_text_dataset(cfg.private_dataset, split=cfg.private_train_split), cfg.max_train_examples,
                    cfg.seed)
    tokenizer = _load_tokenizer(model_path)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(_load_lm(model_path, masked), cfg.post_config(model_path))
    args = _trainer_args(
        PromptTrainingConfig, os.path.join(partial, "checkpoints"), cfg, max_steps=cfg.tune_max_steps,
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
    trainer.save_model(partial)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    record = {"stage": stage, "model": model_path, "steps": trainer.state.global_step, "num_train_examples": len(train),
              "privacy": trainer.privacy_report() if dp else None, "wall_time_s": time.perf_counter() - start,
              "log_history": trainer.state.log_history}
    return _finish_stage(partial, folder, record)


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
    record = {"stage": "transfer", "alpha": alpha, "alpha_inputs": alpha_inputs, "steps": trainer.state.global_step,
              "num_public_examples": len(public_train), "wall_time_s": time.perf_counter() - start,
              "log_history": trainer.state.log_history}
    return _finish_stage(partial, folder, record)


EVALUATION_FILE = "test_evaluation.json"


def _evaluation_key(cfg: PipelineConfig, target_path: str, method: str) -> str:
    """Everything a test-split score depends on besides the prompt folder it is stored in, hashed."""
    return _spec_key({"method": method, "target": _model_id(target_path), "data": cfg.private_dataset,
                      "split": cfg.private_test_split, "n": cfg.max_test_examples, "seed": cfg.seed,
                      "template": cfg.template, "labels": cfg.label_word_lists(),
                      "columns": [cfg.text_column, cfg.label_column]})


def _cached_evaluation(folder: str, key: str, compute) -> dict:
    """``compute()``, stored in `folder` under `key`: a prompt folder copied into another run (an α sweep reusing one
    source prompt) carries its scores with it, and the prompt is not scored twice."""
    path = os.path.join(folder, EVALUATION_FILE)
    cached = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
    if key not in cached:
        cached[key] = compute()
        atomic_write_json(path, cached)
    return cached[key]


def evaluate_stage(cfg: PipelineConfig, target_path: str, student_path: str, folders: dict, masked: bool) -> dict:
    """Accuracy of every method on the private test split: scored once, used for nothing but the report.

    Each score is kept beside what it scores (the prompt's stage folder; the zero-shot score in the run folder), so a
    run that reuses a stage folder reuses its scores too.
    """
    from .assets import load_text_dataset
    from .evaluation import evaluate_prompt
    from .transfer import direct_transfer

    test = _subset(load_text_dataset(cfg.private_dataset, split=cfg.private_test_split), cfg.max_test_examples, cfg.seed)
    tokenizer = _load_tokenizer(target_path)
    task = cfg.post_config()
    kw = dict(text_column=cfg.text_column, label_column=cfg.label_column, batch_size=cfg.eval_batch_size)

    def score(method: str, folder: str, load, desc: str) -> dict:
        return _cached_evaluation(folder, _evaluation_key(cfg, target_path, method),
                                  lambda: evaluate_prompt(load(), tokenizer, test, task, desc=desc, **kw))

    results = {
        "zero_shot": score("zero_shot", cfg.run_dir, lambda: _load_lm(target_path, masked), "zero-shot"),
        "student_prompt": score("student_prompt", folders["tune"],
                                lambda: _load_prompted(student_path, folders["tune"], masked), "student p_s"),
        "direct_transfer": score("direct_transfer", folders["tune"], lambda: direct_transfer(
            _load_prompted(student_path, folders["tune"], masked), _load_lm(target_path, masked)), "direct transfer"),
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
    os.makedirs(cfg.run_dir, exist_ok=True)
    atomic_write_json(os.path.join(cfg.run_dir, "config.json"), dataclasses.asdict(cfg))
    masked = cfg.masked
    target_path = resolve_model(cfg.target_model)
    folders = {"tune": os.path.join(cfg.run_dir, "source_prompt"),
               "transfer": os.path.join(cfg.run_dir, "transferred_prompt"),
               "full_tuning": os.path.join(cfg.run_dir, "full_prompt")}
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
            record = stage_done(folders[name]) if name in folders else None
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
    return {k: privacy[k] for k in PRIVACY_KEYS}
