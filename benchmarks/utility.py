"""The paper's utility table on Rotten Tomatoes (the `rotten_tomatoes` preset): a grid of `peft-post run`s sharing
every stage they can.

Each cell of the grid (seed × DP or not × public set × α) is an ordinary pipeline run folder under ``--root``. A
cell reuses what its siblings already made by copying their finished stage folders before it runs: the distilled
student lives in the shared cache; the source prompt depends only on (seed, DP); the full-tuning baseline only on
the seed. A copy (`pipeline.copy_stage`) takes the stage's folder, its private record and the cached private test
scores of its prompt, so an α sweep transfers and scores POST (and zero-shot) only. Rerunning the same command
resumes: finished cells are read back, not rerun.

    python benchmarks/utility.py --root runs/utility --seeds 0 --set tune_learning_rate=0.1 \\
        --set transfer_max_steps=120 --dp-set tune_batch_size=128 --dp-set tune_max_steps=40 --dp false true \\
        --alphas heuristic --dp-alphas heuristic 0 0.25 0.5 0.75 --full-baseline
                                               # writes benchmarks/results/utility.json and prints the table

``--set key=value`` sets any `PipelineConfig` field for every cell, ``--dp-set`` for the DP cells only (DP wants a
larger expected batch). The preset is `rotten_tomatoes`, the default when the committed tables were made, unless
``--set preset=...`` names another. A root keeps the settings it was made with: other settings need another
``--root``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time


from peft_post.assets import portable_path
from peft_post.io import atomic_write_json
from peft_post.pipeline import (FULL_TUNING_FALLBACKS, PipelineConfig, copy_stage, parse_overrides,
                                rename_legacy_fields, run_pipeline, stage_record)
from peft_post.report import derived_metrics

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "utility.json")
METHODS = ("zero_shot", "full_prompt_tuning", "student_prompt", "direct_transfer", "post")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/utility", help="folder of the grid's run folders")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--dp", nargs="+", default=["false", "true"], choices=("false", "true"))
    p.add_argument("--public", nargs="+", default=["embedded:vader_amazon"], help="public transfer sets")
    p.add_argument("--alphas", nargs="+", default=["heuristic"],
                   help="α values in [0, 1], or 'heuristic' for the paper's rule on the public held-out split")
    p.add_argument("--dp-alphas", nargs="+", help="α values of the DP cells (default: --alphas)")
    p.add_argument("--full-baseline", action="store_true", help="also tune a prompt on the target (upper bound)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a PipelineConfig field for every cell, e.g. tune_learning_rate=0.1 (repeatable)")
    p.add_argument("--dp-set", dest="dp_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a PipelineConfig field for the DP cells only, after --set (e.g. a larger expected batch)")
    p.add_argument("--out", default=RESULT)
    return p.parse_args(argv)


# The report's headline numbers kept for each cell (`peft_post.report.derived_metrics`).
HEADLINE_KEYS = ("gap_closed", "gap_closed_ci", "post_gain_over_zero_shot", "post_gain_over_zero_shot_ci",
                 "post_vs_zero_shot")
# The preset the grid runs unless --set names another: the default's when the committed tables were made.
PINNED_PRESET = "rotten_tomatoes"
# The fields each cell sets itself.
GRID_FIELDS = ("run_dir", "seed", "dp", "public_dataset", "transfer_alpha", "full_baseline")


def _overrides(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs as typed `PipelineConfig` field values, checked by building a config with them."""
    try:
        # Pinned, so that the committed commands keep their meaning now that the default preset is TREC.
        values = parse_overrides([f"preset={PINNED_PRESET}", *pairs])
        for key in values:
            if key in GRID_FIELDS:
                raise ValueError(f"the grid sets {key} itself; use the dedicated flag")
        PipelineConfig(**values)
    except ValueError as err:
        raise SystemExit(f"--set: {err}") from None
    return values


def _seed_stage(cell_dir: str, stage: str, donors: list[str]) -> None:
    """Copy finished `stage` ('tune', 'full_tuning') from the first donor run that has it (the stage is identical
    there). Every cell is the user's own run folder, so its private record and test scores come along."""
    if stage_record(cell_dir, stage) is not None:
        return
    for donor in donors:
        if copy_stage(donor, cell_dir, stage):
            return


