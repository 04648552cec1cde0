"""The headline table over seeds: gap closed per task, with a bootstrap over seeds and test examples.

Reads finished `peft-post run` folders (their `report.json`, which must hold per-example results and a full
prompt-tuning baseline), groups them by (private task, DP or not, ε, task kind), and writes one row per group:

    python benchmarks/headline.py --runs runs/trec-s0 runs/trec-s1 runs/trec-s2 runs/trec-dp-s0 ... \\
        --out benchmarks/results/headline.json

Accuracies are means over the group's seeds (fractions). ``gap_closed`` = (POST − zero-shot) / (full PT −
zero-shot) of those means. ``gap_closed_ci`` is a 95% percentile interval from a two-level bootstrap: each resample
draws the seeds with replacement and, within each drawn seed, its test examples with replacement, the same indices for
every method of that seed (paired). Resamples where full PT does not beat zero-shot are left out and their share is
reported, as in the run's own report; with one seed it is the report's example bootstrap.

``--full-baseline-from RUN...`` lets runs made without ``--full_baseline`` borrow the full prompt tuning of the RUN
on their task and test examples (checked by their zero-shot results). The denominator then has one seed's spread
only; the row's ``full_prompt_tuning_from`` says which run each baseline came from.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Optional, Sequence

import numpy as np

from peft_post.assets import portable_path
from peft_post.io import atomic_write_json
from peft_post.report import correctness_vector, percentile_interval

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "headline.json")
METHODS = ("zero_shot", "full_prompt_tuning", "student_prompt", "direct_transfer", "post")
RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def read_report(run_dir: str, need_full_baseline: bool = True) -> dict:
    path = os.path.join(run_dir, "report.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{run_dir}: no report.json; give finished `peft-post run` folders.")
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    needed = ("zero_shot", "post") + (("full_prompt_tuning",) if need_full_baseline else ())
    missing = [m for m in needed if m not in report.get("per_example_correct", {})]
    if missing:
        raise SystemExit(f"{run_dir}: report.json has no per-example results for {missing} (a run with "
                         "--full_baseline true, made by a version that keeps them; or name one with "
                         "--full-baseline-from).")
    return report


def borrow_full_baseline(report: dict, donors: dict, run_dir: str) -> dict:
    """`report` with the full prompt tuning (score and per-example bits) of the first run in `donors` ({run folder:
    report}) on the same task and test examples, where it has none of its own.

    The same test examples: the donor's zero-shot bits must equal the run's (zero-shot is deterministic, so equal bits
    over the same test set in the same order; other examples or another order would differ). DP may differ: full
    prompt tuning is the non-private upper bound either way."""
    method = "full_prompt_tuning"
    if method in report.get("per_example_correct", {}):
        return report
    task, _, _, kind = group_key(report)
    matches = [d for d, donor in donors.items()
               if (group_key(donor)[0], group_key(donor)[3]) == (task, kind)
               and donor["per_example_correct"]["zero_shot"] == report["per_example_correct"]["zero_shot"]]
    if not matches:
        raise SystemExit(f"{run_dir}: no --full-baseline-from run has its task and test examples (task, kind or "
                         "zero-shot results differ), so its full prompt tuning cannot be borrowed.")
    donor = donors[matches[0]]
    return {**report, "accuracy": {**report["accuracy"], method: donor["accuracy"][method]},
            "per_example_correct": {**report["per_example_correct"], method: donor["per_example_correct"][method]},
            "full_prompt_tuning_from": portable_path(matches[0])}


def group_key(report: dict) -> tuple:
    privacy = report.get("privacy")
    return (report["private_dataset"].replace("embedded:", ""), privacy is not None,
            None if privacy is None else round(float(privacy["epsilon"]), 3), report.get("task_kind", "classification"))


def two_level_bootstrap(runs: Sequence[dict], methods: Sequence[str], resamples: int = RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> dict[str, np.ndarray]:
    """{method: (resamples,) mean accuracy} over resampled seeds and, within each, resampled test examples.

    `runs` are the reports of one group; each method's correctness vectors must have one length per run."""
    rng = np.random.default_rng(seed)
    vectors = [{m: correctness_vector(r["per_example_correct"][m]) for m in methods} for r in runs]
    for v in vectors:
        if len({x.size for x in v.values()}) != 1:
            raise ValueError("every method of a run must be scored on the same test examples")
    out = {m: np.zeros(resamples) for m in methods}
    k = len(runs)
    for i in range(resamples):
        chosen = rng.integers(0, k, size=k)
        for s in chosen:
            n = next(iter(vectors[s].values())).size
            idx = rng.integers(0, n, size=n)
            for m in methods:
                out[m][i] += vectors[s][m][idx].mean() / k
    return out


