"""What POST saves: full prompt tuning on the target against (student prompt tuning + transfer), one pipeline run.

Both tunings see the same private examples for the same number of steps and batch size (so the same epochs), on the
same machine, in one `run_pipeline` call (non-DP, so the comparison is of the methods, not of DP-SGD). The student's
distillation is the provider's one-time cost, shared by every later task; it is reported but not charged to the
task. Wall time and peak resident memory are those each stage recorded when it ran; pointing ``--run-dir`` at a
finished run (e.g. a cell of benchmarks/utility.py with --full-baseline) reads them back without rerunning.

    python benchmarks/cost.py --run-dir runs/cost        # writes benchmarks/results/cost.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from transformers import HfArgumentParser

from peft_post.io import atomic_write_json
from peft_post.pipeline import PipelineConfig, run_pipeline

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cost.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/cost")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a PipelineConfig field (repeatable), e.g. tune_learning_rate=0.1")
    p.add_argument("--out", default=RESULT)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    flags = []
    for pair in args.overrides:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY a PipelineConfig field.")
        flags += [f"--{key}", value]
    cfg = HfArgumentParser(PipelineConfig).parse_args_into_dataclasses(
        args=[*flags, "--run_dir", args.run_dir, "--dp", "false", "--full_baseline", "true"])[0]
    report = run_pipeline(cfg, command="python benchmarks/cost.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)).to_dict()
    stages = {s["name"]: s for s in report["stages"]}
    post = ("tune", "transfer")
    time_post = sum(stages[s]["wall_time_s"] for s in post)
    time_full = stages["full_tuning"]["wall_time_s"]
    memory_post = max(stages[s]["peak_memory_mb"] or 0.0 for s in post)
    memory_full = stages["full_tuning"]["peak_memory_mb"]
    result = {
        "command": report["command"], "machine": "2 CPU cores (shared), no GPU",
        "budget": {"tune_steps": cfg.tune_max_steps, "tune_batch_size": cfg.tune_batch_size,
                   "transfer_steps": cfg.transfer_max_steps, "transfer_batch_size": cfg.transfer_batch_size,
                   "num_virtual_tokens": cfg.num_virtual_tokens},
        "stages": stages,
        "wall_time_s": {"full_prompt_tuning": time_full, "student_tuning_plus_transfer": time_post,
                        "distillation_one_time": stages.get("distill", {}).get("wall_time_s")},
        "peak_memory_mb": {"full_prompt_tuning": memory_full, "student_tuning_plus_transfer": memory_post},
        "time_ratio_full_over_post": time_full / time_post,
        "memory_ratio_full_over_post": (memory_full / memory_post) if memory_full and memory_post else None,
        "accuracy": report["accuracy"],
    }
    print(f"full prompt tuning {time_full / 60:.1f} min, {memory_full} MB; student tuning + transfer "
          f"{time_post / 60:.1f} min, {memory_post} MB; time ratio {result['time_ratio_full_over_post']:.2f}x")
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
