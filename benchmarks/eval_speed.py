"""Time of one `evaluate_prompt` pass over Rotten Tomatoes test reviews on the embedded target, with the rows
batched in length order (what `evaluate_prompt` does) against the dataset's own order (what it did before), same
model, same rows, interleaved in one process; also checks that both orders give the same accuracy.

    python benchmarks/eval_speed.py            # writes benchmarks/results/eval_speed.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from unittest import mock

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_post import POSTConfig, evaluate_prompt
from peft_post.assets import DEFAULT_MODEL, DEFAULT_PRIVATE_DATASET, load_text_dataset, resolve_model
from peft_post.io import atomic_write_json

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "eval_speed.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=RESULT)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    test = load_text_dataset(DEFAULT_PRIVATE_DATASET, split="test").shuffle(seed=0).select(range(args.examples))
    task = POSTConfig(task_type="CAUSAL_LM", num_virtual_tokens=1, template="Review: {text}\nSentiment:",
                      label_words=[["negative"], ["positive"]])

    def run(sorted_by_length: bool):
        # The unsorted baseline: make the length sort a no-op (argsort of equal keys keeps the dataset's order).
        patch = mock.patch("peft_post.evaluation.np.argsort", lambda a, kind=None: np.arange(len(a)))
        start = time.perf_counter()
        if sorted_by_length:
            report = evaluate_prompt(model, tokenizer, test, task, batch_size=args.batch_size, disable_progress=True)
        else:
            with patch:
                report = evaluate_prompt(model, tokenizer, test, task, batch_size=args.batch_size,
                                         disable_progress=True)
        return time.perf_counter() - start, report["accuracy"]

    times = {"dataset_order": [], "length_order": []}
    accuracy = {}
    run(True)  # warm-up
    for _ in range(args.repeats):
        for name, flag in (("dataset_order", False), ("length_order", True)):
            seconds, acc = run(flag)
            times[name].append(seconds)
            accuracy[name] = acc
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": "python benchmarks/eval_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": "2 CPU cores (shared), no GPU",
        "model": DEFAULT_MODEL, "examples": args.examples, "batch_size": args.batch_size, "threads": args.threads,
        "seconds": times, "median_s": medians, "accuracy": accuracy,
        "speedup": medians["dataset_order"] / medians["length_order"],
    }
    print({k: result[k] for k in ("median_s", "accuracy", "speedup")})
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
