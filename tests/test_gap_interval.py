"""Gap closed and POST − zero-shot with paired-bootstrap intervals over the test examples (issue 17, item 1)."""

import json
import os

import numpy as np
import pytest

from peft_post import report as R

N = 200


def bits(right) -> str:
    """A correctness string with "1" at the indices in `right` (N examples)."""
    v = np.zeros(N, dtype=bool)
    v[list(right)] = True
    return "".join("1" if x else "0" for x in v)


def results(correct: dict, full: bool = True, **overrides) -> dict:
    """Results whose accuracies are the means of `correct` (zero_shot, post, and full_prompt_tuning if `full`);
    student and direct transfer get fixed vectors."""
    correct = {"student_prompt": bits(range(60)), "direct_transfer": bits(range(50)), **correct}
    if not full:
        correct.pop("full_prompt_tuning", None)
    accuracy = {m: R.correctness_vector(v).mean() for m, v in correct.items()}
    accuracy.setdefault("full_prompt_tuning", None)
    return {"target_model": "t", "private_dataset": "p", "num_test_examples": N, "accuracy": accuracy,
            "per_example_correct": correct, **overrides}


# zero-shot right on the first 100 examples; POST on those and 40 more; full PT on those and 80 more.
ZS, POST, FULL = bits(range(100)), bits(range(140)), bits(range(180))


def test_post_right_on_many_more_examples_beats_zero_shot():
    r = results({"zero_shot": ZS, "post": POST, "full_prompt_tuning": FULL})
    d = R.derived_metrics(r)
    lo, hi = d["post_gain_over_zero_shot_ci"]
    assert d["post_gain_over_zero_shot"] == pytest.approx(0.2)
    # Per resample the gain is (how many of the 40 examples were drawn) / N, Binomial(N, 0.2) / N: sd 0.028.
    assert 0.13 < lo < 0.2 < hi < 0.27
    assert d["post_vs_zero_shot"] == "beats" and d["post_beats_zero_shot"] is True
    md = R.render_markdown(r)
    assert "- **POST − zero-shot**: +20.00 percentage points, 95% interval [" in md
    assert "POST beats the target's zero-shot accuracy." in md
    assert d["bootstrap"] == {"method": "paired percentile bootstrap over test examples", "resamples": 2000,
                              "seed": 0, "confidence": 0.95}


def test_post_below_zero_shot_is_said_from_the_interval():
    r = results({"zero_shot": POST, "post": ZS, "full_prompt_tuning": FULL})
    d = R.derived_metrics(r)
    assert d["post_gain_over_zero_shot_ci"][1] < 0 and d["post_vs_zero_shot"] == "below"
    assert d["post_beats_zero_shot"] is False
    assert "POST is below the target's zero-shot accuracy." in R.render_markdown(r)


def test_identical_results_give_the_degenerate_interval_and_within_noise():
    r = results({"zero_shot": ZS, "post": ZS, "full_prompt_tuning": FULL})
    d = R.derived_metrics(r)
    assert d["post_gain_over_zero_shot_ci"] == [0.0, 0.0]  # every resample draws the same examples for both
    assert d["post_vs_zero_shot"] == "within_noise" and d["post_beats_zero_shot"] is False
    assert d["gap_closed"] == 0.0 and d["gap_closed_ci"] == [0.0, 0.0]
    md = R.render_markdown(r)
    assert "+0.00 percentage points, 95% interval [+0.00, +0.00]" in md and "within noise" in md
    assert "beats the target" not in md


def test_a_positive_point_estimate_on_one_example_is_within_noise():
    # POST right on one example more than zero-shot: a resample draws that example k ~ Binomial(N, 1/N) times, and
    # k = 0 has probability 0.37, so the lower end is exactly 0: the gain is not told apart from noise.
    r = results({"zero_shot": ZS, "post": bits(range(101)), "full_prompt_tuning": FULL})
    d = R.derived_metrics(r)
    assert d["post_gain_over_zero_shot"] == pytest.approx(1 / N)
    lo, hi = d["post_gain_over_zero_shot_ci"]
    assert lo == 0.0
    assert hi == pytest.approx(3 / N, abs=1e-12)  # P(k <= 2) = 0.92, P(k <= 3) = 0.98: the 97.5th percentile is k = 3
    assert d["post_vs_zero_shot"] == "within_noise"
    assert "the difference is within noise (the interval includes 0)" in R.render_markdown(r)


def test_symmetric_disagreement_gives_an_interval_centred_on_zero_of_the_known_width():
    # POST and zero-shot each right on 20 examples the other gets wrong: the gain per resample is (a − b) / N with
    # a, b ~ Binomial(N, 0.1) drawn jointly, variance 40 / N² (multinomial, 20 + 20 discordant examples), so the 95%
    # interval is about ±1.96 √40 / N = ±0.062.
    r = results({"zero_shot": bits(range(100)), "post": bits([*range(80), *range(100, 120)]),
                 "full_prompt_tuning": FULL})
    lo, hi = R.derived_metrics(r)["post_gain_over_zero_shot_ci"]
    half = 1.96 * np.sqrt(40) / N
    assert lo < 0 < hi and abs(lo + hi) <= 0.011
    assert hi == pytest.approx(half, rel=0.15) and -lo == pytest.approx(half, rel=0.15)


