"""The provider's selection signal: score finished runs on public examples that no stage of them saw.

The pipeline's public held-out split (`num_public_eval_examples`, 128 by default) drives the α heuristic and the
transfer curve, and on 128 examples an accuracy moves by ±4 points between runs. To compare settings (student
size, distillation budget, tuning and transfer budgets) the provider scores each run on the next `--num-examples`
public examples instead: after the transfer's training and held-out slices, so disjoint from both, and labelled, so
no private data is needed. For each run folder it scores the target zero-shot, the student zero-shot, the student
with p_s and the target with POST's p_t, and writes one row per run. The private test split is never read.
``--init-texts`` instead scores the target with a freshly TEXT-initialised prompt per text (the point the transfer
starts from), with the `rotten_tomatoes` preset's public data and prompt length.

    python benchmarks/public_validation.py --runs runs/a runs/b --num-examples 1000
    python benchmarks/public_validation.py --init-texts "Predict if sentiment of this review is positive or negative" \
        --out benchmarks/results/init_text.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from peft_post.assets import portable_path, resolve_model
from peft_post.evaluation import evaluate_prompt
from peft_post.io import atomic_write_json
from peft_post.pipeline import (STAGE_FOLDERS, PipelineConfig, load_model, load_prompted_model, load_tokenizer,
                                new_prompted_model, public_pool, student_folder)

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "public_validation.json")


def validation_slice(cfg, num_examples: int):
    """The public examples right after the transfer's training and held-out slices (same shuffle as the pipeline)."""
    public = public_pool(cfg)
    start = cfg.num_public_examples + cfg.num_public_eval_examples
    if len(public) < start + num_examples:
        raise ValueError(f"The public dataset has {len(public)} examples: {start} go to the transfer, so at most "
                         f"{len(public) - start} remain for validation; lower --num-examples.")
    return public.select(range(start, start + num_examples))


def run_row(run_dir: str, num_examples: int, scored_targets: dict) -> dict:
    cfg = PipelineConfig.from_run_dir(run_dir)
    target = resolve_model(cfg.target_model)
    student = resolve_model(cfg.student_model) if cfg.student_model is not None else student_folder(cfg, target)
    data = validation_slice(cfg, num_examples)
    tokenizer = load_tokenizer(target)
    task = cfg.post_config()
    masked = cfg.masked

    def score(model, desc):
        r = evaluate_prompt(model.eval(), tokenizer, data, task, text_column=cfg.text_column,
                            label_column=cfg.label_column, batch_size=cfg.eval_batch_size, desc=desc)
        return {"accuracy": r["accuracy"], "per_class": r["per_class"]}

    # The target's zero-shot score depends only on the target and the slice: score it once for all runs.
    zs_key = (target, cfg.public_dataset, cfg.public_split, cfg.seed, cfg.num_public_examples + cfg.num_public_eval_examples,
              cfg.template, cfg.label_words)
    if zs_key not in scored_targets:
        scored_targets[zs_key] = score(load_model(target, masked), "target zero-shot")
    report_path = os.path.join(run_dir, "report.json")
    return {
        "run_dir": portable_path(run_dir), "student_dir": portable_path(student),
        "command": _report_command(report_path),
        "settings": {"student_layers": cfg.student_layers, "distill_max_steps": cfg.distill_max_steps,
                     "dp": cfg.dp, "tune_max_steps": cfg.tune_max_steps, "tune_batch_size": cfg.tune_batch_size,
                     "tune_learning_rate": cfg.tune_learning_rate, "transfer_max_steps": cfg.transfer_max_steps,
                     "transfer_learning_rate": cfg.transfer_learning_rate, "alpha": cfg.transfer_alpha,
                     "num_virtual_tokens": cfg.num_virtual_tokens, "prompt_init_text": cfg.prompt_init_text},
        "num_examples": len(data),
        "accuracy": {
            "zero_shot": scored_targets[zs_key],
            "student_zero_shot": score(load_model(student, masked), "student zero-shot"),
            "student_prompt": score(load_prompted_model(student, os.path.join(run_dir, STAGE_FOLDERS["tune"]), masked),
                                    "student p_s"),
            "post": score(load_prompted_model(target, os.path.join(run_dir, STAGE_FOLDERS["transfer"]), masked), "POST"),
        },
    }


def _report_command(path: str):
    """The command line a run's report.json records, or None before the run has a report."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("command")


def init_text_rows(texts: list, num_examples: int) -> list:
    default = PipelineConfig(preset="rotten_tomatoes")  # the task the committed init-text figures are for
    target = resolve_model(default.target_model)
    tokenizer = load_tokenizer(target)
    data = validation_slice(default, num_examples)
    rows = []
    for text in texts:
        cfg = PipelineConfig(preset="rotten_tomatoes", prompt_init_text=text)
        model = new_prompted_model(target, cfg.post_config(target), cfg.masked, cfg.seed).eval()
        r = evaluate_prompt(model, tokenizer, data, cfg.post_config(), batch_size=cfg.eval_batch_size,
                            desc="init prompt")
        rows.append({"init_text": text, "text_tokens": len(tokenizer(text)["input_ids"]),
                     "num_virtual_tokens": cfg.num_virtual_tokens, "accuracy": r["accuracy"],
                     "per_class": r["per_class"]})
        print(f"{r['accuracy']:.3f}  {rows[-1]['text_tokens']} tokens -> {cfg.num_virtual_tokens}: {text!r}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", help="run folders whose tune and transfer stages finished")
    p.add_argument("--init-texts", nargs="+", help="score the target with a TEXT-initialised prompt per text instead")
    p.add_argument("--num-examples", type=int, default=1000, help="public validation examples per run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    p.add_argument("--out", default=RESULT)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/public_validation.py " + " ".join(sys.argv[1:])
    if args.init_texts:
        atomic_write_json(args.out, {"command": command, "machine": "2 CPU cores, no GPU",
                                     "rows": init_text_rows(args.init_texts, args.num_examples)})
        return 0
    if not args.runs:
        p.error("give --runs or --init-texts")
    scored_targets: dict = {}
    rows = [run_row(r, args.num_examples, scored_targets) for r in args.runs]
    atomic_write_json(args.out, {"command": command,
                                 "machine": "2 CPU cores, no GPU", "rows": rows})
    print("| run | student layers | distill steps | tune | zero-shot | student ZS | student p_s | POST |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        s, a = r["settings"], {k: 100 * v["accuracy"] for k, v in r["accuracy"].items()}
        print(f"| {r['run_dir']} | {s['student_layers']} | {s['distill_max_steps']} | "
              f"{'DP ' if s['dp'] else ''}{s['tune_max_steps']}×{s['tune_batch_size']} lr {s['tune_learning_rate']:g} | "
              f"{a['zero_shot']:.1f} | {a['student_zero_shot']:.1f} | {a['student_prompt']:.1f} | {a['post']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
