"""Why a DP prompt learns little: each DP-SGD step's signal against its noise, on public data (issue 17 item 4).

Every DP recipe tried on the public proxy learned only the label prior (`results/dp_recipe_trec.json`). This measures
why, without training: at the prompt's initialisation, the per-example gradients of ``--examples`` public labelled
examples are taken exactly (`tuning.privacy.per_example_gradients`, as the DP trainer takes them), and for each
expected batch B and clipping bound C the step's signal-to-noise is computed (`tuning.privacy.signal_to_noise`): the
norm of the expected clipped mean gradient against the norm σ·C·√D / B of the noise the step adds, with σ the one
the pipeline's accountant (PLD, replace-one) calibrates for ``--epsilon`` at the *private* run's size
(``--private-size``: q = B / N, round(E·N / B) steps for ``--epochs`` E, δ = 1/N). A ratio near or below 1 means the
noisy steps mostly point nowhere. It is measured at the initial prompt and, with ``--after-steps``, after that
many steps of non-private prompt tuning on the other public examples (the signal changes as the prompt learns). It
uses public data only: nothing here reads the private data, so the recipe may be chosen from it.

    python benchmarks/dp_signal.py --student runs/students/trec-300 --data embedded:vader_tweets \\
        --batches 64 128 512 1024 3864 --clip-norms 0.01 0.1 1 --private-size 3864 --threads 1 \\
        --out benchmarks/results/dp_signal_trec.json

``--set`` gives the task's fields (template, label words, prompt length and init text); the defaults are the VADER
tweets proxy's, as in `dp_recipe.py`.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import TrainerCallback

from peft_post.assets import portable_path, portable_source
from peft_post.io import atomic_write_json
from peft_post.modeling import prompt_parameter
from peft_post.pipeline import PipelineConfig, load_tokenizer, new_prompted_model, parse_overrides, private_examples
from peft_post.tuning import PromptTrainer
from peft_post.tuning.accountant import REPLACE_ONE, calibrate_noise_multiplier
from peft_post.tuning.privacy import (chunks, mean_with_sampling_variance, per_example_gradients, per_example_norms,
                                     signal_to_noise)

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dp_signal.json")
# PipelineConfig fields the flags set, which `--set` may not.
OWN_FIELDS = {"student_model": "--student", "private_dataset": "--data", "private_train_split": "--split",
              "private_test_size": "--heldout", "seed": "--seed", "threads": "--threads",
              "tune_batch_size": "--train-batch", "tune_learning_rate": "--train-lr",
              "tune_max_steps": "--after-steps", "dp": "(none: measured without DP)", "run_dir": "(a temporary folder)",
              "save_steps": "(none)"}
# The VADER tweets proxy of `dp_recipe.py`: binary sentiment of short texts.
TWEETS_TASK = {"template": "Tweet: {text}\nSentiment:", "label_words": "negative|positive",
               "prompt_init_text": "Classify the sentiment of this tweet"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="the distilled student (a folder), on which the user tunes")
    p.add_argument("--data", default="embedded:vader_tweets", help="a public labelled dataset")
    p.add_argument("--split", default="train", help="its split to sample the examples from")
    p.add_argument("--heldout", type=int, default=500,
                   help="examples of a dataset without a test split held out first, never sampled (500: the ones "
                   "dp_recipe.py scores recipes on); 0 for a dataset that has its own test split")
    p.add_argument("--examples", type=int, default=512, help="public examples whose gradients are taken")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 512, 1024],
                   help="expected batch sizes B of the DP recipes compared")
    p.add_argument("--clip-norms", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="clipping bounds C")
    p.add_argument("--after-steps", type=int, nargs="+", default=[0],
                   help="measure at the initial prompt (0) and after this many steps of non-private prompt tuning on "
                   "the other public examples (--train-batch, --train-lr): where the signal is once the prompt has "
                   "learned the label prior")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-lr", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=2.0, help="epochs E of each recipe over the private data")
    p.add_argument("--private-size", type=int, required=True, help="N, the private training set's size")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--chunk", type=int, default=64, help="examples per forward and backward (memory only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a PipelineConfig field of the task (template, label_words, num_virtual_tokens, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default=RESULT)
    args = p.parse_args(argv)
    if args.examples < 2:
        raise SystemExit("--examples: at least 2 gradients are needed to estimate their mean")
    if args.private_size < 2 or any(b < 1 or b > args.private_size for b in args.batches):
        raise SystemExit(f"--batches: each B must be in [1, --private-size {args.private_size}]")
    if any(s < 0 for s in args.after_steps) or args.train_batch < 1 or args.train_lr <= 0:
        raise SystemExit("--after-steps must be >= 0, --train-batch >= 1 and --train-lr > 0")
    args.after_steps = sorted(set(args.after_steps))
    if any(c <= 0 for c in args.clip_norms) or args.epochs <= 0 or args.epsilon <= 0:
        raise SystemExit("--clip-norms, --epochs and --epsilon must be positive")
    try:
        args.overrides = parse_overrides(args.overrides)
    except ValueError as err:
        raise SystemExit(f"--set: {err}") from None
    taken = sorted(set(args.overrides) & set(OWN_FIELDS))
    if taken:
        raise SystemExit(f"--set {', '.join(taken)}: set by this script's own flags ({', '.join(OWN_FIELDS.values())})")
    if not os.path.isdir(args.student):
        raise SystemExit(f"--student {args.student!r} is not a folder; give a distilled student")
    return args


def gradients(trainer, examples, chunk: int) -> torch.Tensor:
    """(M, n, d) exact per-example gradients of the task loss at the trainer's current prompt, taken as the DP trainer
    takes them (its collator, loss and autocast)."""
    batch = trainer.data_collator([examples[i] for i in range(len(examples))])
    prompt = prompt_parameter(trainer.model)
    out = []
    for part in chunks(batch, chunk):
        part = {k: v.to(prompt.device) if torch.is_tensor(v) else v for k, v in part.items()}
        grads, _ = per_example_gradients(trainer.model, part, prompt, trainer.example_losses,
                                         autocast=trainer.accelerator.autocast)
        out.append(grads.cpu())
    return torch.cat(out)


class MeasureAt(TrainerCallback):
    """Takes the measured examples' gradients when the non-private public training reaches each step of `steps`."""

    def __init__(self, examples, chunk: int, steps):
        self.examples, self.chunk, self.steps, self.trainer = examples, chunk, set(steps), None
        self.measured: dict[int, torch.Tensor] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self.measured[state.global_step] = gradients(self.trainer, self.examples, self.chunk)