def headline_row(runs: Sequence[dict], run_dirs: Sequence[str]) -> dict:
    task, dp, epsilon, kind = group_key(runs[0])
    scored = [m for m in METHODS if all(r["accuracy"].get(m) is not None for r in runs)]
    mean = {m: float(np.mean([r["accuracy"][m] for r in runs])) if m in scored else None for m in METHODS}
    boot = two_level_bootstrap(runs, ("zero_shot", "post", "full_prompt_tuning"))
    gain = boot["post"] - boot["zero_shot"]
    denominator = boot["full_prompt_tuning"] - boot["zero_shot"]
    defined = denominator > 0
    full_gain = mean["full_prompt_tuning"] - mean["zero_shot"]
    gap: Optional[float] = (mean["post"] - mean["zero_shot"]) / full_gain if full_gain > 0 else None
    return {
        "task": task, "task_kind": kind, "dp": dp, "epsilon": epsilon,
        **mean,
        "gap_closed": gap,
        "gap_closed_ci": percentile_interval(gain[defined] / denominator[defined]) if defined.any() else None,
        "gap_closed_undefined_share": float(1 - defined.mean()),
        "post_minus_zero_shot": mean["post"] - mean["zero_shot"],
        "post_minus_zero_shot_ci": percentile_interval(gain),
        "seeds": [r.get("seed") for r in runs],
        # A borrowed baseline is one run's full prompt tuning counted for several seeds: the interval then leaves out
        # the seed-to-seed spread of the denominator.
        "full_prompt_tuning_from": [r.get("full_prompt_tuning_from") or portable_path(d)
                                    for r, d in zip(runs, run_dirs)],
        "student_models": sorted({r.get("student_model") for r in runs if r.get("student_model")}),
        "num_test_examples": [r["num_test_examples"] for r in runs],
        "alpha": [r.get("transfer_alpha") for r in runs],
        "run_dirs": [portable_path(d) for d in run_dirs],
        "commands": [r.get("command") for r in runs],
        "stage_wall_time_s": [{st["name"]: round(st["wall_time_s"], 1) for st in r.get("stages", [])} for r in runs],
        "bootstrap": {"method": "two-level percentile bootstrap: seeds, then test examples (paired)",
                      "resamples": RESAMPLES, "seed": BOOTSTRAP_SEED, "confidence": 0.95},
    }


def markdown(rows: Sequence[dict]) -> str:
    lines = ["| task | DP | seeds | zero-shot | full PT | p_s (student) | direct | POST | gap closed [95% CI] |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    for r in rows:
        ci = "—" if r["gap_closed_ci"] is None else f"[{r['gap_closed_ci'][0]:.2f}, {r['gap_closed_ci'][1]:.2f}]"
        gap = "—" if r["gap_closed"] is None else f"{r['gap_closed']:.2f}"
        task = r["task"] if r["task_kind"] == "classification" else f"{r['task']} ({r['task_kind']}, exact match)"
        lines.append(f"| {task} | {'ε = %g' % r['epsilon'] if r['dp'] else 'no'} | {len(r['seeds'])} | "
                     f"{pct(r['zero_shot'])} | {pct(r['full_prompt_tuning'])} | {pct(r['student_prompt'])} | "
                     f"{pct(r['direct_transfer'])} | {pct(r['post'])} | {gap} {ci} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="finished `peft-post run` folders (with --full_baseline)")
    p.add_argument("--full-baseline-from", nargs="+", default=[],
                   help="finished runs whose full prompt tuning the runs without one borrow (each from the one on "
                        "its task and test examples, checked); the row names where each run's baseline came from")
    p.add_argument("--out", default=RESULT)
    args = p.parse_args(argv)
    donors = {d: read_report(d) for d in args.full_baseline_from}
    groups: dict = {}
    for run_dir in args.runs:
        report = read_report(run_dir, need_full_baseline=not donors)
        if donors:
            report = borrow_full_baseline(report, donors, run_dir)
        groups.setdefault(group_key(report), []).append((report, run_dir))
    rows = [headline_row([r for r, _ in members], [d for _, d in members]) for members in groups.values()]
    table = markdown(rows)
    print(table)
    command = "python benchmarks/headline.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    atomic_write_json(args.out, {"command": command, "rows": rows, "markdown": table})
    return rows


if __name__ == "__main__":
    main()