def test_the_bootstrap_is_deterministic_and_paired():
    correct = {"zero_shot": ZS, "post": POST}
    a, b = R.paired_bootstrap(correct), R.paired_bootstrap(correct)
    assert all(np.array_equal(a[m], b[m]) for m in correct)
    assert not np.array_equal(R.paired_bootstrap(correct, seed=1)["post"], a["post"])
    # Paired: POST is right wherever zero-shot is, so no resample may see POST below zero-shot.
    assert (a["post"] >= a["zero_shot"]).all() and a["post"].shape == (R.BOOTSTRAP_RESAMPLES,)
    r = results({"zero_shot": ZS, "post": POST, "full_prompt_tuning": FULL})
    assert R.derived_metrics(r) == R.derived_metrics(r)
    with pytest.raises(ValueError, match="same examples"):
        R.paired_bootstrap({"zero_shot": "0101", "post": "01"})


def test_gap_closed_interval_contains_the_point_estimate():
    r = results({"zero_shot": ZS, "post": POST, "full_prompt_tuning": FULL})
    d = R.derived_metrics(r)
    assert d["gap_closed"] == pytest.approx(0.5)  # 40 of the 80 examples full PT adds
    lo, hi = d["gap_closed_ci"]
    assert 0.3 < lo < 0.5 < hi < 0.7
    assert d["gap_closed_undefined_share"] == 0.0 and d["full_gain_over_zero_shot_ci"][0] > 0
    md = R.render_markdown(r)
    head = md[md.index("## Headline"):md.index("## Accuracy")]
    assert "**Gap closed**, (POST − zero-shot) / (full PT − zero-shot): **0.50**, " \
           f"95% interval [{lo:.2f}, {hi:.2f}]" in head


def test_without_full_prompt_tuning_gap_closed_is_none_and_the_report_says_so():
    r = results({"zero_shot": ZS, "post": POST}, full=False)
    d = R.derived_metrics(r)
    assert d["gap_closed"] is None and d["gap_closed_ci"] is None and d["full_gain_over_zero_shot_ci"] is None
    assert "--full_baseline true" in d["gap_closed_note"]
    assert d["post_vs_zero_shot"] == "beats"  # POST − zero-shot needs no full PT
    md = R.render_markdown(r)
    assert "**Gap closed**, (POST − zero-shot) / (full PT − zero-shot): not available: full prompt tuning on the " \
           "target did not run" in md


def test_gap_closed_has_no_interval_when_full_pt_is_within_noise_of_zero_shot():
    # Full PT right on one example more: its gain's interval starts at 0, and 37% of the resamples have no gap at all.
    r = results({"zero_shot": ZS, "post": ZS, "full_prompt_tuning": bits(range(101))})
    d = R.derived_metrics(r)
    assert d["gap_closed"] == 0.0 and d["gap_closed_ci"] is None
    assert d["full_gain_over_zero_shot_ci"][0] == 0.0 and 0.25 < d["gap_closed_undefined_share"] < 0.5
    assert "does not exclude 0" in d["gap_closed_note"]
    assert "**0.00**, no interval: full PT − zero-shot has a 95% interval" in R.render_markdown(r)


def test_gap_closed_is_none_when_full_pt_does_not_beat_zero_shot():
    r = results({"zero_shot": POST, "post": FULL, "full_prompt_tuning": ZS})
    d = R.derived_metrics(r)
    assert d["gap_closed"] is None and d["gap_closed_ci"] is None
    assert "does not beat zero-shot" in d["gap_closed_note"]
    assert d["full_gain_over_zero_shot_ci"][1] < 0


def test_old_reports_without_per_example_results_still_load_and_render(tmp_path):
    old = {"target_model": "t", "private_dataset": "p", "num_test_examples": 1000,
           "accuracy": {"zero_shot": 0.773, "full_prompt_tuning": 0.844, "student_prompt": 0.699,
                        "direct_transfer": 0.628, "post": 0.805},
           "schema_version": 1,
           "derived": {"post_gain_over_zero_shot": 0.032, "post_beats_zero_shot": True, "gap_closed": 0.45}}
    r = R.POSTResults.from_dict(old)
    assert r.per_example_correct == {}
    d = R.derived_metrics(r)
    assert d["gap_closed"] == pytest.approx(0.032 / 0.071) and d["gap_closed_ci"] is None
    assert d["post_gain_over_zero_shot_ci"] is None and d["post_vs_zero_shot"] is None and d["bootstrap"] is None
    md = R.render_markdown(old)
    assert "**0.45**, no interval: this report has no per-example test results." in md
    assert "no interval is available (this report has no per-example test results), so it does not say whether " \
           "POST beats zero-shot." in md
    paths = R.write_report(old, str(tmp_path), plot=False)
    assert R.POSTResults.from_dict(json.loads(open(paths["json"]).read())).to_dict() == r.to_dict()