def measure(args, cfg: PipelineConfig, public, work: str) -> tuple[dict[int, torch.Tensor], list]:
    """({step: gradients}, the measured examples' labels): at the initial prompt (step 0) and after each of
    ``--after-steps`` steps of non-private prompt tuning on the other public examples (where a DP step's signal is
    once the label prior is learned)."""
    order = np.random.default_rng(args.seed).permutation(len(public))
    if len(order) <= args.examples:
        raise SystemExit(f"--examples {args.examples}: {args.data} split {args.split} has {len(order)} examples, and "
                         "some must be left to train on")
    examples, rest = public.select(order[:args.examples]), public.select(order[args.examples:])
    tokenizer = load_tokenizer(cfg.student_model)
    model = new_prompted_model(cfg.student_model, cfg.post_config(cfg.student_model), cfg.masked, cfg.seed,
                               cfg.precision(), "frozen")
    trainer = PromptTrainer(model, cfg.tune_args(work), train_dataset=rest, processing_class=tokenizer)
    callback = MeasureAt(examples, args.chunk, [s for s in args.after_steps if s > 0])
    callback.trainer = trainer
    measured = {0: gradients(trainer, examples, args.chunk)} if 0 in args.after_steps else {}
    if callback.steps:
        trainer.add_callback(callback)
        trainer.train()
    return {**measured, **callback.measured}, list(examples[cfg.label_column])


def class_alignment(grads: torch.Tensor, labels: list) -> dict:
    """Where the clipped vote points, class by class. With C below every norm a DP step sums one unit vector per
    example, so its signal is ‖E[g/‖g‖]‖ (`alignment`), a vote weighted by the class shares. ``per_class`` is
    ‖E[g/‖g‖ | y = c]‖ and ``balanced`` the norm of the mean of those class means: the vote's signal if every
    class were equally frequent. Far below `alignment`, it says that the majority's shared pull (the label prior)
    is most of the signal, and a DP prompt learns the prior. Each is estimated without its sample's own spread,
    floored at 0."""
    units = grads.flatten(1).float()
    units = units / (units.norm(dim=1, keepdim=True) + 1e-6)
    classes = sorted(set(labels))
    index = torch.tensor(labels)
    means, variances, per_class = [], [], {}
    for c in classes:
        mean, variance = mean_with_sampling_variance(units[index == c])
        means.append(mean)
        variances.append(variance)
        per_class[str(c)] = math.sqrt(max(float(mean.pow(2).sum()) - variance, 0.0))
    # The classes' mean of means: its sampling variance is the classes' own, over K².
    balanced = torch.stack(means).mean(0)
    return {"per_class": per_class, "shares": {str(c): labels.count(c) / len(labels) for c in classes},
            "balanced": math.sqrt(max(float(balanced.pow(2).sum()) - sum(variances) / len(classes)**2, 0.0))}


