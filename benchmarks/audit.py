"""LiRA membership-inference audit of soft prompts on the Rotten Tomatoes student (SmolLM2-135M-Instruct, 8 layers,
distilled by the `rotten_tomatoes` preset, the default until TREC replaced it) and Rotten Tomatoes, without DP and
with DP (ε = 8): `peft_post.audit.run_audit` per setting.

The student is that preset's cached one; the script waits for it (another run may still be distilling it)
rather than distilling it itself. Results go to results/audit.json with the command; the audit folders under
--audit-root keep every shadow's scores, so a rerun with the same flags resumes.

    python benchmarks/audit.py --num-examples 256 --num-shadows 8 --steps 80 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import torch

from peft_post.assets import resolve_model
from peft_post.audit import AuditConfig, run_audit
from peft_post.io import atomic_write_json
from peft_post.pipeline import PipelineConfig, student_folder

SETTINGS = {"non_dp": dict(dp=False), "dp_eps8": dict(dp=True, target_epsilon=8.0)}


def wait_for_student(cfg: PipelineConfig, timeout_s: float) -> str:
    folder = student_folder(cfg, resolve_model(cfg.target_model))
    deadline = time.time() + timeout_s
    while not os.path.isfile(os.path.join(folder, "stage.json")):
        if time.time() > deadline:
            raise SystemExit(f"No distilled student at {folder} after {timeout_s:.0f} s; run `peft-post distill "
                             "--preset rotten_tomatoes` first.")
        print(f"waiting for the Rotten Tomatoes student at {folder} ...", flush=True)
        time.sleep(30)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-examples", type=int, default=256)
    parser.add_argument("--num-shadows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=80, help="Prompt-tuning steps of each shadow.")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--audit-root", default="runs/audit_bench")
    parser.add_argument("--wait-s", type=float, default=3600, help="How long to wait for the Rotten Tomatoes student.")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "audit.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # Pinned, so that the committed figures keep their meaning: its student, data, template, prompt length, tuning.
    base = PipelineConfig(preset="rotten_tomatoes")
    student = wait_for_student(base, args.wait_s)
    previous = {}
    if os.path.isfile(args.out):
        with open(args.out, encoding="utf-8") as f:
            previous = json.load(f).get("results", {})
    results = {}
    for name in args.settings:
        cfg = PipelineConfig(preset="rotten_tomatoes", student_model=student, tune_max_steps=args.steps,
                             save_steps=max(args.steps // 2, 1), run_dir=args.audit_root, **SETTINGS[name])
        audit = AuditConfig(num_examples=args.num_examples, num_shadows=args.num_shadows,
                            audit_dir=os.path.join(args.audit_root, name))
        result = run_audit(cfg, audit, command=" ".join(map(shlex.quote, sys.argv)))
        result["s_per_shadow"] = result["shadow_wall_time_s"] / args.num_shadows
        # A rerun that reuses every shadow only recomputes the statistics: keep the cost of the run that trained them.
        before = previous.get(name, {})
        reused_all = result["shadows_reused"] == args.num_shadows and before.get("settings") == result["settings"]
        result["first_run_wall_time_s"] = (before.get("first_run_wall_time_s", before.get("wall_time_s"))
                                           if reused_all else result["wall_time_s"])
        results[name] = result
        tpr = result["tpr_at_fpr"]
        print(f"{name}: AUC {result['auc']:.3f}  TPR@1%FPR {tpr['0.01']}  TPR@0.1%FPR {tpr['0.001']}  "
              f"loss-attack AUC {result['loss_attack']['auc']:.3f}  train/held-out accuracy "
              f"{result['shadow_train_accuracy']:.3f}/{result['shadow_test_accuracy']:.3f}  "
              f"AUC interval {result['auc_interval']}  eps {(result['privacy'] or {}).get('epsilon')}  "
              f"{result['wall_time_s']:.0f} s", flush=True)
    atomic_write_json(args.out, {
        "command": "python " + " ".join(map(shlex.quote, ["benchmarks/audit.py", *sys.argv[1:]])),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "student": student,
        "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
