"""`run_pipeline`: the stages in order, skipping finished ones, then the report."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import warnings
from typing import Optional

from ..io import atomic_write_json
from .checkpoints import check_checkpoints
from .config import STAGE_INPUTS, STAGE_NAMES, PipelineConfig
from .data import private_examples
from .stages import check_student_tokenizer, distill_stage, evaluate_stage, transfer_stage, tune_stage
from .preflight import preflight
from .processes import held_by_main_process, num_processes, on_main_process, start_processes, wait_for_everyone
from .store import (PRIVATE_DIR, STAGE_FOLDERS, USER_STAGES, SettingsChanged, adapter_fingerprint,
                    check_partial_settings, complete_release, check_settings, discard_stage, labelled_data_digest,
                    migrate_legacy_user_stage, overwrite_hint, private_record_path, private_stage_done,
                    read_record, run_folder_lock, settings_record, stage_done, stage_record, user_stage_workspace,
                    stage_settings, student_folder, verify_outputs)

STAGES = STAGE_NAMES


class StageMissing(ValueError):
    """A stage subcommand needs an earlier stage's output that is not there yet."""


def run_pipeline(cfg: PipelineConfig, only: Optional[str] = None, command: Optional[str] = None):
    """Run the stages in order, skipping finished ones, then write the report; returns the `POSTResults`.

    ``only`` runs a single stage (the `peft-post <stage>` subcommands): the run-folder stages it needs must already
    be done; the student, which lives in the shared cache, is distilled on demand when it is missing. full_tuning
    needs no other stage.

    Before any stage runs, every finished (or interrupted) stage is checked against this run's settings and its
    outputs against their digests (`_check_reuse`); a mismatch is refused with a ValueError naming the differing
    fields or the damaged file, unless ``cfg.overwrite`` names the stage.

    Under ``accelerate launch`` (or torchrun) every process runs this function: the training stages train together,
    and the main process alone checks, writes the run folder and the student cache, evaluates and reports
    (`processes`); every process returns the results.
    """
    if only is not None and only not in STAGES:
        raise ValueError(f"`only` must be one of {STAGES}, got {only!r}.")
    if only == "full_tuning" and not cfg.full_baseline:
        raise ValueError("The full_tuning stage runs only with --full_baseline.")
    # Before any work, and before the run folder exists: the models, task and data (`preflight`), then public or
    # distillation data that is the private data (`check_private_data_separation`, run by `preflight`).
    import torch

    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        start_processes(cpu=cfg.precision().device == "cpu", timeout_s=cfg.ddp_timeout)
        overlap = on_main_process(lambda: preflight(cfg, only)["data_overlap"])
        with held_by_main_process(lambda: run_folder_lock(cfg.run_dir)):
            return _run_stages(cfg, only, command, overlap)
    finally:
        torch.set_num_threads(threads)


