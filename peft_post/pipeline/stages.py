"""The pipeline's stages, in two layers.

The stage functions work on objects: models, tokenizers and datasets in, the result and its record out. They read
only what they are given and write only checkpoints into the folder they are given, so the audits and the benchmarks
train exactly as the pipeline does, with in-memory data:

- `distill_student`: the student from the teacher and public text (provider);
- `tune_prompt`: a prompt on a prompted model and the private training data (user), optionally DP;
- `transfer_prompt`: p_s onto the target with public data only (provider);
- `score_methods`: each method's accuracy on the private test data (user).

The `*_stage` functions above them load by name and path, skip a stage whose output is already there, and publish
the output (`store`). Only `tune_stage` reads the private training split, and only `evaluate_stage` the private test
split. `distill_stage` reads the target and public text; `transfer_stage` reads the released source prompt, the
student, the target and public data.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from typing import Any, Callable, Mapping, Optional, Union

import torch

from ..io import drop_training_arguments
from .checkpoints import resume_checkpoint
from .config import PipelineConfig
from .data import private_examples
from .loading import load_model, load_prompted_model, load_tokenizer, model_sizes, new_prompted_model
from .processes import held_by_main_process, on_main_process
from .store import (cached_evaluation, check_partial_settings, evaluation_key, finish_stage, labelled_data_digest,
                    private_stage_done, public_splits, release_user_stage, settings_record, user_stage_workspace,
                    stage_done, stage_settings, student_cache_lock, student_folder, verify_outputs)

# Progress-bar labels of `score_methods`, per method.
METHOD_DESCRIPTIONS = {"zero_shot": "zero-shot", "student_prompt": "student p_s", "direct_transfer": "direct transfer",
                       "post": "POST", "full_prompt_tuning": "full PT"}


def distill_stage(cfg: PipelineConfig, target_path: str, masked: bool) -> tuple[str, dict]:
    """Distil (or reuse) the student; returns its folder and its stage record. One job distils a given student at a
    time; another that needs it waits, then reuses it. Under several processes they distil it together; the main
    process holds the lock and writes."""
    final = student_folder(cfg, target_path)
    record = on_main_process(lambda: _finished_student(final))
    if record is not None:
        return final, {**record, "reused": True}
    with held_by_main_process(lambda: student_cache_lock(final)):
        # Checked again under the lock: a job that waited for another one reuses the student it distilled.
        record = on_main_process(lambda: _finished_student(final))
        if record is not None:
            return final, {**record, "reused": True}
        return final, _distill_student(cfg, target_path, masked, final)


def _finished_student(final: str) -> Optional[dict]:
    """The record of the student in `final` once its outputs are checked, or None when it is not finished."""
    record = stage_done(final)
    if record is not None:
        verify_outputs(final, record, "distill")
    return record


def _distill_student(cfg: PipelineConfig, target_path: str, masked: bool, final: str) -> dict:
    """Distil the student into `final` (the caller holds its cache lock); returns the stage record."""
    from ..assets import load_text_dataset

    partial = final + ".partial"
    os.makedirs(partial, exist_ok=True)
    tokenizer = load_tokenizer(target_path)
    _, public_eval = public_splits(cfg)
    trainer, record = distill_student(cfg, load_model(target_path, masked, cfg.precision()), tokenizer,
                                      load_text_dataset(cfg.distill_dataset, split=cfg.distill_split),
                                      os.path.join(partial, "checkpoints"), public_eval=public_eval)
    record = {"stage": "distill", "teacher": target_path, **record, **settings_record(stage_settings(cfg, "distill"))}
    # On every process, as Trainer expects: under FSDP2 saving gathers the student's shards (a collective); the main
    # process writes the weights, the config and the tokenizer.
    trainer.save_model(partial)

    def publish() -> dict:
        tokenizer.save_pretrained(partial)
        drop_training_arguments(partial)  # the run's seed; the student goes to anyone
        shutil.rmtree(os.path.join(partial, "checkpoints"), ignore_errors=True)
        return finish_stage(partial, final, record)

    return on_main_process(publish)


def distill_student(cfg: PipelineConfig, teacher, tokenizer, text, output_dir: str, public_eval=None):
    """Distil a student of `teacher` (the layers `cfg.student_layers`) on the public `text` dataset; returns the
    trainer (its `model` is the student, in eval mode; its `save_model` writes it, on every process) and the record.

    Checkpoints go to `output_dir`, and a run that finds one there resumes from it. With `public_eval` (public
    labelled data), the record holds the student's zero-shot accuracy on it: the provider's check before handing the
    student out, since a student that cannot do the task zero-shot gives prompts that mostly correct its own bias,
    which transfers badly.
    """
    from ..distill import DistillationTrainer, make_student, with_task_template
    from ..evaluation import evaluate_prompt

    start = time.perf_counter()
    masked = cfg.masked
    # The teacher is frozen in the compute dtype; DistillationTrainer gives the student fp32 master weights.
    student = make_student(teacher, cfg.keep_layers())
    if not masked and cfg.distill_templated_fraction > 0:
        text = with_task_template(text, cfg.template, cfg.distill_templated_fraction, cfg.seed, cfg.text_column)
    args = cfg.distill_args(output_dir)
    trainer = DistillationTrainer(student, teacher, args, train_dataset=text, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume_checkpoint(output_dir, trainer.args.max_steps))
    wall_time = time.perf_counter() - start
    # The layers as the student kept them: a list counted from the top is recorded resolved.
    record = {"keep_layers": student.config.post_distillation["keep_layers"], "steps": trainer.state.global_step,
              "wall_time_s": wall_time,
              "precision": cfg.precision().record()}
    student.eval()
    if public_eval is not None and cfg.task_kind == "generation":
        from ..generation import evaluate_generation

        student_zs = evaluate_generation(student, tokenizer, public_eval, cfg.post_config(),
                                         text_column=cfg.text_column, answer_column=cfg.answer_column,
                                         batch_size=cfg.eval_batch_size, desc="student: public zero-shot")
        record["public_zero_shot"] = {"dataset": cfg.public_dataset, "split": cfg.public_split,
                                      "exact_match": student_zs["exact_match"], "token_f1": student_zs["token_f1"],
                                      "num_examples": student_zs["num_examples"]}
    elif public_eval is not None:
        # On every process: under FSDP2 the label-slot forward of the sharded student is the whole student's
        # (tests/test_multiprocess.py), and its gathers are collectives every process must join.
        student_zs = evaluate_prompt(student, tokenizer, public_eval, cfg.post_config(), text_column=cfg.text_column,
                                     label_column=cfg.label_column, batch_size=cfg.eval_batch_size,
                                     desc="student: public zero-shot")
        record["public_zero_shot"] = {"dataset": cfg.public_dataset, "split": cfg.public_split,
                                      "accuracy": student_zs["accuracy"], "num_examples": student_zs["num_examples"],
                                      "per_class": student_zs["per_class"]}
    record["log_history"] = trainer.state.log_history
    return trainer, record


def tune_stage(cfg: PipelineConfig, model_path: str, masked: bool, folder: str, stage: str, dp: bool,
               settings: Optional[dict] = None) -> dict:
    """Tune a prompt on `model_path` with the private training split (the user's stage). Returns the record, which
    holds `settings` (`store.stage_settings`) when given; checkpoints made with other settings are refused."""
    # Checkpoints (optimizer and RNG state, computed from private data) and the trainer's full output stay in the
    # private workspace; only `release_user_stage`'s allow-list reaches `folder`.
    workspace = user_stage_workspace(folder, stage)

    def finished() -> Optional[dict]:
        record = private_stage_done(folder, stage)
        if record is not None:
            shutil.rmtree(workspace, ignore_errors=True)  # left by a crash after the record was written
        else:
            check_partial_settings(os.path.join(workspace, "checkpoints"), stage, settings, claim=True)
        return record

    record = on_main_process(finished)
    if record is not None:
        return {**record, "reused": True}
    start = time.perf_counter()
    train = private_examples(cfg, "train")
    tokenizer = load_tokenizer(model_path)
    # The full-tuning baseline tunes on the target, which may be spread over devices or quantized.
    role = "target" if stage == "full_tuning" else "frozen"
    model = new_prompted_model(model_path, cfg.post_config(model_path), masked, cfg.seed, cfg.precision(), role)
    checkpoints = os.path.join(workspace, "checkpoints")
    args = cfg.full_tuning_args(checkpoints) if stage == "full_tuning" else cfg.tune_args(checkpoints)
    trainer, record = tune_prompt(cfg, model, tokenizer, train, checkpoints, dp, args)
    saved = os.path.join(workspace, "saved")
    on_main_process(lambda: shutil.rmtree(saved, ignore_errors=True))
    trainer.save_model(saved)  # on every process, as Trainer expects; the main one writes
    # Everything in the record is computed from private data without noise (losses, N) or describes the user's run:
    # it is the user's record, never released.
    record = {"stage": stage, "model": model_path, **record, "wall_time_s": time.perf_counter() - start,
              **settings_record(settings)}
    return on_main_process(lambda: release_user_stage(saved, folder, stage, record, workspace))


def tune_prompt(cfg: PipelineConfig, model, tokenizer, train_dataset, output_dir: str, dp: bool, args=None):
    """Tune the prompt of `model` (a `PeftModel` with a POST adapter) on `train_dataset`, with DP-SGD when `dp`;
    returns the trainer (its `model` is tuned; its `save_model` writes the adapter with its DP ledger) and the record.
    `args` is the `PromptTrainingConfig` (with `output_dir` as its output_dir); None: ``cfg.tune_args(output_dir)``.

    Checkpoints go to `output_dir` (private: they are computed from the training data), and a run that finds one
    there resumes from it, under DP with the same noise stream.
    """
    from ..tuning import DPPromptTrainer, PromptTrainer
    from ..tuning.privacy import LARGE_DELTA_WARNING

    args = cfg.tune_args(output_dir) if args is None else args
    common = dict(train_dataset=train_dataset, processing_class=tokenizer)
    if dp:
        with warnings.catch_warnings():
            if cfg.dp_target_delta is None:
                # The default δ = 1/N (the paper's), which the ledger records as asked for by no one and the report
                # states; a δ >= 1/N the user passed still warns.
                warnings.filterwarnings("ignore", message=LARGE_DELTA_WARNING, category=UserWarning)
            trainer = DPPromptTrainer(model, args, dp_config=cfg.dp_config(), **common)
    else:
        trainer = PromptTrainer(model, args, **common)
    trainer.train(resume_from_checkpoint=resume_checkpoint(output_dir, trainer.args.max_steps))
    record = {"steps": trainer.state.global_step, "num_train_examples": len(train_dataset),
              "privacy": trainer.privacy_report() if dp else None, "precision": cfg.precision().record(),
              "log_history": trainer.state.log_history}
    return trainer, record


def transfer_stage(cfg: PipelineConfig, target_path: str, student_path: str, source_prompt: str, masked: bool,
                   folder: str, settings: Optional[dict] = None) -> dict:
    """Transfer p_s to the target with public data only (the provider's stage). Returns the record."""
    partial = folder + ".partial"

    def finished() -> Optional[dict]:
        record = stage_done(folder)
        if record is None:
            check_partial_settings(os.path.join(partial, "checkpoints"), "transfer", settings, claim=True)
        return record

    record = on_main_process(finished)
    if record is not None:
        return {**record, "reused": True}
    start = time.perf_counter()
    public_train, public_eval = public_splits(cfg)
    tokenizer = check_student_tokenizer(target_path, student_path)
    source = load_prompted_model(student_path, source_prompt, masked, cfg.precision())
    target = new_prompted_model(target_path, cfg.post_config(target_path), masked, cfg.seed, cfg.precision(), "target")
    trainer, record = transfer_prompt(cfg, target, source, tokenizer, public_train, public_eval,
                                      os.path.join(partial, "checkpoints"))
    trainer.save_model(partial)  # on every process, as Trainer expects; the main one writes
    record = {"stage": "transfer", **record, "wall_time_s": time.perf_counter() - start, **settings_record(settings)}

    def publish() -> dict:
        shutil.rmtree(os.path.join(partial, "checkpoints"), ignore_errors=True)
        # Trainer pickles its arguments beside the adapter; they hold the run's seed, which the user's stages share,
        # and the provider publishes this folder.
        drop_training_arguments(partial)
        return finish_stage(partial, folder, record)

    return on_main_process(publish)


def check_student_tokenizer(target_path: str, student_path: str):
    """The target's tokenizer, once the student's is found to be the same vocabulary (`tokenizer_mismatch`); a
    `ValueError` naming `--student_model` otherwise. Cheap (no model is loaded), so a run checks it before any stage:
    a ready student on another tokenizer would otherwise fail only at the transfer, after the DP tuning."""
    from ..transfer import tokenizer_mismatch

    tokenizer = load_tokenizer(target_path)
    mismatch = tokenizer_mismatch(tokenizer, load_tokenizer(student_path))
    if mismatch is not None:
        raise ValueError(
            f"--student_model {student_path!r} does not use the target's tokenizer: the student's and the target's "
            f"{mismatch}. POST compares the two models' output distributions token by token (and scores the student "
            "on the target's token ids), so both must share one vocabulary. Pass a student built on the target's "
            "tokenizer, or leave --student_model unset to distil one from the target."
        )
    return tokenizer


def transfer_prompt(cfg: PipelineConfig, target, source, tokenizer, public_train, public_eval, output_dir: str,
                    alpha: Optional[float] = None):
    """Transfer the prompt of `source` (the student's `PeftModel`) into `target` (the target's `PeftModel`) on the
    public data; returns the trainer (its `save_model` writes p_t with its provenance) and the record.

    α is `alpha`, else `cfg.transfer_alpha`, used as given. Otherwise `cfg.transfer_alpha_method` chooses it on
    public data (the provider holds no private data):

    - "heuristic": the paper's (`suggest_alpha`), on the accuracies of the unprompted target and of the source on
      `public_eval`, scored with the private task's template and label words. Those numbers mean something only when
      the public labels are the private task's classes, so the heuristic is refused, with a warning, when
      `label_space_mismatch` says they are not (labels out of range or of another type, or both accuracies far below
      chance); α is then `FALLBACK_ALPHA` (0.5), and the transfer runs without the public accuracy curve.
    - "agreement": `transfer_by_agreement`, which reads the public held-out texts and no labels.

    The record says how: `alpha_method` ("given", "heuristic", "fallback" or "agreement"), `alpha_inputs` (the heuristic's two
    accuracies, only when they chose α), `alpha_check` (the label-space check, when the heuristic was asked for),
    `alpha_agreement` (each α's agreement, when measured) and `alpha_note` (the sentence for the report).
    Checkpoints go to `output_dir`, and a run that finds one there resumes from it.
    """
    from transformers.trainer_utils import IntervalStrategy

    from ..transfer import TransferTrainer, require_shared_vocabulary

    require_shared_vocabulary(target, source, tokenizer)  # before the α step feeds the source the target's ids
    given = cfg.transfer_alpha if alpha is None else alpha
    choice = {"alpha_method": "given", "alpha_inputs": None, "alpha_check": None, "alpha_agreement": None,
              "alpha_note": None if given is None else f"alpha={given:g} given (transfer_alpha)."}
    problem = None
    if given is None and cfg.transfer_alpha_method == "heuristic":
        # Chosen by the main process alone and handed to the others: every process must train with the same α.
        given, found, problem = on_main_process(
            lambda: _alpha_by_heuristic(cfg, target, source, tokenizer, public_eval))
        choice.update(found)
    if given is None:  # "agreement", asked for
        trainer, agreement = transfer_by_agreement(cfg, target, source, tokenizer, public_train, public_eval,
                                                   output_dir)
        given = agreement.pop("alpha")
        choice.update(alpha_method="agreement", alpha_note=agreement.pop("note"), alpha_agreement=agreement)
    else:
        args = cfg.transfer_args(output_dir, alpha=given)
        callbacks = cfg.transfer_callbacks()
        if problem is not None:  # labels of another task score nothing: no public accuracy curve
            args.eval_strategy = IntervalStrategy.NO
            if callbacks:
                warnings.warn("The transfer's stopping rule needs public held-out labels of the private task's "
                              f"classes ({problem}): the transfer runs transfer_max_steps and keeps its last prompt.")
                args.load_best_model_at_end, args.metric_for_best_model, callbacks = False, None, []
        trainer = TransferTrainer(target, source, args, public_dataset=public_train,
                                  public_eval_dataset=None if problem is not None else public_eval,
                                  processing_class=tokenizer, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume_checkpoint(output_dir, trainer.args.max_steps))
    record = {"alpha": given, **choice, "steps": trainer.state.global_step,
              "num_public_examples": len(public_train), "precision": cfg.precision().record(),
              "log_history": trainer.state.log_history}
    if trainer.args.load_best_model_at_end and trainer.state.best_global_step:
        # The stopping rule's choice, made on the public held-out split: the prompt kept is the best step's.
        record["stopping"] = {"kept_step": int(trainer.state.best_global_step),
                              "public_metric": cfg.public_metric, "public_score": float(trainer.state.best_metric),
                              "stopped_at_step": int(trainer.state.global_step),
                              "patience": cfg.transfer_early_stopping_patience}
    plan = getattr(trainer, "cache_plan", None)
    if plan is not None:  # its size, dtype and whether it went to disk (not its path: a machine path)
        message = plan["message"] if plan["path"] is None else \
            plan["message"].replace(plan["path"], os.path.basename(plan["path"]))
        record["transfer_cache"] = {"projected_bytes": plan["projected_bytes"], "dtype": plan["dtype"],
                                    "memory_mapped": plan["path"] is not None, "message": message}
    return trainer, record


# α when the heuristic is refused (see `transfer_prompt`).
FALLBACK_ALPHA = 0.5


def _alpha_by_heuristic(cfg: PipelineConfig, target, source, tokenizer, public_eval) -> tuple:
    """`transfer_prompt`'s heuristic α: (α, the record's alpha_* fields, the label-space problem or None)."""
    from ..evaluation import evaluate_prompt
    from ..transfer import suggest_alpha
    from ..transfer.alpha import heuristic_note, label_space_mismatch

    task = source.active_peft_config
    if cfg.task_kind == "generation":
        return _alpha_by_heuristic_on_answers(cfg, target, source, tokenizer, public_eval)
    labels = public_eval[cfg.label_column] if cfg.label_column in public_eval.column_names else None
    problem = (f"the public held-out split has no label column {cfg.label_column!r}" if labels is None
               else label_space_mismatch(task.num_classes, labels=labels))
    check = {"num_classes": task.num_classes, "num_examples": len(public_eval)}
    if problem is None:
        kw = dict(text_column=cfg.text_column, label_column=cfg.label_column, batch_size=cfg.eval_batch_size)
        zs = evaluate_prompt(target, tokenizer, public_eval, task, use_prompt=False, desc="alpha: zero-shot", **kw)
        src = evaluate_prompt(source, tokenizer, public_eval, task, desc="alpha: source", **kw)
        check.update(public_zero_shot=zs["accuracy"], public_source=src["accuracy"])
        problem = label_space_mismatch(task.num_classes, zero_shot_acc=zs["accuracy"], source_acc=src["accuracy"],
                                       num_examples=zs["num_examples"])
    found = {"alpha_check": {**check, "label_space_mismatch": problem}}
    if problem is None:
        alpha = suggest_alpha(zs["accuracy"], src["accuracy"], task.num_classes)
        found.update(alpha_method="heuristic", alpha_note=heuristic_note(alpha, zs["accuracy"], src["accuracy"]),
                     alpha_inputs={"public_zero_shot": zs["accuracy"], "public_source": src["accuracy"]})
        return alpha, found, None
    # Not agreement: measured on the quick preset it picked α = 0 and POST fell from 79.0% (heuristic, α = 1) to
    # 55.0% (benchmarks/results/alpha_choice.json). α = 0.5 weighs both terms equally and was the better of the two
    # on the held-out topic task whose mismatch this rule catches (gap closed 0.81 vs 0.42).
    found.update(alpha_method="fallback", alpha_note=f"alpha={FALLBACK_ALPHA:g}: the paper's heuristic was refused "
                 f"({problem}), so both loss terms are weighted equally.")
    warnings.warn(f"The alpha heuristic is refused: {problem}. Alpha = {FALLBACK_ALPHA:g} (both terms weighted "
                  "equally) is used instead. Set `transfer_alpha` to choose it yourself, or give a public set of the "
                  "private task's family.")
    return FALLBACK_ALPHA, found, problem


def _alpha_by_heuristic_on_answers(cfg: PipelineConfig, target, source, tokenizer, public_eval) -> tuple:
    """The heuristic α of a generation task: `suggest_alpha` on the exact match of the unprompted target's and the
    prompted source's greedy answers to the public held-out split (chance level 0)."""
    from ..generation import evaluate_generation
    from ..transfer import suggest_alpha
    from ..transfer.alpha import heuristic_note

    task = source.active_peft_config
    kw = dict(text_column=cfg.text_column, answer_column=cfg.answer_column, batch_size=cfg.eval_batch_size)
    zs = evaluate_generation(target, tokenizer, public_eval, task, use_prompt=False, desc="alpha: zero-shot", **kw)
    src = evaluate_generation(source, tokenizer, public_eval, task, desc="alpha: source", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a source at 0 exact match: α = 1, said in the note
        alpha = suggest_alpha(zs["exact_match"], src["exact_match"], None)
    check = {"metric": "exact_match", "num_examples": len(public_eval), "public_zero_shot": zs["exact_match"],
             "public_source": src["exact_match"], "label_space_mismatch": None}
    note = heuristic_note(alpha, zs["exact_match"], src["exact_match"]).replace(
        "public held-out split", "public held-out split's exact match")
    return alpha, {"alpha_check": check, "alpha_method": "heuristic", "alpha_note": note,
                   "alpha_inputs": {"public_zero_shot": zs["exact_match"], "public_source": src["exact_match"]}}, None


def transfer_by_agreement(cfg: PipelineConfig, target, source, tokenizer, public_train, public_eval, output_dir: str):
    """Choose α without public labels: one transfer per α of `transfer.alpha.ALPHA_GRID`, each the full
    `transfer_max_steps` from the same start, seed and data order, scored by the share of the public held-out texts
    on which the transferred prompt's prediction (argmax over the private task's label words) agrees with the
    prompted source's. The prompt of highest agreement is kept in `target` (ties: `pick_alpha_by_agreement`).

    Returns the kept α's trainer (its `save_model` writes that prompt with its provenance) and
    ``{"alpha", "agreement": {α: share}, "num_examples", "total_steps", "note"}``. Full transfers, not short proxies:
    the prompt that is scored is the one that is kept, at the price of ``len(ALPHA_GRID)`` transfers' steps. The cache
    of frozen logits (a_s, b_s, b_t) does not depend on α, so it is built once and shared; the scoring adds one
    forward of the source and one per prompt over the held-out texts. Each α checkpoints into its own ``output_dir/alpha_<α>`` and resumes from there.
    """
    from ..prompts import get_prompt, set_prompt
    from ..transfer import TransferTrainer
    from ..transfer.alpha import ALPHA_GRID, agreement, agreement_note, pick_alpha_by_agreement

    task = source.active_peft_config
    texts = list(public_eval[cfg.text_column])
    start = get_prompt(target)
    trainers, prompts, agreements = {}, {}, {}
    source_predictions = cache = plan = None
    for value in ALPHA_GRID:
        # Every α starts from the same prompt: TransferTrainer re-initialises p_t from text, but keeps the adapter's
        # own prompt when init_from_source_text is off, which would otherwise be the previous α's result.
        set_prompt(target, start)
        folder = os.path.join(output_dir, f"alpha_{value:g}")
        trainer = TransferTrainer(target, source, cfg.transfer_args(folder, alpha=value), public_dataset=public_train,
                                  public_eval_dataset=public_eval, processing_class=tokenizer,
                                  callbacks=cfg.transfer_callbacks())
        trainer.cache = cache  # a_s, b_s, b_t do not depend on α: built by the first transfer, read by the others
        trainer.train(resume_from_checkpoint=resume_checkpoint(folder, trainer.args.max_steps))
        cache = trainer.cache
        plan = getattr(trainer, "cache_plan", plan)  # set by the transfer that built the cache
        if source_predictions is None:
            source_predictions = on_main_process(lambda trainer=trainer: _predictions(trainer, source, tokenizer,
                                                                                      texts, task, cfg))
        # Scored by the main process alone, which then picks α for every process (all keep the same prompt).
        agreements[value] = on_main_process(lambda trainer=trainer: agreement(
            _predictions(trainer, target, tokenizer, texts, task, cfg), source_predictions))
        prompts[value], trainers[value] = get_prompt(target), trainer
    alpha = pick_alpha_by_agreement(agreements)
    set_prompt(target, prompts[alpha])
    if plan is not None:  # so the stage record states the shared cache whichever α is kept
        trainers[alpha].cache_plan = plan
    return trainers[alpha], {
        "alpha": alpha, "agreement": {f"{a:g}": agreements[a] for a in ALPHA_GRID}, "num_examples": len(texts),
        "total_steps": sum(t.state.global_step for t in trainers.values()),
        "note": agreement_note(alpha, agreements, len(texts))}


def _predictions(trainer, model, tokenizer, texts: list, task, cfg: PipelineConfig):
    """`transfer.alpha.predict_classes` under the transfer's precision, as its own evaluation runs."""
    from ..transfer.alpha import predict_classes

    with trainer.accelerator.autocast():
        return predict_classes(model, tokenizer, texts, task, cfg.eval_batch_size)


def evaluate_stage(cfg: PipelineConfig, target_path: str, student_path: str, folders: dict, masked: bool) -> dict:
    """Accuracy of every method on the private test split: scored once, used for nothing but the report.

    Each score is cached in the run's private workspace under the fingerprint of the prompt it scores (`cached_evaluation`),
    so a run that reuses a stage reuses its scores too. A score holds which test examples the method got right
    (`score_methods`), for the report's paired intervals; like the accuracies, it goes only into the run folder's
    `evaluation.json` and report, which are the user's, never into a stage folder the provider receives.
    """
    from ..transfer import direct_transfer, direct_transfer_obstacle

    test = private_examples(cfg, "test")
    test_sha256 = labelled_data_digest(test, cfg.text_column, cfg.target_column)  # data rebuilt in place is rescored
    tokenizer = load_tokenizer(target_path)
    precision = cfg.precision()
    # method -> (the prompt folder it scores, whether it runs the student, its model's loader)
    methods = {
        "zero_shot": (None, False, lambda: load_model(target_path, masked, precision, "target")),
        "student_prompt": (folders["tune"], True,
                           lambda: load_prompted_model(student_path, folders["tune"], masked, precision)),
        "direct_transfer": (folders["tune"], True, lambda: direct_transfer(
            load_prompted_model(student_path, folders["tune"], masked, precision),
            load_model(target_path, masked, precision, "target"))),
        "post": (folders["transfer"], False,
                 lambda: load_prompted_model(target_path, folders["transfer"], masked, precision, "target")),
    }
    if cfg.full_baseline:
        methods["full_prompt_tuning"] = (folders["full_tuning"], False, lambda: load_prompted_model(
            target_path, folders["full_tuning"], masked, precision, "target"))
    # Direct transfer pastes p_s into the target, so it needs the student's width; POST, which maps through the
    # output distributions, does not. Read from the configs: no model is loaded to find it out.
    (d_s, v_s), (d_t, v_t) = model_sizes(student_path), model_sizes(target_path)
    not_applicable = {"direct_transfer": direct_transfer_obstacle(d_s, d_t, v_s, v_t)}
    results = {}
    for method, (prompt, runs_student, load) in methods.items():
        if not_applicable.get(method):
            results[method] = {"accuracy": None, "not_applicable": not_applicable[method]}
            continue
        key = evaluation_key(cfg, target_path, method, student_path if runs_student else None, test_sha256)
        results[method] = cached_evaluation(
            cfg.run_dir, prompt, key, lambda method=method, load=load: score_methods(cfg, tokenizer, test,
                                                                                   {method: load})[method])
    return {"num_test_examples": len(test), "results": results, "precision": precision.record()}


def _score_answers(cfg: PipelineConfig, model, tokenizer, test_dataset, task, method: str) -> dict:
    """A generation method's scores in `score_methods`' shape: ``accuracy`` is the exact-match rate (the share of
    test examples answered exactly, whose bits are ``per_example_correct``), with ``token_f1`` beside it."""
    from ..generation import evaluate_generation

    report = evaluate_generation(model, tokenizer, test_dataset, task, text_column=cfg.text_column,
                                 answer_column=cfg.answer_column, batch_size=cfg.eval_batch_size,
                                 desc=METHOD_DESCRIPTIONS.get(method, method))
    return {"metric": "exact_match", "accuracy": report["exact_match"], "token_f1": report["token_f1"],
            "num_examples": report["num_examples"], "per_example_correct": report["per_example_correct"]}


def score_methods(cfg: PipelineConfig, tokenizer, test_dataset,
                  models: Mapping[str, Union[torch.nn.Module, Callable[[], Any]]]) -> dict:
    """Accuracy, per-class counts and per-example correctness (``per_example_correct``, `correctness_bits`, in
    `test_dataset`'s order) of each method's model on `test_dataset`, under `cfg`'s task: {method: scores}. Every
    method is scored on the same examples in the same order, so the report can compare them pair by pair.

    `models` maps a method name to its model, or to a function that loads it; loaders are called one at a time, so
    only one model is in memory at once. Plain models are scored zero-shot, `PeftModel`s with their prompt.
    """
    from ..evaluation import evaluate_prompt

    task = cfg.post_config()
    scores = {}
    for method, model in models.items():
        if not isinstance(model, torch.nn.Module):
            model = model()
        if cfg.task_kind == "generation":
            scores[method] = _score_answers(cfg, model, tokenizer, test_dataset, task, method)
            del model
            continue
        scores[method] = evaluate_prompt(model, tokenizer, test_dataset, task, text_column=cfg.text_column,
                                         label_column=cfg.label_column, batch_size=cfg.eval_batch_size,
                                         desc=METHOD_DESCRIPTIONS.get(method, method), per_example=True)
        del model
    return scores
