"""POST accuracy against the student: its size, distillation recipe and budget, one row per finished pipeline run.

Each run folder is an ordinary `peft-post run` (the command that made it is in its report). For each one this
reads the report and finds the run's student in the cache; it then scores the student *without* a prompt on the
run's public held-out split (the provider's check; recorded by the distill stage since it exists, computed here
for students distilled before). Nothing here reads the private test split beyond the reports' own scores.

    python benchmarks/students.py --runs runs/slot-300 runs/slot-600 --out benchmarks/results/students.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_post.assets import portable_path, resolve_model
from peft_post.evaluation import evaluate_prompt
from peft_post.io import atomic_write_json
from peft_post.pipeline import PipelineConfig, public_splits, student_folder

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "students.json")


def read_json(path: str) -> dict:
    """The JSON file at `path`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def student_row(run: str) -> dict:
    run_dir, _, student = run.partition("@")
    cfg = PipelineConfig.from_run_dir(run_dir)
    report = read_json(os.path.join(run_dir, "report.json"))
    named = bool(student)
    if not named:
        student = student_folder(cfg, resolve_model(cfg.target_model))
    distill = read_json(os.path.join(student, "stage.json"))
    public_zs = distill.get("public_zero_shot")
    if public_zs is None or public_zs.get("dataset") != cfg.public_dataset:
        _, public_eval = public_splits(cfg)
        model = AutoModelForCausalLM.from_pretrained(student).eval()
        scored = evaluate_prompt(model, AutoTokenizer.from_pretrained(student), public_eval, cfg.post_config(student),
                                 text_column=cfg.text_column, label_column=cfg.label_column,
                                 batch_size=cfg.eval_batch_size, desc="student: public zero-shot")
        public_zs = {"dataset": cfg.public_dataset, "accuracy": scored["accuracy"],
                     "num_examples": scored["num_examples"], "per_class": scored["per_class"]}
    train_logs = [h for h in distill["log_history"] if "loss" in h]
    transfer = read_json(os.path.join(run_dir, "transferred_prompt", "stage.json"))
    curve = [p["public_accuracy"] for p in report["transfer_curve"] if p.get("public_accuracy") is not None]
    return {
        "run_dir": portable_path(run_dir), "student_dir": portable_path(student),
        "command": report.get("command"),
        "student": {
            "key": os.path.basename(student), "layers": cfg.student_layers, "steps": distill["steps"],
            "templated_fraction": cfg.distill_templated_fraction, "distill_wall_time_s": distill["wall_time_s"],
            # A named student predates these fields: it was distilled without the label-slot term, with trained
            # embeddings and an LM label after each label slot.
            "label_slot_weight": None if named else cfg.distill_label_slot_weight,
            "freeze_embeddings": None if named else cfg.distill_freeze_embeddings,
            "last_logged_loss_terms": {k: v for k, v in train_logs[-1].items() if k.startswith("loss")},
            "public_zero_shot": public_zs,
        },
        "dp": cfg.dp, "tune": {"steps": cfg.tune_max_steps, "batch": cfg.tune_batch_size, "lr": cfg.tune_learning_rate},
        "transfer": {"alpha": transfer["alpha"], "alpha_inputs": transfer["alpha_inputs"],
                     "public_heldout_accuracy_curve": curve},
        "test_accuracy": report["accuracy"],
        "num_test_examples": report["num_test_examples"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True,
                   help="finished `peft-post run` folders; RUN@STUDENT names the student folder of a run made before "
                        "the student cache key had its current fields")
    p.add_argument("--out", default=RESULT)
    args = p.parse_args(argv)
    rows = [student_row(r) for r in args.runs]
    atomic_write_json(args.out, {"command": "python benchmarks/students.py " + " ".join(sys.argv[1:]),
                                 "machine": "2 CPU cores (shared), no GPU", "rows": rows})
    print("| student | steps | slot w | templ. | DP | tuning | student ZS (public) | p_s (public) | p_s | direct | POST | "
          "zero-shot |")
    print("|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, a = r["student"], r["test_accuracy"]
        src = (r["transfer"]["alpha_inputs"] or {}).get("public_source")
        print(f"| {s['layers']} | {s['steps']} | {'—' if s['label_slot_weight'] is None else s['label_slot_weight']} | {s['templated_fraction']} | "
              f"{'ε' if r['dp'] else 'no'} | {r['tune']['steps']}×{r['tune']['batch']}, lr {r['tune']['lr']:g} | "
              f"{100 * s['public_zero_shot']['accuracy']:.1f} | "
              f"{'' if src is None else f'{100 * src:.1f}'} | {100 * a['student_prompt']:.1f} | "
              f"{100 * a['direct_transfer']:.1f} | {100 * a['post']:.1f} | {100 * a['zero_shot']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