def _run_stages(cfg: PipelineConfig, only: Optional[str], command: Optional[str], overlap: dict):
    """`run_pipeline`'s work, with the run folder held by this job."""
    from ..assets import resolve_model
    from ..profiling import track_stage
    from ..report import POSTResults, curve_from_log_history, write_report

    masked = cfg.masked
    target_path = resolve_model(cfg.target_model)
    folders = {name: os.path.join(cfg.run_dir, folder) for name, folder in STAGE_FOLDERS.items()}
    on_main_process(lambda: _migrate_legacy_run(folders))
    stages: list = []
    records: dict = {}
    student = {"path": None if cfg.student_model is None else resolve_model(cfg.student_model)}
    if student["path"] is not None:  # before any stage: the transfer needs the target's vocabulary
        check_student_tokenizer(target_path, student["path"])

    def distill():
        student["path"], record = distill_stage(cfg, target_path, masked)
        return record

    planned = [s for s in STAGES if (s != "distill" or cfg.student_model is None)
               and (s != "full_tuning" or cfg.full_baseline)]
    # Refused before anything is written: a stage made with other settings, a damaged output or checkpoint. A stage
    # subcommand answers only for the stage it runs and those it reads.
    checked = planned if only is None else [s for s in planned if s == only or s in STAGE_INPUTS[only]]
    settings = on_main_process(lambda: _check_reuse(cfg, checked, folders, target_path))
    on_main_process(lambda: _start_run_folder(cfg, target_path, overlap))

    def transfer_settings():
        return stage_settings(cfg, "transfer", source_prompt_sha256=adapter_fingerprint(folders["tune"]))

    steps = {
        "distill": distill,
        "tune": lambda: tune_stage(cfg, student["path"], masked, folders["tune"], "tune", cfg.dp, settings["tune"]),
        "transfer": lambda: transfer_stage(cfg, target_path, student["path"], folders["tune"], masked,
                                           folders["transfer"], transfer_settings()),
        "full_tuning": lambda: tune_stage(cfg, target_path, masked, folders["full_tuning"], "full_tuning", False,
                                          settings["full_tuning"]),
        "evaluate": lambda: evaluate_stage(cfg, target_path, student["path"], folders, masked),
    }
    # A stage subcommand runs its stage and what it needs: the student on demand, the run-folder stages done before.
    needs = {**STAGE_INPUTS, "evaluate": tuple(planned)}
    evaluation_path = os.path.join(cfg.run_dir, "evaluation.json")
    ran_fresh = False
    for name in planned:
        if only is not None and name != only and name not in needs[only]:
            continue
        if name == "evaluate" and not ran_fresh and only is None and os.path.isfile(evaluation_path):
            previous = read_record(evaluation_path)
            # A baseline stage copied in after the evaluation ran is scored (the others come from their caches), and
            # so is a test set changed since (an evaluation written before keys existed is reused as it is).
            # An evaluation without results (damaged) is scored again, and so is one written before per-example
            # results were kept (the report's intervals need them; the scores cache rescores those too).
            if isinstance(previous.get("results"), dict) and \
                    (not cfg.full_baseline or "full_prompt_tuning" in previous["results"]) and \
                    _has_per_example_results(previous["results"]) and \
                    previous.get("settings_key") in (None, settings_record(settings["evaluate"])["settings_key"]):
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
            # The evaluation is the main process's alone (the others wait); the training stages run on every one.
            record = on_main_process(steps[name]) if name == "evaluate" else steps[name]()
        records[name] = record
        if record.get("reused"):
            stages.append(_stage_stats(name, record, reused=True))
        else:
            ran_fresh = True
            if name == "evaluate":
                record["wall_time_s"] = fresh[0].wall_time_s
                record["peak_memory_mb"] = fresh[0].peak_memory_mb
                record.update(settings_record(settings["evaluate"]))
                on_main_process(lambda record=record: atomic_write_json(evaluation_path, record))
            stages.append(_stage_stats(name, record, reused=False))
    if "evaluate" not in records:
        wait_for_everyone()
        return None
    evaluation, tune, transfer = records["evaluate"], records["tune"], records["transfer"]
    notes = []
    if cfg.preset == "quick":
        notes.append("Preset 'quick': a first look with tiny budgets; it is not expected to beat zero-shot.")
    if transfer.get("alpha_note"):
        notes.append(transfer["alpha_note"])
    elif transfer.get("alpha_inputs"):  # a transfer stage recorded before alpha_note existed
        notes.append(f"alpha={transfer['alpha']:.3f} from the paper's heuristic on the public held-out split "
                     f"(zero-shot {transfer['alpha_inputs']['public_zero_shot']:.3f}, "
                     f"source {transfer['alpha_inputs']['public_source']:.3f}).")
    if transfer.get("stopping"):
        stop = transfer["stopping"]
        # Records written before generation existed hold the accuracy as public_accuracy.
        metric = stop.get("public_metric", "accuracy").replace("_", " ")
        score = stop.get("public_score", stop.get("public_accuracy"))
        notes.append(f"Transfer stopping rule (public held-out {metric}, patience {stop['patience']}): stopped at "
                     f"step {stop['stopped_at_step']}, kept the prompt of step {stop['kept_step']} (public held-out "
                     f"{metric} {score:.3f}).")
    results = POSTResults(
        target_model=cfg.target_model, private_dataset=cfg.private_dataset,
        num_test_examples=evaluation["num_test_examples"],
        accuracy={m: r["accuracy"] for m, r in evaluation["results"].items()},
        not_applicable={m: r["not_applicable"] for m, r in evaluation["results"].items() if r.get("not_applicable")},
        per_example_correct={m: r["per_example_correct"] for m, r in evaluation["results"].items()
                             if r.get("per_example_correct") is not None},
        student_model=cfg.student_model or f"{cfg.target_model} layers {cfg.student_layers}",
        public_dataset=cfg.public_dataset, num_public_examples=cfg.num_public_examples,
        privacy=_ledger(tune.get("privacy")), stages=stages,
        task_kind=cfg.task_kind,
        token_f1={m: r["token_f1"] for m, r in evaluation["results"].items() if r.get("token_f1") is not None},
        transfer_curve=curve_from_log_history(transfer.get("log_history", []), f"eval_{cfg.public_metric}"),
        transfer_alpha=transfer["alpha"],
        preset=cfg.preset, seed=cfg.seed, precision=cfg.precision().record(), num_processes=num_processes(),
        command=command or " ".join(shlex.quote(a) for a in sys.argv), notes=notes,
    )
    on_main_process(lambda: write_report(results, cfg.run_dir))
    return results


