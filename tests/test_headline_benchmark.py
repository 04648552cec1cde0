"""benchmarks/headline.py on synthetic run reports: means over seeds, gap closed, and its two-level interval."""

import json
import pathlib

import numpy as np
import pytest

from benchmarks import headline


def _bits(rng, n, p):
    return "".join("1" if x else "0" for x in rng.random(n) < p)


def _run(tmp_path, name, seed, dp=False, n=400, rates=(0.3, 0.9, 0.6, 0.25, 0.7)):
    rng = np.random.default_rng(seed)
    correct = {m: _bits(rng, n, p) for m, p in zip(headline.METHODS, rates)}
    report = {"private_dataset": "embedded:trec", "seed": seed, "num_test_examples": n, "transfer_alpha": 0.5,
              "task_kind": "classification", "per_example_correct": correct,
              "accuracy": {m: bits.count("1") / n for m, bits in correct.items()},
              "privacy": {"epsilon": 8.0} if dp else None}
    folder = tmp_path / name
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(report))
    return str(folder), report


def test_rows_average_seeds_and_give_gap_closed_with_an_interval(tmp_path):
    runs = [_run(tmp_path, f"s{s}", s) for s in range(3)] + [_run(tmp_path, "dp0", 7, dp=True)]
    out = tmp_path / "headline.json"
    rows = headline.main(["--runs", *[d for d, _ in runs], "--out", str(out)])
    assert [(r["dp"], r["seeds"]) for r in rows] == [(False, [0, 1, 2]), (True, [7])]
    nodp = rows[0]
    mean = {m: np.mean([r["accuracy"][m] for _, r in runs[:3]]) for m in headline.METHODS}
    assert nodp["post"] == pytest.approx(mean["post"])
    expected = (mean["post"] - mean["zero_shot"]) / (mean["full_prompt_tuning"] - mean["zero_shot"])
    assert nodp["gap_closed"] == pytest.approx(expected)
    lo, hi = nodp["gap_closed_ci"]
    assert lo < nodp["gap_closed"] < hi and hi - lo < 0.2
    # One seed of 400 examples gives a wider interval than three.
    dp_lo, dp_hi = rows[1]["gap_closed_ci"]
    assert dp_hi - dp_lo > hi - lo
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["gap_closed"] == nodp["gap_closed"] and "headline.py" in saved["command"]
    assert "| trec | no | 3 |" in saved["markdown"]


def test_a_run_without_per_example_results_or_baseline_is_refused(tmp_path):
    folder, report = _run(tmp_path, "s0", 0)
    del report["per_example_correct"]["full_prompt_tuning"]
    (tmp_path / "s0" / "report.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="full_prompt_tuning"):
        headline.main(["--runs", folder, "--out", str(tmp_path / "h.json")])


def test_runs_without_a_baseline_borrow_one_on_the_same_test_examples_only(tmp_path):
    donor, donor_report = _run(tmp_path, "s0", 0)
    borrowers = [_run(tmp_path, f"s{s}", s) for s in (1, 2)]
    for folder, report in borrowers:
        del report["per_example_correct"]["full_prompt_tuning"], report["accuracy"]["full_prompt_tuning"]
        # The same test examples: zero-shot is deterministic, so its bits equal the donor's.
        report["per_example_correct"]["zero_shot"] = donor_report["per_example_correct"]["zero_shot"]
        (pathlib.Path(folder) / "report.json").write_text(json.dumps(report))
    runs = [donor] + [d for d, _ in borrowers]
    with pytest.raises(SystemExit, match="full-baseline-from"):
        headline.main(["--runs", *runs, "--out", str(tmp_path / "h.json")])
    # A run of another task kind on the same questions (equal zero-shot bits) is never the donor.
    generation, _ = _run(tmp_path, "gen", 5)
    accuracy = {**donor_report["accuracy"], "full_prompt_tuning": 0.01}
    (tmp_path / "gen" / "report.json").write_text(json.dumps(
        {**donor_report, "task_kind": "generation", "accuracy": accuracy}))
    (row,) = headline.main(["--runs", *runs, "--full-baseline-from", generation, donor,
                            "--out", str(tmp_path / "h.json")])
    assert row["full_prompt_tuning"] == pytest.approx(donor_report["accuracy"]["full_prompt_tuning"])
    assert row["full_prompt_tuning_from"] == [headline.portable_path(donor)] * 3 and row["seeds"] == [0, 1, 2]
    # Other test examples (different zero-shot results) are refused.
    other, _ = _run(tmp_path, "s9", 9)
    report = json.loads((tmp_path / "s9" / "report.json").read_text())
    del report["per_example_correct"]["full_prompt_tuning"]
    (tmp_path / "s9" / "report.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="cannot be borrowed"):
        headline.main(["--runs", other, "--full-baseline-from", donor, "--out", str(tmp_path / "h.json")])
