"""Does the user's prompt p_s carry task signal on the student? Its gain over the student's own zero-shot, with a
paired interval (issue 17 item 4: "p_s must beat the student's zero-shot, with an interval that excludes 0").

A run's report scores p_s on the student (``student_prompt``) but not the student without a prompt. This scores the
unprompted student on the run's own private test examples, in the same order, and pairs the two per example:

    python benchmarks/student_gain.py --runs runs/headline/trec-dp-seed0 runs/headline/trec-dp-seed1 \\
        --threads 2 --out benchmarks/results/student_gain_trec.json

It only scores (nothing is selected on the test examples), and the unprompted student's results are computed once
per student and test set. ``verdict`` is "beats" when the 95% interval of p_s − student zero-shot is above 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from peft_post.assets import portable_path, portable_source, resolve_model
from peft_post.io import atomic_write_json, read_json_object
from peft_post.pipeline import (PipelineConfig, load_model, load_tokenizer, private_examples, score_methods,
                                student_folder)
from peft_post.pipeline.store import labelled_data_digest
from peft_post.report import paired_bootstrap, percentile_interval, zero_shot_verdict

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "student_gain.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="finished `peft-post run` folders (classification)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--out", default=RESULT)
    args = p.parse_args(argv)
    for run in args.runs:
        if not os.path.isfile(os.path.join(run, "report.json")):
            raise SystemExit(f"--runs: {run!r} has no report.json; give finished `peft-post run` folders.")
    return args


def run_student(cfg: PipelineConfig) -> str:
    """The folder of the student the run tuned p_s on: its ready `student_model`, or its cached distilled one."""
    if cfg.student_model is not None:
        return resolve_model(cfg.student_model)
    folder = student_folder(cfg, resolve_model(cfg.target_model))
    if not os.path.isdir(folder):
        raise SystemExit(f"The run's distilled student {folder} is not in this machine's cache.")
    return folder


def student_row(run: str, zero_shot_cache: dict) -> dict:
    cfg = PipelineConfig.from_run_dir(run)
    report = read_json_object(os.path.join(run, "report.json"), "rerun the run's evaluate stage to write it again")
    if cfg.task_kind != "classification":
        raise SystemExit(f"--runs: {run!r} is a {cfg.task_kind} run; give classification runs.")
    prompt_bits = report.get("per_example_correct", {}).get("student_prompt")
    if prompt_bits is None:
        raise SystemExit(f"--runs: {run!r}'s report has no per-example results of the student's prompt.")
    student = run_student(cfg)
    test = private_examples(cfg, "test")
    key = (student, labelled_data_digest(test, cfg.text_column, cfg.target_column), cfg.template, cfg.label_words)
    if key not in zero_shot_cache:
        tokenizer = load_tokenizer(student)
        zero_shot_cache[key] = score_methods(cfg, tokenizer, test, {"student_zero_shot": lambda: load_model(
            student, cfg.masked, cfg.precision(), "frozen")})["student_zero_shot"]
    zero_shot = zero_shot_cache[key]
    if len(zero_shot["per_example_correct"]) != len(prompt_bits):
        raise SystemExit(f"{run}: the report scored {len(prompt_bits)} test examples, this scored "
                         f"{len(zero_shot['per_example_correct'])}; the run's test split has changed since.")
    resampled = paired_bootstrap({"student_prompt": prompt_bits, "student_zero_shot": zero_shot["per_example_correct"]})
    interval = percentile_interval(resampled["student_prompt"] - resampled["student_zero_shot"])
    privacy = report.get("privacy") or {}
    return {"run": portable_path(run), "private_dataset": portable_source(cfg.private_dataset), "seed": cfg.seed,
            "dp": cfg.dp, "epsilon": privacy.get("epsilon") if cfg.dp else None, "student": portable_path(student),
            "num_test_examples": len(prompt_bits), "student_zero_shot": zero_shot["accuracy"],
            "student_prompt": report["accuracy"]["student_prompt"],
            "gain": report["accuracy"]["student_prompt"] - zero_shot["accuracy"], "gain_ci": interval,
            "verdict": zero_shot_verdict(interval)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cache, rows = {}, []
    for run in args.runs:
        row = student_row(run, cache)
        rows.append(row)
        lo, hi = row["gain_ci"]
        print(f"{row['run']}: p_s {100 * row['student_prompt']:.1f}% vs the student's zero-shot "
              f"{100 * row['student_zero_shot']:.1f}%: {100 * row['gain']:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}] "
              f"({row['verdict']})", flush=True)
    words = ["benchmarks/student_gain.py", *(sys.argv[1:] if argv is None else argv)]
    atomic_write_json(args.out, {"command": "python " + " ".join(shlex.quote(w) for w in words), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
