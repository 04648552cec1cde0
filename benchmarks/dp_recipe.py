"""Choose the DP prompt-tuning recipe on a public proxy task, never on the private data (issue 17 item 4).

The user's DP hyperparameters (expected batch B, epochs E, learning rate) must not be chosen on the private data:
trying recipes there would spend privacy that no ledger counts. So each recipe is tried on a *public* labelled task
instead, the proxy, on the same student and at the same ε and δ, and the recipe whose DP prompt scores best on the
proxy's held-out split is the one the private run uses. "Best" is macro-F1, not accuracy: the proxy's labels are
imbalanced (VADER tweets: 69% positive), and a prompt that learned only the label bias, the failure of small DP
batches on Rotten Tomatoes, scores the majority share in accuracy but about 0.41 in macro-F1.

A recipe is written ``B:E:LR``. It is run on the proxy at sample rate q = B / N_proxy for round(E / q) steps, the
noise multiplier calibrated to ``--epsilon`` by the pipeline's accountant; the private run then uses the same B, E
and LR, so its steps are round(E · N_private / B). Each row gives the proxy held-out accuracy of the DP prompt, its
paired 95% interval against the student's zero-shot on the same examples, its macro-F1, the privacy spent (ε, δ,
σ, C, q, steps) and its wall time. The chosen recipe has the best macro-F1; rows within a point of it are named.

    python benchmarks/dp_recipe.py --student runs/students/trec-300 --proxy embedded:vader_tweets \\
        --heldout 500 --recipes 128:1.33:0.1 128:1.33:0.01 512:4:0.03 --threads 1 \\
        --out benchmarks/results/dp_recipe_trec.json

Rerunning the same command resumes: rows already in ``--out`` with the same settings are kept, not rerun, and so
are rows of the files given to ``--reuse`` (a grid split across processes, one ``--out`` each, then gathered).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import time

from peft_post.assets import portable_path, portable_source
from peft_post.io import atomic_write_json, read_json_object
from peft_post.pipeline import (PipelineConfig, load_model, load_tokenizer, new_prompted_model, parse_overrides,
                                private_examples, score_methods, tune_prompt)
from peft_post.report import paired_bootstrap, percentile_interval, zero_shot_verdict

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dp_recipe.json")
# The proxy task's defaults: VADER tweets, binary sentiment (short texts, about 4k of them, like TREC's questions).
PROXY_DEFAULTS = {"template": "Tweet: {text}\nSentiment:", "label_words": "negative|positive",
                  "prompt_init_text": "Classify the sentiment of this tweet"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    expected_batch: int
    epochs: float
    learning_rate: float

    @classmethod
    def parse(cls, text: str) -> "Recipe":
        try:
            b, e, lr = text.split(":")
            recipe = cls(int(b), float(e), float(lr))
        except ValueError:
            raise SystemExit(f"--recipes: {text!r} is not B:E:LR (e.g. 512:4:0.03)") from None
        if recipe.expected_batch < 1 or recipe.epochs <= 0 or recipe.learning_rate <= 0:
            raise SystemExit(f"--recipes: {text!r} needs B >= 1, E > 0 and LR > 0")
        return recipe

    @property
    def name(self) -> str:
        return f"{self.expected_batch}:{self.epochs:g}:{self.learning_rate:g}"

    def steps(self, num_examples: int) -> int:
        """Steps of E epochs at sample rate B / N."""
        return max(1, round(self.epochs * num_examples / self.expected_batch))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="the distilled student (a folder), on which the user tunes")
    p.add_argument("--proxy", default="embedded:vader_tweets", help="a public labelled dataset (the proxy task)")
    p.add_argument("--heldout", type=int, default=500, help="proxy examples held out to score each recipe")
    p.add_argument("--recipes", nargs="+", default=[],
                   help="recipes B:E:LR (expected batch, epochs, lr); required unless --non-private-reference is given")
    p.add_argument("--non-private-reference", metavar="B:E:LR",
                   help="also tune once without DP (batch B): how far the proxy lets a prompt get past its label "
                        "bias at all, so a DP row at the bias level is read as DP's limit, not the proxy's")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--private-size", type=int,
                   help="N of the private training split, to give each recipe's private steps (public: q is reported)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a PipelineConfig field (template, label_words, prompt_init_text, ...) for the proxy runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default=RESULT)
    p.add_argument("--reuse", nargs="+", default=[], help="earlier result files whose rows (same settings) are kept")
    args = p.parse_args(argv)
    if not args.recipes and not args.non_private_reference:
        raise SystemExit("--recipes: give at least one recipe B:E:LR (or only --non-private-reference B:E:LR)")
    args.recipes = [Recipe.parse(r) for r in args.recipes]
    if args.non_private_reference:
        args.non_private_reference = Recipe.parse(args.non_private_reference)
    try:
        args.overrides = parse_overrides(args.overrides)
    except ValueError as err:
        raise SystemExit(f"--set: {err}") from None
    if not os.path.isdir(args.student):
        raise SystemExit(f"--student {args.student!r} is not a folder; give a distilled student (a run's student, or "
                         "a copy of $PEFT_POST_CACHE/students/<key>)")
    return args


def proxy_config(args, run_dir: str) -> PipelineConfig:
    # The budgets the committed rows were made with (the default preset's until TREC replaced it); the proxy's own
    # template and label words replace the task's.
    values = {"preset": "rotten_tomatoes", **PROXY_DEFAULTS, **args.overrides}
    return PipelineConfig(run_dir=run_dir, student_model=args.student, private_dataset=args.proxy,
                          private_test_size=args.heldout, dp=True, dp_target_epsilon=args.epsilon, seed=args.seed,
                          threads=args.threads, full_baseline=False, **values)


def settings_of(args) -> dict:
    """What a finished row depends on besides its recipe: a row made under other settings is rerun."""
    return {"student": portable_path(args.student), "proxy": portable_source(args.proxy), "heldout": args.heldout,
            "epsilon": args.epsilon, "seed": args.seed, "overrides": {**PROXY_DEFAULTS, **args.overrides}}


def recipe_row(cfg: PipelineConfig, recipe: Recipe, tokenizer, train, test, zero_shot_bits: str, work: str,
               dp: bool = True) -> dict:
    cfg = dataclasses.replace(cfg, tune_batch_size=recipe.expected_batch, tune_learning_rate=recipe.learning_rate,
                              tune_max_steps=recipe.steps(len(train)))
    start = time.perf_counter()
    model = new_prompted_model(cfg.student_model, cfg.post_config(cfg.student_model), cfg.masked, cfg.seed,
                               cfg.precision(), "frozen")
    folder = os.path.join(work, ("dp_" if dp else "non_private_") + recipe.name.replace(":", "_"))
    trainer, record = tune_prompt(cfg, model, tokenizer, train, folder, dp=dp)
    tune_s = time.perf_counter() - start
    score = score_methods(cfg, tokenizer, test, {"student_prompt": trainer.model})["student_prompt"]
    resampled = paired_bootstrap({"dp_prompt": score["per_example_correct"], "zero_shot": zero_shot_bits})
    gain = resampled["dp_prompt"] - resampled["zero_shot"]
    interval = percentile_interval(gain)
    return {"recipe": recipe.name, "expected_batch": recipe.expected_batch, "epochs": recipe.epochs,
            "learning_rate": recipe.learning_rate, "proxy_steps": record["steps"], "privacy": record["privacy"],
            "heldout_accuracy": score["accuracy"], "heldout_macro_f1": score["macro_f1"],
            "gain_over_zero_shot_ci": interval,
            "verdict": zero_shot_verdict(interval), "tune_wall_time_s": round(tune_s, 1),
            "wall_time_s": round(time.perf_counter() - start, 1)}


def choose(rows: list[dict]) -> dict:
    """The recipe with the best proxy macro-F1; ties go to the cheaper one (fewer epochs, then smaller batch)."""
    best = max(rows, key=lambda r: (r["heldout_macro_f1"], -r["epochs"], -r["expected_batch"]))
    close = [r["recipe"] for r in rows if r is not best and r["heldout_macro_f1"] >= best["heldout_macro_f1"] - 0.01]
    return {"recipe": best["recipe"], "expected_batch": best["expected_batch"], "epochs": best["epochs"],
            "learning_rate": best["learning_rate"], "heldout_macro_f1": best["heldout_macro_f1"],
            "heldout_accuracy": best["heldout_accuracy"], "within_a_point": close}


def markdown(result: dict) -> str:
    lines = ["| recipe B:E:LR | proxy steps | σ | ε | held-out macro-F1 | held-out acc | − zero-shot [95% CI] "
             "| wall (s) |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in result["rows"]:
        lo, hi = r["gain_over_zero_shot_ci"]
        gain = 100 * (r["heldout_accuracy"] - result["student_zero_shot"])
        lines.append(f"| {r['recipe']} | {r['proxy_steps']} | {r['privacy']['noise_multiplier']:.3f} | "
                     f"{r['privacy']['epsilon']:.2f} | {100 * r['heldout_macro_f1']:.1f} | "
                     f"{100 * r['heldout_accuracy']:.1f} | {gain:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}] | "
                     f"{r['wall_time_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = settings_of(args)
    previous, done, known_reference = None, {}, None
    for path in [*args.reuse, args.out]:
        if os.path.exists(path):
            earlier = read_json_object(path, "delete it to start over")
            if earlier.get("settings") == settings:
                previous = earlier
                known_reference = earlier.get("non_private_reference") or known_reference
                # Each row names the command that computed it (a gathered file's own command computed none).
                for row in earlier["rows"]:
                    done[row["recipe"]] = {**row, "command": row.get("command", earlier["command"])}
    with tempfile.TemporaryDirectory(prefix="dp_recipe_") as work:
        cfg = proxy_config(args, work)
        train, test = private_examples(cfg, "train"), private_examples(cfg, "test")
        tokenizer = load_tokenizer(args.student)
        if previous and done:
            zero_shot = {"accuracy": previous["student_zero_shot"], "macro_f1": previous["student_zero_shot_macro_f1"],
                         "per_example_correct": previous["zero_shot_bits"]}
        else:
            zero_shot = score_methods(cfg, tokenizer, test, {"zero_shot": lambda: load_model(
                args.student, cfg.masked, cfg.precision(), "frozen")})["zero_shot"]
        words = ["benchmarks/dp_recipe.py", *(sys.argv[1:] if argv is None else argv)]
        result = {"command": "python " + " ".join(shlex.quote(w) for w in words),
                  "settings": settings, "num_proxy_train": len(train), "num_proxy_heldout": len(test),
                  "precision": cfg.precision().record(), "student_zero_shot": zero_shot["accuracy"],
                  "student_zero_shot_macro_f1": zero_shot["macro_f1"],
                  "zero_shot_bits": zero_shot["per_example_correct"], "rows": []}
        reference, row = args.non_private_reference, known_reference
        if reference:
            if row is None or row["recipe"] != reference.name:
                row = {**recipe_row(cfg, reference, tokenizer, train, test, zero_shot["per_example_correct"], work,
                                    dp=False), "command": result["command"]}
        if row is not None:
            result["non_private_reference"] = row
            print(f"non-private {row['recipe']}: proxy held-out macro-F1 {100 * row['heldout_macro_f1']:.1f}, "
                  f"accuracy {100 * row['heldout_accuracy']:.1f}%", flush=True)
            atomic_write_json(args.out, result)
        for recipe in args.recipes:
            row = done.get(recipe.name)
            if row is None:
                row = {**recipe_row(cfg, recipe, tokenizer, train, test, zero_shot["per_example_correct"], work),
                       "command": result["command"]}
            if args.private_size:
                row["private_steps"] = recipe.steps(args.private_size)
            result["rows"].append(row)
            print(f"{recipe.name}: proxy held-out macro-F1 {100 * row['heldout_macro_f1']:.1f}, accuracy "
                  f"{100 * row['heldout_accuracy']:.1f}% (student zero-shot {100 * zero_shot['macro_f1']:.1f}, "
                  f"{100 * zero_shot['accuracy']:.1f}%), {row['wall_time_s']:.0f} s", flush=True)
            result["chosen"] = choose(result["rows"])
            atomic_write_json(args.out, result)
    if result["rows"]:
        print(markdown(result))
        print(f"chosen: {result['chosen']['recipe']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