def _tune_settings(values: dict) -> dict:
    """The prompt-tuning settings a full baseline is made with: its own recipe, each unset field the user's."""
    config = PipelineConfig(**values)
    return {name: config.full_tuning_value(name) for name in FULL_TUNING_FALLBACKS}


def with_full_baseline(results, donor):
    """`results` with the full prompt tuning of `donor` (the same seed's non-private cell): its score, per-example
    bits and token F1, on the same test examples, so the report's gap closed has its baseline.

    The same test examples: the same dataset and size, and equal zero-shot bits (zero-shot is deterministic, so other
    examples or another order would differ), as `headline.borrow_full_baseline` checks."""
    import dataclasses as dc

    zero_shot = "zero_shot"
    if (donor.num_test_examples != results.num_test_examples or donor.private_dataset != results.private_dataset
            or donor.per_example_correct.get(zero_shot) != results.per_example_correct.get(zero_shot)):
        raise SystemExit("the borrowed full prompt tuning was scored on other test examples (dataset, size or "
                         "zero-shot results differ)")
    method = "full_prompt_tuning"
    return dc.replace(
        results, accuracy={**results.accuracy, method: donor.accuracy[method]},
        per_example_correct={**results.per_example_correct, method: donor.per_example_correct[method]},
        token_f1={**results.token_f1, **({method: donor.token_f1[method]} if method in donor.token_f1 else {})},
        notes=results.notes + ["Full prompt tuning (the non-private upper bound) is the same seed's non-private "
                               "cell's: this cell's tuning settings (DP) differ from it."])


