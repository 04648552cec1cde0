"""`run_pipeline`: the stages in order, skipping finished ones, then the report."""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Optional

from ..io import atomic_write_json
from .config import PipelineConfig
from .stages import distill_stage, evaluate_stage, transfer_stage, tune_stage
from .store import (PRIVATE_DIR, STAGE_FOLDERS, USER_STAGES, check_private_data_separation, migrate_legacy_user_stage,
                    run_folder_lock, stage_record)

STAGES = ("distill", "tune", "transfer", "full_tuning", "evaluate")


class StageMissing(ValueError):
    """A stage subcommand needs an earlier stage's output that is not there yet."""


def run_pipeline(cfg: PipelineConfig, only: Optional[str] = None, command: Optional[str] = None):
    """Run the stages in order, skipping finished ones, then write the report; returns the `POSTResults`.

    ``only`` runs a single stage (the `peft-post <stage>` subcommands): the earlier run-folder stages must already be
    done; the student, which lives in the shared cache, is distilled on demand when it is missing.
    """
    if only is not None and only not in STAGES:
        raise ValueError(f"`only` must be one of {STAGES}, got {only!r}.")
    if only == "full_tuning" and not cfg.full_baseline:
        raise ValueError("The full_tuning stage runs only with --full_baseline.")
    # Before any work, and before the run folder exists: public or distillation data that is the private data.
    overlap = check_private_data_separation(cfg)
    with run_folder_lock(cfg.run_dir):
        return _run_stages(cfg, only, command, overlap)


def _run_stages(cfg: PipelineConfig, only: Optional[str], command: Optional[str], overlap: dict):
    """`run_pipeline`'s work, with the run folder held by this job."""
    from ..assets import resolve_model
    from ..profiling import track_stage
    from ..report import POSTResults, curve_from_log_history, write_report

    cfg.save(cfg.run_dir)
    atomic_write_json(os.path.join(cfg.run_dir, PRIVATE_DIR, "data_overlap.json"), overlap)
    masked = cfg.masked
    target_path = resolve_model(cfg.target_model)
    folders = {name: os.path.join(cfg.run_dir, folder) for name, folder in STAGE_FOLDERS.items()}
    for name in USER_STAGES:
        migrate_legacy_user_stage(folders[name], name)
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
    from ..report import StageStats

    peak = record.get("peak_memory_mb")
    return StageStats(name=name, wall_time_s=float(record.get("wall_time_s", 0.0)), reused=reused,
                      peak_memory_mb=None if peak is None else float(peak))


def _ledger(privacy: Optional[dict]) -> Optional[dict]:
    if privacy is None:
        return None
    # The whole ledger: the report states adjacency, the add/remove figure and whether the guarantee holds too.
    return dict(privacy)