def _migrate_legacy_run(folders: dict) -> None:
    """Bring a run folder written by an older version to today's layout."""
    for name in USER_STAGES:
        migrate_legacy_user_stage(folders[name], name)
    # Older runs also cached private test scores inside the provider's transferred_prompt/ (rescored on demand now).
    legacy_scores = os.path.join(folders["transfer"], "test_evaluation.json")
    if os.path.isfile(legacy_scores):
        os.remove(legacy_scores)


def _start_run_folder(cfg: PipelineConfig, target_path: str, overlap: dict) -> None:
    """Once the settings are accepted: discard the stages `cfg.overwrite` names, save the config and the overlap."""
    for name in cfg.discarded_stages():
        if name == "tune":
            _keep_discarded_ledger(cfg.run_dir)
        discard_stage(cfg.run_dir, name, student_folder(cfg, target_path) if cfg.student_model is None else None,
                      scores=name in cfg.overwrite_stages())
    # `overwrite` is this command's, not the run's.
    dataclasses.replace(cfg, overwrite=None).save(cfg.run_dir)
    atomic_write_json(os.path.join(cfg.run_dir, PRIVATE_DIR, "data_overlap.json"), overlap)


def _has_per_example_results(results: dict) -> bool:
    """Whether every method of an evaluation that ran holds its per-example results (`score_methods`)."""
    return all(isinstance(r, dict) and (r.get("not_applicable") or r.get("per_example_correct") is not None)
               for r in results.values())


def _keep_discarded_ledger(run_dir: str) -> None:
    """Before a DP prompt of `run_dir` is discarded: keep its ledger in ``private/discarded_ledgers.json`` and warn.

    Tuning again on the same private data composes with every prompt already handed over, and the new ledger counts
    only the new run: the user must add them up (docs/privacy.md).
    """
    record = stage_record(run_dir, "tune")
    if not record or not record.get("privacy"):
        return
    path = os.path.join(run_dir, PRIVATE_DIR, "discarded_ledgers.json")
    kept = read_record(path).get("ledgers", []) if os.path.isfile(path) else []
    atomic_write_json(path, {"ledgers": [*kept, {"adapter_sha256": record.get("adapter_sha256"),
                                                 "privacy": record["privacy"]}]})
    warnings.warn(
        f"Discarding a DP prompt of {run_dir} (ε = {record['privacy']['epsilon']:.3g}). If it was handed over, the "
        "prompt tuned now on the same data composes with it, and its ledger counts only the new run: add them up. "
        f"The discarded ledger is kept in {path}.")