def _summary(cells: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (DP, public set, α) setting."""
    groups: dict = {}
    for cell in cells:
        groups.setdefault((cell["dp"], cell["public_dataset"], cell["alpha_setting"]), []).append(cell)
    rows = []
    for (dp, public, alpha), members in groups.items():
        row = {"dp": dp, "public_dataset": public, "alpha_setting": alpha, "seeds": [m["seed"] for m in members],
               "alpha": [m["alpha"] for m in members]}
        for method in METHODS:
            values = [m["accuracy"][method] for m in members if m["accuracy"].get(method) is not None]
            if values:
                row[method] = {"mean": statistics.fmean(values),
                               "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
        if row.get("full_prompt_tuning") and row.get("post"):
            row["post_recovers_full"] = row["post"]["mean"] / row["full_prompt_tuning"]["mean"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| DP | public | α | " + " | ".join(METHODS) + " |"
    lines = [head, "|" + "---|" * (3 + len(METHODS))]
    for row in rows:
        cells = []
        for method in METHODS:
            stat = row.get(method)
            cells.append("—" if stat is None else
                         f"{100 * stat['mean']:.1f}" + (f" ± {100 * stat['std']:.1f}" if stat["n"] > 1 else ""))
        alpha = row["alpha_setting"] if row["alpha_setting"] != "heuristic" else \
            "heuristic (" + ", ".join(f"{a:.2f}" for a in row["alpha"]) + ")"
        dp = "ε = 8" if row["dp"] else "no"
        public = row["public_dataset"].replace("embedded:", "")
        lines.append(f"| {dp} | {public} | {alpha} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    overrides = _overrides(args.overrides)
    dp_overrides = _overrides(args.overrides + args.dp_overrides)
    os.makedirs(args.root, exist_ok=True)
    grid_file = os.path.join(args.root, "grid.json")
    # The resolved settings, not the flags: a preset that changed since the root was made changes its cells too.
    settings = {"config": dataclasses.asdict(PipelineConfig(**overrides)),
                "dp_config": dataclasses.asdict(PipelineConfig(**dp_overrides))}
    if os.path.isfile(grid_file):
        with open(grid_file, encoding="utf-8") as f:
            previous = json.load(f)
        if "config" in previous:
            previous = {**previous, **{part: rename_legacy_fields(previous[part]) for part in ("config", "dp_config")}}
            # The preset's name is no setting (roots made before the pin say "default" for the same values).
            changed = sorted({k for part in ("config", "dp_config") for k in set(settings[part]) | set(previous[part])
                              if k != "preset" and settings[part].get(k) != previous[part].get(k)})
        else:  # a root made before grid.json held the resolved settings: only its flags are known
            flags = [{k: v for k, v in given.items() if (k, v) != ("preset", PINNED_PRESET)}
                     for given in (previous["set"], previous["dp_set"], overrides, dp_overrides)]
            changed = [] if flags[:2] == flags[2:] else ["--set flags"]
        if changed:
            raise SystemExit(f"{args.root} was made with other settings ({', '.join(changed)} differ); use another "
                             "--root for these settings.")
    atomic_write_json(grid_file, {"set": overrides, "dp_set": dp_overrides, **settings})
    command = "python benchmarks/utility.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    cells = []
    for seed in args.seeds:
        full_donors: list[str] = []
        # The seed's full prompt tuning (non-private), once a cell has run it: cells whose full-tuning recipe differs
        # (DP cells whose --dp-set changes the tune_* values it falls back to) borrow its scores instead of tuning the
        # target again with their DP batch.
        full_results = None
        for dp in (d == "true" for d in args.dp):
            tune_donors: list[str] = []
            for public in args.public:
                for alpha in (args.dp_alphas or args.alphas) if dp else args.alphas:
                    name = f"seed{seed}-{'dp' if dp else 'nodp'}-{public.replace('embedded:', '').replace('/', '_')}"
                    cell_dir = os.path.join(args.root, f"{name}-alpha-{alpha}")
                    os.makedirs(cell_dir, exist_ok=True)
                    _seed_stage(cell_dir, "tune", tune_donors)
                    borrow = args.full_baseline and full_results is not None and \
                        _tune_settings(dp_overrides if dp else overrides) != _tune_settings(overrides)
                    if args.full_baseline and not borrow:
                        _seed_stage(cell_dir, "full_tuning", full_donors)
                    cfg = PipelineConfig(**(dp_overrides if dp else overrides)).with_overrides(dict(
                        run_dir=cell_dir, seed=int(seed), dp=dp, public_dataset=public,
                        full_baseline=args.full_baseline and not borrow,
                        **({} if alpha == "heuristic" else {"transfer_alpha": float(alpha)})))
                    cell_start = time.perf_counter()
                    results = run_pipeline(cfg, command=command)
                    if borrow:
                        results = with_full_baseline(results, full_results)
                    elif args.full_baseline and full_results is None:
                        full_results = results
                    report = results.to_dict()
                    derived = derived_metrics(results)
                    cells.append({
                        "run_dir": portable_path(cell_dir), "seed": seed, "dp": dp, "public_dataset": public,
                        "alpha_setting": alpha, "task_kind": report["task_kind"],
                        "alpha": report["transfer_alpha"], "accuracy": report["accuracy"],
                        "token_f1": report["token_f1"],
                        "full_prompt_tuning_from": portable_path(full_donors[0]) if borrow else None,
                        "headline": {k: derived[k] for k in HEADLINE_KEYS},
                        "privacy": report["privacy"], "stages": report["stages"], "notes": report["notes"],
                        "cell_wall_time_s": time.perf_counter() - cell_start,
                    })
                    tune_donors.append(cell_dir)
                    full_donors.append(cell_dir)
                    print(f"[utility] {cell_dir}: " + ", ".join(
                        f"{m} {100 * v:.1f}" for m, v in report["accuracy"].items() if v is not None), flush=True)
    rows = _summary(cells)
    table = markdown(rows)
    print(table)
    atomic_write_json(args.out, {
        "command": command, "machine": "2 CPU cores (shared), no GPU",
        "overrides": {"set": overrides, "dp_set": dp_overrides}, "config": dataclasses.asdict(PipelineConfig(**overrides)),
        "dp_config": dataclasses.asdict(PipelineConfig(**dp_overrides)), "wall_time_s": time.perf_counter() - start,
        "summary": rows, "cells": cells, "markdown": table,
    })


if __name__ == "__main__":
    main()
