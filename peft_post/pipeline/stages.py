"""The four stages: distil the student (provider), tune a prompt (user), transfer it (provider), evaluate (user).

Each takes the `PipelineConfig` and the paths it works on, skips itself when its output is already there, and
returns its record. Only `tune_stage` reads the private training split, and only `evaluate_stage` the private test
split. `distill_stage` reads the target and public text; `transfer_stage` reads the released source prompt, the
student, the target and public data.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Optional

import torch

from ..io import drop_training_arguments
from .config import PipelineConfig
from .loading import load_model, load_prompted_model, load_tokenizer, random_subset
from .store import (cached_evaluation, evaluation_key, finish_stage, private_stage_done, private_workspace,
                    public_splits, release_user_stage, stage_done, student_cache_lock, student_folder)


def _last_checkpoint(folder: str) -> Optional[str]:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(folder) if os.path.isdir(folder) else None


def _trainer_args(cls, output_dir: str, cfg: PipelineConfig, **kwargs):
    return cls(
        output_dir=output_dir, seed=cfg.seed, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        logging_steps=10, report_to="none", disable_tqdm=False, use_cpu=not torch.cuda.is_available(),
        per_device_eval_batch_size=cfg.eval_batch_size, **kwargs,
    )


def distill_stage(cfg: PipelineConfig, target_path: str, masked: bool) -> tuple[str, dict]:
    """Distil (or reuse) the student; returns its folder and its stage record. One job distils a given student at a
    time; another that needs it waits, then reuses it."""
    final = student_folder(cfg, target_path)
    record = stage_done(final)
    if record is not None:
        return final, {**record, "reused": True}
    with student_cache_lock(final):
        # Checked again under the lock: a job that waited for another one reuses the student it distilled.
        record = stage_done(final)
        if record is not None:
            return final, {**record, "reused": True}
        return final, _distill_student(cfg, target_path, masked, final)


def _distill_student(cfg: PipelineConfig, target_path: str, masked: bool, final: str) -> dict:
    """Distil the student into `final` (the caller holds its cache lock); returns the stage record."""
    from ..assets import load_text_dataset
    from ..distill import DistillationConfig, DistillationTrainer, make_student, with_task_template
    from ..evaluation import evaluate_prompt

    partial = final + ".partial"
    os.makedirs(partial, exist_ok=True)
    start = time.perf_counter()
    teacher = load_model(target_path, masked)
    tokenizer = load_tokenizer(target_path)
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
    _, public_eval = public_splits(cfg)
    student_zs = evaluate_prompt(student.eval(), tokenizer, public_eval, cfg.post_config(target_path),
                                 text_column=cfg.text_column, label_column=cfg.label_column,
                                 batch_size=cfg.eval_batch_size, desc="student: public zero-shot")
    record = {"stage": "distill", "teacher": target_path, "keep_layers": cfg.keep_layers(),
              "steps": trainer.state.global_step, "wall_time_s": wall_time,
              "public_zero_shot": {"dataset": cfg.public_dataset, "split": cfg.public_split,
                                   "accuracy": student_zs["accuracy"], "num_examples": student_zs["num_examples"],
                                   "per_class": student_zs["per_class"]},
              "log_history": trainer.state.log_history}
    return finish_stage(partial, final, record)


def tune_stage(cfg: PipelineConfig, model_path: str, masked: bool, folder: str, stage: str, dp: bool) -> dict:
    """Tune a prompt on `model_path` with the private training split (the user's stage). Returns the record."""
    from peft import get_peft_model

    from ..assets import load_text_dataset
    from ..tuning import DPConfig, DPPromptTrainer, PromptTrainer, PromptTrainingConfig

    record = private_stage_done(folder, stage)
    # Checkpoints (optimizer and RNG state, computed from private data) and the trainer's full output stay in the
    # private workspace; only `release_user_stage`'s allow-list reaches `folder`.
    workspace = os.path.join(private_workspace(folder), stage + ".partial")
    if record is not None:
        shutil.rmtree(workspace, ignore_errors=True)  # left by a crash after the record was written
        return {**record, "reused": True}
    start = time.perf_counter()
    train = random_subset(load_text_dataset(cfg.private_dataset, split=cfg.private_train_split), cfg.max_train_examples,
                          cfg.seed)
    tokenizer = load_tokenizer(model_path)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(load_model(model_path, masked), cfg.post_config(model_path))
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
    return release_user_stage(saved, folder, stage, record, workspace)


def transfer_stage(cfg: PipelineConfig, target_path: str, student_path: str, source_prompt: str, masked: bool,
                   folder: str) -> dict:
    """Transfer p_s to the target with public data only (the provider's stage). Returns the record."""
    from peft import get_peft_model

    from ..evaluation import evaluate_prompt
    from ..transfer import TransferConfig, TransferTrainer, suggest_alpha

    record = stage_done(folder)
    if record is not None:
        return {**record, "reused": True}
    partial = folder + ".partial"
    start = time.perf_counter()
    public_train, public_eval = public_splits(cfg)
    tokenizer = load_tokenizer(target_path)
    source = load_prompted_model(student_path, source_prompt, masked)
    task = source.active_peft_config
    target_base = load_model(target_path, masked)
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
    drop_training_arguments(partial)
    record = {"stage": "transfer", "alpha": alpha, "alpha_inputs": alpha_inputs, "steps": trainer.state.global_step,
              "num_public_examples": len(public_train), "wall_time_s": time.perf_counter() - start,
              "log_history": trainer.state.log_history}
    return finish_stage(partial, folder, record)


def evaluate_stage(cfg: PipelineConfig, target_path: str, student_path: str, folders: dict, masked: bool) -> dict:
    """Accuracy of every method on the private test split: scored once, used for nothing but the report.

    Each score is cached in the run's private workspace under the fingerprint of the prompt it scores, so a run that
    reuses a stage reuses its scores too (`cached_evaluation`).
    """
    from ..assets import load_text_dataset
    from ..evaluation import evaluate_prompt
    from ..transfer import direct_transfer

    test = random_subset(load_text_dataset(cfg.private_dataset, split=cfg.private_test_split), cfg.max_test_examples,
                         cfg.seed)
    tokenizer = load_tokenizer(target_path)
    task = cfg.post_config()
    kw = dict(text_column=cfg.text_column, label_column=cfg.label_column, batch_size=cfg.eval_batch_size)

    def score(method: str, prompt: Optional[str], load, desc: str, student: Optional[str] = None) -> dict:
        return cached_evaluation(cfg.run_dir, prompt, evaluation_key(cfg, target_path, method, student),
                                 lambda: evaluate_prompt(load(), tokenizer, test, task, desc=desc, **kw))

    results = {
        "zero_shot": score("zero_shot", None, lambda: load_model(target_path, masked), "zero-shot"),
        "student_prompt": score("student_prompt", folders["tune"],
                                lambda: load_prompted_model(student_path, folders["tune"], masked), "student p_s",
                                student_path),
        "direct_transfer": score("direct_transfer", folders["tune"], lambda: direct_transfer(
            load_prompted_model(student_path, folders["tune"], masked), load_model(target_path, masked)),
            "direct transfer", student_path),
        "post": score("post", folders["transfer"],
                      lambda: load_prompted_model(target_path, folders["transfer"], masked), "POST"),
    }
    if cfg.full_baseline:
        results["full_prompt_tuning"] = score(
            "full_prompt_tuning", folders["full_tuning"],
            lambda: load_prompted_model(target_path, folders["full_tuning"], masked), "full PT")
    return {"num_test_examples": len(test), "results": results}
