"""How much room a task leaves POST: the target's zero-shot against full prompt tuning on the target (no DP), with
a paired 95% interval over test examples. Issue 17 asks for tasks with 20 points or more between the two (item 6).

Full prompt tuning is the pipeline's own `full_tuning` stage, run in ``--run-dir`` (`run_pipeline(cfg,
only="full_tuning")`: preflight, the overlap check, checkpoints and resume; a finished stage is read back). Then the
target is scored zero-shot and with that prompt on the task's private test split, in the same order, and the two are
paired per example. The recipe is the TREC headline's full prompt tuning (the `rotten_tomatoes` preset's 300 steps
of 16, lr 0.1) unless ``--set`` changes it; ``--set`` also gives the task. Rows accumulate in ``--out``, one per
task (dataset, template, label words), and a rerun replaces its task's row.

    python benchmarks/headroom.py --run-dir runs/headroom/tweet_sentiment --threads 2 \\
        --set private_dataset=embedded:tweet_sentiment --set public_dataset=embedded:tweet_sentiment \\
        --set public_split=public --set distill_split=without_tweets \\
        --set template=$'Tweet: {text}\\nSentiment:' --set label_words='negative|neutral|positive' \\
        --set prompt_init_text='Classify the sentiment of this tweet as negative, neutral or positive'

Choosing which tasks to benchmark on their test headroom selects nothing that a run's privacy claim covers: no
prompt, setting or model of any run is picked by it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections import Counter

from peft_post.assets import portable_path, portable_source, resolve_model
from peft_post.io import atomic_write_json, read_json_object
from peft_post.pipeline import (FULL_TUNING_FALLBACKS, STAGE_FOLDERS, PipelineConfig, load_model, load_prompted_model,
                                load_tokenizer, parse_overrides, private_examples, private_stage_done, run_pipeline,
                                score_methods)
from peft_post.report import paired_bootstrap, percentile_interval

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "headroom.json")
# The full prompt tuning of the TREC headline (benchmarks/README.md, "Headline over seeds").
RECIPE = ["preset=rotten_tomatoes", "tune_learning_rate=0.1"]
TASK_FIELDS = ("private_dataset", "template", "label_words")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="the run folder its full_tuning stage goes to (resumable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a PipelineConfig field (repeatable): the task, or the tuning recipe")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--out", default=RESULT)
    args = p.parse_args(argv)
    try:
        given = parse_overrides(args.overrides)
        for key in ("run_dir", "dp", "full_baseline"):
            if key in given:
                raise ValueError(f"the benchmark sets {key} itself")
        args.config = PipelineConfig(**{**parse_overrides(RECIPE), **given, "run_dir": args.run_dir, "dp": False,
                                        "full_baseline": True, **({"threads": args.threads} if args.threads else {})})
    except ValueError as err:
        raise SystemExit(f"--set: {err}") from None
    if args.config.task_kind != "classification":
        raise SystemExit("--set: the benchmark compares accuracies of a classification task (task_kind).")
    return args


def headroom_row(cfg: PipelineConfig, command: str) -> dict:
    start = time.perf_counter()
    folder = os.path.join(cfg.run_dir, STAGE_FOLDERS["full_tuning"])
    reused = private_stage_done(folder, "full_tuning") is not None
    run_pipeline(cfg, only="full_tuning", command=command)
    record = private_stage_done(folder, "full_tuning")
    target = resolve_model(cfg.target_model)
    test = private_examples(cfg, "test")
    precision = cfg.precision()
    scores = score_methods(cfg, load_tokenizer(target), test, {
        "zero_shot": lambda: load_model(target, cfg.masked, precision, "target"),
        "full_prompt_tuning": lambda: load_prompted_model(target, folder, cfg.masked, precision, "target"),
    })
    resampled = paired_bootstrap({m: s["per_example_correct"] for m, s in scores.items()})
    zero_shot, full = scores["zero_shot"]["accuracy"], scores["full_prompt_tuning"]["accuracy"]
    labels = Counter(test[cfg.label_column])
    return {
        "private_dataset": portable_source(cfg.private_dataset), "template": cfg.template,
        "label_words": cfg.label_words,
        "num_test_examples": len(test), "majority_class_rate": max(labels.values()) / len(test),
        "zero_shot": zero_shot, "full_prompt_tuning": full, "headroom": full - zero_shot,
        "headroom_ci": percentile_interval(resampled["full_prompt_tuning"] - resampled["zero_shot"]),
        "per_class": {m: s["per_class"] for m, s in scores.items()},
        "recipe": {**{name: cfg.full_tuning_value(name) for name in FULL_TUNING_FALLBACKS},
                   "num_virtual_tokens": cfg.num_virtual_tokens,
                   "prompt_init_text": cfg.prompt_init_text, "seed": cfg.seed},
        "precision": precision.record(),
        "full_tuning_steps": record["steps"], "full_tuning_wall_time_s": record["wall_time_s"],
        "full_tuning_reused": reused, "wall_time_s": time.perf_counter() - start,
        "run": portable_path(cfg.run_dir),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    words = ["benchmarks/headroom.py", *(sys.argv[1:] if argv is None else argv)]
    command = "python " + " ".join(shlex.quote(w) for w in words)
    row = {**headroom_row(args.config, command), "command": command}
    lo, hi = row["headroom_ci"]
    print(f"{row['private_dataset']}: zero-shot {100 * row['zero_shot']:.1f}%, full prompt tuning "
          f"{100 * row['full_prompt_tuning']:.1f}%: headroom {100 * row['headroom']:+.1f} pp "
          f"[{100 * lo:+.1f}, {100 * hi:+.1f}] (majority class {100 * row['majority_class_rate']:.1f}%)", flush=True)
    rows = read_json_object(args.out, "delete it to start again").get("rows", []) if os.path.isfile(args.out) else []
    rows = [r for r in rows if tuple(r[k] for k in TASK_FIELDS) != tuple(row[k] for k in TASK_FIELDS)] + [row]
    atomic_write_json(args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