def test_per_example_results_round_trip_and_are_checked(tmp_path):
    r = results({"zero_shot": ZS, "post": POST, "full_prompt_tuning": FULL})
    paths = R.write_report(r, str(tmp_path), plot=False)
    data = json.loads(open(paths["json"]).read())
    assert data["per_example_correct"]["post"] == POST and data["derived"]["gap_closed_ci"] is not None
    assert R.POSTResults.from_dict(data).to_dict() == R.POSTResults.from_dict(r).to_dict()
    as_list = results({"zero_shot": [int(c) for c in ZS], "post": POST})
    assert R.POSTResults.from_dict(as_list).per_example_correct["zero_shot"] == ZS  # stored as a string
    for bad, match in [({"post": POST[:-1]}, "has 199 examples"), ({"post": ZS}, "must come from the same scoring"),
                       ({"post": POST.replace("0", "x")}, "only '0' and '1'"),
                       ({"full_prompt_tuning": FULL}, "has no accuracy")]:
        broken = results({"zero_shot": ZS, "post": POST}, full=False)
        broken["per_example_correct"].update(bad)
        with pytest.raises(ValueError, match=match):
            R.write_report(broken, str(tmp_path / "bad"), plot=False)
    assert not (tmp_path / "bad").exists()


def test_the_hub_card_never_carries_per_example_results():
    from peft_post import build_model_card
    from peft_post.testing import tiny_post_config

    secret = "1011011101"
    card = str(build_model_card(tiny_post_config("gpt2"), "alice/p", base_model="org/base", evaluation={
        "POST": {"accuracy": 0.7, "num_examples": 10, "per_example_correct": secret}}))
    assert secret not in card and "per_example" not in card


def test_a_run_reports_the_intervals_and_rescores_stale_cached_scores(tiny_run, monkeypatch):
    import peft_post.hub
    from peft_post.cli import main

    run_dir, args = tiny_run
    args = [*args, "--full_baseline", "true", "--dp", "false"]
    assert main(["run", *args]) == 0
    report = json.loads(open(os.path.join(run_dir, "report.json")).read())
    evaluation = json.loads(open(os.path.join(run_dir, "evaluation.json")).read())["results"]
    correct = report["per_example_correct"]
    assert sorted(correct) == sorted(R.METHODS)
    for m, v in correct.items():
        assert len(v) == report["num_test_examples"] == 10 and v == evaluation[m]["per_example_correct"]
        assert sum(map(int, v)) / 10 == pytest.approx(report["accuracy"][m])
    d = report["derived"]
    assert d["bootstrap"]["resamples"] == R.BOOTSTRAP_RESAMPLES
    assert len(d["post_gain_over_zero_shot_ci"]) == 2 and d["post_vs_zero_shot"] in ("beats", "below", "within_noise")
    assert d["full_gain_over_zero_shot_ci"] is not None
    assert d["gap_closed_ci"] is not None or d["gap_closed_note"]  # a tiny run's full PT may not beat zero-shot
    assert "## Headline" in open(os.path.join(run_dir, "report.md")).read()
    # Nothing the provider receives holds it: the released prompt folders.
    for folder in ("source_prompt", "transferred_prompt", "full_prompt"):
        for name in os.listdir(os.path.join(run_dir, folder)):
            assert b"per_example" not in open(os.path.join(run_dir, folder, name), "rb").read(), (folder, name)
    # `peft-post push --report` puts the accuracies on the card, never the per-example results.
    pushed = {}
    monkeypatch.setattr(peft_post.hub, "push_adapter_folder", lambda *a, **kw: pushed.update(kw) or "ok")
    assert main(["push", "--adapter", os.path.join(run_dir, "transferred_prompt"), "--repo_id", "alice/p",
                 "--report", os.path.join(run_dir, "report.json")]) == 0
    assert pushed["evaluation"] == {m: a for m, a in report["accuracy"].items() if a is not None}

    # Scores cached before per-example results were kept are scored again, not reused without them.
    scores_path = os.path.join(run_dir, "private", "test_scores.json")
    scores = json.loads(open(scores_path).read())
    for entries in scores.values():
        for entry in entries.values():
            del entry["per_example_correct"]
    open(scores_path, "w").write(json.dumps(scores))
    stale = json.loads(open(os.path.join(run_dir, "evaluation.json")).read())
    for entry in stale["results"].values():
        entry.pop("per_example_correct", None)
    open(os.path.join(run_dir, "evaluation.json"), "w").write(json.dumps(stale))
    assert main(["run", *args]) == 0
    again = json.loads(open(os.path.join(run_dir, "report.json")).read())
    assert again["per_example_correct"] == correct
    assert {k: v for k, v in again["derived"].items() if k != "total_wall_time_s"} == \
        {k: v for k, v in d.items() if k != "total_wall_time_s"}
    assert {s["name"]: s["reused"] for s in again["stages"]}["evaluate"] is False
    rescored = json.loads(open(scores_path).read())
    assert all("per_example_correct" in e for entries in rescored.values() for e in entries.values())