def _check_reuse(cfg: PipelineConfig, planned: list, folders: dict, target_path: str) -> dict:
    """Check every planned stage before any work; returns each stage's settings (`store.stage_settings`).

    A finished stage made with other settings is refused (`SettingsChanged`, naming the fields), and so is one whose
    output files are not the bytes it wrote (`OutputChanged`, naming the file), an interrupted stage whose
    checkpoints were made with other settings, and a damaged checkpoint it would resume from. Stages that
    `cfg.overwrite` discards are not checked. Records written before settings keys and digests existed pass.
    """
    discarded = set(cfg.discarded_stages())
    settings: dict = {}
    if "tune" in planned or "full_tuning" in planned:
        train = private_examples(cfg, "train")
        digest = labelled_data_digest(train, cfg.text_column, cfg.target_column)
        settings["tune"] = stage_settings(cfg, "tune", digest)
        settings["full_tuning"] = stage_settings(cfg, "full_tuning", digest)
    test = private_examples(cfg, "test")
    settings["evaluate"] = stage_settings(cfg, "evaluate", labelled_data_digest(test, cfg.text_column,
                                                                                 cfg.target_column))
    if "distill" in planned and "distill" not in discarded:
        folder = student_folder(cfg, target_path)
        record = stage_done(folder)
        if record is not None:
            verify_outputs(folder, record, "distill", f"Delete the cached student {folder} (or pass "
                           f"{overwrite_hint('distill')}) to distill it again.")
        else:
            _check_checkpoint(os.path.join(folder + ".partial", "checkpoints"), "distill", cfg.distill_max_steps)
    done = {}
    for stage in USER_STAGES:
        if stage in planned and stage not in discarded:
            max_steps = cfg.full_tuning_value("full_tuning_max_steps") if stage == "full_tuning" else \
                cfg.tune_max_steps
            done[stage] = _check_user_stage(folders[stage], stage, settings[stage], max_steps)
    if "transfer" in planned and "transfer" not in discarded:
        folder = folders["transfer"]
        record = stage_done(folder)
        source = done.get("tune") and done["tune"]["adapter_sha256"]
        settings["transfer"] = stage_settings(cfg, "transfer", source_prompt_sha256=source) if source else None
        if record is not None and record.get("settings_key") is not None and settings["transfer"] is None:
            raise SettingsChanged(
                f"The transfer stage in {folder} was made from a source prompt that is no longer in "
                f"{folders['tune']} (the tune stage is not finished there and will make a new one). Give this run "
                f"a new --run_dir, or pass {overwrite_hint('transfer')}.")
        if record is not None:
            if settings["transfer"] is not None:
                check_settings("transfer", record, settings["transfer"], folder)
            verify_outputs(folder, record, "transfer")
        else:
            checkpoints = os.path.join(folder + ".partial", "checkpoints")
            check_partial_settings(checkpoints, "transfer", settings["transfer"])
            _check_checkpoint(checkpoints, "transfer", cfg.transfer_max_steps)
    return settings


def _check_user_stage(folder: str, stage: str, settings: dict, max_steps: int) -> Optional[dict]:
    """`_check_reuse` for a user stage (tune, full_tuning); returns its record when it is finished."""
    complete_release(folder, stage)
    path = private_record_path(folder, stage)
    if os.path.isfile(path):
        record = read_record(path)
        check_settings(stage, record, settings, folder)
        if record.get("outputs"):
            verify_outputs(folder, record, stage)
        finished = private_stage_done(folder, stage)
        if finished is not None:
            return finished
    checkpoints = os.path.join(user_stage_workspace(folder, stage), "checkpoints")
    check_partial_settings(checkpoints, stage, settings)
    _check_checkpoint(checkpoints, stage, max_steps)
    return None


def _check_checkpoint(checkpoints: str, stage: str, max_steps: int) -> None:
    check_checkpoints(checkpoints, max_steps, stage, f"pass {overwrite_hint(stage)} from the start.")


def _stage_stats(name: str, record: dict, reused: bool):
    """A stage's report row from its record, so a fresh and a reused run of it report the same figures."""
    from ..report import StageStats

    peak = record.get("peak_memory_mb")
    return StageStats(name=name, wall_time_s=float(record.get("wall_time_s", 0.0)), reused=reused,
                      peak_memory_mb=None if peak is None else float(peak))


def _ledger(privacy: Optional[dict]) -> Optional[dict]:
    if privacy is None:
        return None
    # The whole ledger: the report states adjacency, the add/remove figure and whether the guarantee holds too.
    return dict(privacy)
