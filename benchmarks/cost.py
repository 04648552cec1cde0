"""What POST saves: full prompt tuning on the target against (student prompt tuning + transfer).

Time: the three training steps (prompt tuning on the target, prompt tuning on the student, one POST transfer step on
the target) are built with the library's own trainers on the same private batches and timed interleaved, round after
round, in one process, so that whatever else the machine does weighs on all three alike; the medians are scaled by
the preset's step counts (the `rotten_tomatoes` preset unless `--set preset=...` names another; there both tunings
take the same steps and batch, i.e. the same epochs, while `full_tuning_*` can give the baseline its own), and the
transfer's one-time work (its cache of frozen logits) is timed once and added. Whole-stage wall times of a run are
not used for the ratio: on a shared machine they mostly measure what else was running.
Memory: the peak resident memory each stage recorded in a finished `--run-dir` with `--full_baseline` (per-stage
peaks are taken in separate stages of one run; they are not comparable within one process).

The student's distillation is the provider's one-time cost, shared by every later task; it is not charged here.

    peft-post run --preset rotten_tomatoes --dp false --full_baseline true --run_dir runs/nodp
    python benchmarks/cost.py --run-dir runs/nodp    # writes benchmarks/results/cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

import torch

from peft_post.assets import load_text_dataset, resolve_model
from peft_post.io import atomic_write_json
from peft_post.profiling import training_stepper
from peft_post.pipeline import (STAGE_FOLDERS, PipelineConfig, distill_stage, load_prompted_model, load_tokenizer,
                                new_prompted_model, parse_overrides, public_splits, random_subset, stage_record)
from peft_post.transfer import TransferTrainer
from peft_post.tuning import PromptTrainer

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cost.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="a finished non-DP run with --full_baseline: stage memory and its source prompt")
    p.add_argument("--rounds", type=int, default=7, help="timed steps of each kind (after one warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a PipelineConfig field (repeatable), e.g. tune_max_steps=300")
    p.add_argument("--out", default=RESULT)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    work = tempfile.mkdtemp(prefix="post-cost-")  # the trainers' output folders; nothing is saved there
    try:
        measure(args, work, argv)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work: str, argv) -> None:
    torch.set_num_threads(args.threads)
    try:
        overrides = ["preset=rotten_tomatoes", *args.overrides, f"run_dir={args.run_dir or work}", "dp=false"]
        cfg = PipelineConfig(**parse_overrides(overrides))
    except ValueError as err:
        raise SystemExit(f"--set: {err}") from None
    target_path = resolve_model(cfg.target_model)
    student_path = resolve_model(cfg.student_model) if cfg.student_model else distill_stage(cfg, target_path, False)[0]
    train = random_subset(load_text_dataset(cfg.private_dataset, split=cfg.private_train_split), cfg.max_train_examples,
                          cfg.seed)
    public_train, public_eval = public_splits(cfg)

    def prompt_trainer(model_path: str, args):
        # The pipeline's own model and arguments (`tune_prompt` builds the same trainer).
        model = new_prompted_model(model_path, cfg.post_config(model_path), False, cfg.seed)
        return PromptTrainer(model, args, train_dataset=train, processing_class=load_tokenizer(model_path))

    full_steps = cfg.full_tuning_value("full_tuning_max_steps")
    full = prompt_trainer(target_path, cfg.full_tuning_args(os.path.join(work, "full")))
    student = prompt_trainer(student_path, cfg.tune_args(os.path.join(work, "student")))
    transfer_record = stage_record(args.run_dir, "transfer") if args.run_dir else None
    if args.run_dir and stage_record(args.run_dir, "tune"):
        source = load_prompted_model(student_path, os.path.join(args.run_dir, STAGE_FOLDERS["tune"]), False)
    else:  # the transfer step's cost does not depend on what the source prompt learned
        source = student.model
    target = new_prompted_model(target_path, cfg.post_config(target_path), False, cfg.seed)
    # The pipeline's transfer arguments (`transfer_prompt` builds the same trainer), with the run's α when there is
    # one, else `transfer_alpha`, else `transfer_args`' placeholder 0.5 (both KL terms: a step's largest cost).
    transfer = TransferTrainer(
        target, source,
        cfg.transfer_args(os.path.join(work, "transfer"), alpha=transfer_record["alpha"] if transfer_record else None),
        public_dataset=public_train, public_eval_dataset=public_eval, processing_class=load_tokenizer(target_path))
    start = time.perf_counter()
    transfer.build_cache()
    cache_s = time.perf_counter() - start

    steppers = {"full_prompt_tuning": training_stepper(full, full_steps),
                "student_tuning": training_stepper(student, cfg.tune_max_steps),
                "transfer": training_stepper(transfer, cfg.transfer_max_steps)}
    times: dict = {name: [] for name in steppers}
    for name, step in steppers.items():
        step()  # warm-up
    for _ in range(args.rounds):
        for name, step in steppers.items():
            times[name].append(step())
    median = {name: statistics.median(v) for name, v in times.items()}
    full_s = full_steps * median["full_prompt_tuning"]
    post_s = cfg.tune_max_steps * median["student_tuning"] + cfg.transfer_max_steps * median["transfer"] + cache_s
    result = {
        "command": "python benchmarks/cost.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": "2 CPU cores (shared), no GPU", "threads": args.threads, "rounds": args.rounds,
        "target": target_path, "student": student_path,
        "budget": {"tune_steps": cfg.tune_max_steps, "tune_batch_size": cfg.tune_batch_size,
                   "full_tuning_steps": full_steps,
                   "full_tuning_batch_size": cfg.full_tuning_value("full_tuning_batch_size"),
                   "transfer_steps": cfg.transfer_max_steps, "transfer_batch_size": cfg.transfer_batch_size,
                   "num_public_examples": len(public_train), "num_virtual_tokens": cfg.num_virtual_tokens},
        "step_seconds": times, "median_step_s": median, "transfer_cache_build_s": cache_s,
        "per_step_ratio_target_over_student": median["full_prompt_tuning"] / median["student_tuning"],
        "estimated_s": {"full_prompt_tuning": full_s, "student_tuning_plus_transfer": post_s},
        "time_ratio_full_over_post": full_s / post_s,
    }
    if args.run_dir:
        stages = {}
        for name in ("tune", "transfer", "full_tuning"):  # the user stages' records are in the run's private/
            record = stage_record(args.run_dir, name) or {}
            stages[name] = {"peak_memory_mb": record.get("peak_memory_mb"), "wall_time_s": record.get("wall_time_s")}
        result["run_stages"] = stages
        peaks = [stages["tune"]["peak_memory_mb"], stages["transfer"]["peak_memory_mb"]]
        if all(peaks) and stages["full_tuning"]["peak_memory_mb"]:
            result["peak_memory_mb"] = {"full_prompt_tuning": stages["full_tuning"]["peak_memory_mb"],
                                        "student_tuning_plus_transfer": max(peaks)}
    print(json.dumps({k: result[k] for k in ("median_step_s", "transfer_cache_build_s", "estimated_s",
                                              "time_ratio_full_over_post")}, indent=1))
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