def signal_table(args, grads: torch.Tensor, labels: list) -> dict:
    """The per-example norms of `grads` and, for every (B, C), the step's signal-to-noise at the calibrated σ."""
    norms = per_example_norms(grads).tolist()
    deciles = statistics.quantiles(norms, n=10)
    rows = []
    for batch in args.batches:
        sample_rate = batch / args.private_size
        steps = max(1, round(args.epochs * args.private_size / batch))
        sigma = calibrate_noise_multiplier(args.epsilon, 1.0 / args.private_size, sample_rate, steps, REPLACE_ONE)
        for clip in args.clip_norms:
            rows.append({"expected_batch": batch, "max_grad_norm": clip, "sample_rate": sample_rate, "steps": steps,
                         "noise_multiplier": sigma, **signal_to_noise(grads, clip, sigma, batch)})
    return {"per_example_norm": {"p10": deciles[0], "median": statistics.median(norms), "p90": deciles[-1]},
            "alignment": rows[0]["alignment"], "class_alignment": class_alignment(grads, labels), "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dp_signal_") as work:
        values = {"preset": "rotten_tomatoes", **TWEETS_TASK, **args.overrides}
        cfg = PipelineConfig(run_dir=work, student_model=args.student, private_dataset=args.data,
                             private_train_split=args.split, private_test_size=args.heldout or None, dp=False,
                             seed=args.seed, threads=args.threads, tune_batch_size=args.train_batch,
                             tune_learning_rate=args.train_lr, tune_max_steps=max(args.after_steps + [1]),
                             save_steps=10**9, **values)
        measured, labels = measure(args, cfg, private_examples(cfg, "train"), work)
    words = ["benchmarks/dp_signal.py", *(sys.argv[1:] if argv is None else argv)]
    result = {
        "command": "python " + " ".join(shlex.quote(w) for w in words),
        "student": portable_path(args.student), "data": portable_source(args.data), "split": args.split,
        "task": {k: getattr(cfg, k) for k in ("template", "label_words", "num_virtual_tokens", "prompt_init_text")},
        "num_examples": args.examples, "prompt_numbers": int(next(iter(measured.values()))[0].numel()),
        "epsilon": args.epsilon, "delta": 1.0 / args.private_size, "accountant": "pld", "adjacency": REPLACE_ONE,
        "epochs": args.epochs, "private_size": args.private_size, "precision": cfg.precision().record(),
        "public_training": {"batch": args.train_batch, "learning_rate": args.train_lr, "dp": False},
        "at_step": {str(step): signal_table(args, grads, labels) for step, grads in sorted(measured.items())},
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(args.out, result)
    print(f"{args.examples} per-example gradients of {result['prompt_numbers']} prompt numbers")
    print("| public steps | B | steps | σ | C | clipped | signal ‖μ_C‖ | noise σC√D/B | signal/noise |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for step, table in result["at_step"].items():
        for r in table["rows"]:
            print(f"| {step} | {r['expected_batch']} | {r['steps']} | {r['noise_multiplier']:.3f} | "
                  f"{r['max_grad_norm']:g} | {100 * r['clipped_share']:.0f}% | {r['signal']:.3g} | {r['noise']:.3g} | "
                  f"{r['signal_to_noise']:.2f} |")
    for step, table in result["at_step"].items():
        norm = table["per_example_norm"]
        print(f"after {step} public steps: norm p10 {norm['p10']:.3g}, median {norm['median']:.3g}, p90 "
              f"{norm['p90']:.3g}; alignment ‖E[g/‖g‖]‖ {table['alignment']:.3f}, class-balanced "
              f"{table['class_alignment']['balanced']:.3f}, per class {table['class_alignment']['per_class']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
