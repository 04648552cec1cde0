"""The POST report: schema validation, derived numbers by formula, files written atomically and consistent."""

import json
import os
import struct
import zlib

import numpy as np
import pytest

from peft_post import profiling as P
from peft_post import report as R

LEDGER = {"epsilon": 8.0, "delta": 1e-4, "accountant": "prv", "noise_multiplier": 0.731, "max_grad_norm": 1.0,
          "sample_rate": 0.0136, "steps": 300}


def results(**overrides):
    base = {
        "target_model": "embedded:smollm2-135m-instruct",
        "student_model": "runs/x/student",
        "private_dataset": "embedded:rotten_tomatoes",
        "public_dataset": "embedded:vader_amazon",
        "num_public_examples": 128,
        "num_test_examples": 1000,
        "accuracy": {"zero_shot": 0.773, "full_prompt_tuning": 0.844, "student_prompt": 0.699,
                     "direct_transfer": 0.628, "post": 0.805},
        "privacy": dict(LEDGER),
        "stages": [
            {"name": "distill", "wall_time_s": 700.0, "peak_memory_mb": 2900.0, "reused": True},
            {"name": "tune", "wall_time_s": 120.0, "peak_memory_mb": 1300.0},
            {"name": "transfer", "wall_time_s": 240.0, "peak_memory_mb": 2600.0},
            {"name": "evaluate", "wall_time_s": 90.0, "peak_memory_mb": 1500.0},
            {"name": "full_tuning", "wall_time_s": 540.0, "peak_memory_mb": 2800.0},
        ],
        "transfer_curve": [{"step": s, "loss": 3.0 / (1 + s / 50), "public_accuracy": (0.6 + s / 2000 if s % 100 == 0
                                                                                         else None)}
                           for s in range(0, 301, 25)],
        "transfer_alpha": 0.4,
        "preset": "default",
        "seed": 0,
        "command": "peft-post run",
        "notes": ["measured on 2 CPU cores"],
    }
    base.update(overrides)
    return base


def test_derived_numbers_by_formula():
    d = R.derived_metrics(results())
    assert d["post_gain_over_zero_shot"] == pytest.approx(0.805 - 0.773)
    # Whether POST beats zero-shot is said from an interval only; these results carry no per-example data.
    assert d["post_beats_zero_shot"] is None and d["post_gain_over_zero_shot_ci"] is None
    assert d["post_gain_over_direct_transfer"] == pytest.approx(0.805 - 0.628)
    assert d["gap_closed"] == pytest.approx((0.805 - 0.773) / (0.844 - 0.773))
    assert d["time_ratio"] == pytest.approx((120 + 240) / 540)
    assert d["speedup"] == pytest.approx(540 / 360)
    assert d["total_wall_time_s"] == pytest.approx(120 + 240 + 90 + 540)  # the reused distillation is not counted


def test_without_full_baseline_no_ratio_and_no_row():
    acc = dict(results()["accuracy"], full_prompt_tuning=None)
    stages = [s for s in results()["stages"] if s["name"] != "full_tuning"]
    r = results(accuracy=acc, stages=stages, privacy=None, notes=["quick preset: accuracy goal not checked"])
    d = R.derived_metrics(r)
    assert d["time_ratio"] is None and d["speedup"] is None and d["gap_closed"] is None
    md = R.render_markdown(r)
    assert "upper bound" not in md and "Differential privacy" not in md and "faster" not in md
    assert "non-private" in md and "quick preset: accuracy goal not checked" in md


def test_post_below_zero_shot_without_per_example_results_gets_no_verdict():
    # The point estimate alone says nothing about noise: without per-example results the report gives the
    # difference and says no interval is available (tests/test_gap_interval.py covers the verdicts from intervals).
    acc = dict(results()["accuracy"], post=0.70)
    md = R.render_markdown(results(accuracy=acc))
    assert "- **POST − zero-shot**: -7.30 percentage points; no interval is available" in md
    assert "beats the target" not in md and "below the target" not in md
    assert R.derived_metrics(results(accuracy=acc))["post_vs_zero_shot"] is None


def _md_table(md: str, header_start: str) -> list[list[str]]:
    lines = md.splitlines()
    i = next(k for k, l in enumerate(lines) if l.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, size, chunks = 8, None, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        chunks.append(kind)
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    return size


def test_write_report_files_consistent(tmp_path):
    paths = R.write_report(results(), str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run")) == ["report.json", "report.md", "report.png"]  # no temp files left
    data = json.loads(open(paths["json"]).read())
    assert data["schema_version"] == R.SCHEMA_VERSION
    assert R.POSTResults.from_dict(data).to_dict() == R.POSTResults.from_dict(results()).to_dict()  # round trip
    md = open(paths["md"]).read()

    acc_rows = _md_table(md, "| Method |")
    by_label = {row[0]: row for row in acc_rows}
    assert [row[0] for row in acc_rows] == [R.METHOD_LABELS[m] for m in R.METHODS]
    for m in R.METHODS:
        row = by_label[R.METHOD_LABELS[m]]
        assert float(row[1]) == round(100 * data["accuracy"][m], 2)
        if m != "zero_shot":
            assert float(row[2]) == round(100 * (data["accuracy"][m] - data["accuracy"]["zero_shot"]), 2)

    (dp_row,) = _md_table(md, "| ε |")
    assert float(dp_row[0]) == data["privacy"]["epsilon"] and float(dp_row[1]) == data["privacy"]["delta"]
    assert dp_row[3] == data["privacy"]["accountant"] and int(dp_row[7]) == data["privacy"]["steps"]
    assert dp_row[2] == data["privacy"].get("adjacency", "add_or_remove_one (not recorded)")
    assert float(dp_row[4]) == pytest.approx(data["privacy"]["noise_multiplier"], rel=1e-3)
    assert float(dp_row[6]) == pytest.approx(data["privacy"]["sample_rate"], rel=1e-3)

    stage_rows = _md_table(md, "| Stage |")
    assert [r[0] for r in stage_rows] == [s["name"] for s in data["stages"]]
    for row, s in zip(stage_rows, data["stages"]):
        assert float(row[1]) == round(s["wall_time_s"], 1) and float(row[2]) == round(s["peak_memory_mb"])
        assert row[3] == ("yes (cached)" if s["reused"] else "no")
    assert f"= {data['derived']['time_ratio']:.3f}" in md

    width, height = _png_size(open(paths["png"], "rb").read())
    assert (width, height) == (1100, 420)


def test_png_is_drawn(tmp_path):
    """The plot has content: accuracy bars differ from a blank canvas (decoded with matplotlib)."""
    import matplotlib.image as mpimg

    paths = R.write_report(results(transfer_curve=[]), str(tmp_path))
    img = mpimg.imread(paths["png"])
    assert img.shape[:2] == (420, 1100)
    assert float(np.std(img[..., :3])) > 0.05


@pytest.mark.parametrize("bad, match", [
    ({"accuracy": {"zero_shot": 77.3, "student_prompt": 0.7, "direct_transfer": 0.6, "post": 0.8}}, "not a percentage"),
    ({"accuracy": {"zero_shot": 0.7, "student_prompt": 0.7, "post": 0.8}}, "missing \\['direct_transfer'\\]"),
    ({"accuracy": {"zero_shot": 0.7, "student_prompt": 0.7, "direct_transfer": 0.6, "post": 0.8, "lora": 0.9}},
     "unknown methods \\['lora'\\]"),
    ({"privacy": {"epsilon": 8.0}}, "missing"),
    ({"num_test_examples": 0}, "num_test_examples"),
    ({"stages": [{"name": "tune", "wall_time_s": -1}]}, "wall_time_s"),
    ({"stages": [{"name": "tune", "wall_time_s": 1}, {"name": "tune", "wall_time_s": 2}]}, "unique"),
    ({"transfer_curve": [{"step": 1, "public_accuracy": 80.0}]}, "public_accuracy"),
    ({"surprise": 1}, "Unknown POST results keys \\['surprise'\\]"),
])
def test_bad_results_raise_before_writing(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        R.write_report(results(**bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_curve_from_log_history():
    history = [{"loss": 2.0, "step": 10}, {"eval_accuracy": 0.7, "step": 10}, {"loss": 1.5, "step": 20},
               {"train_runtime": 3.0, "step": 20}, {"eval_accuracy": 0.75, "step": 30}]
    curve = R.curve_from_log_history(history)
    assert [(p.step, p.loss, p.public_accuracy) for p in curve] == [(10, 2.0, 0.7), (20, 1.5, None), (30, None, 0.75)]


def test_track_stage_measures_time_and_peak_memory():
    if not P._reset_peak_rss():
        pytest.skip("the peak-memory high-water mark cannot be reset on this platform")
    stages = []
    with P.track_stage("small", stages):
        pass
    with P.track_stage("big", stages):
        block = np.ones(40_000_000)  # 305 MiB
        block[::4096] = 2.0
        del block
    small, big = stages
    assert small.name == "small" and big.name == "big"
    assert big.peak_memory_mb - small.peak_memory_mb > 250
    with pytest.raises(RuntimeError):
        with P.track_stage("failed", stages):
            raise RuntimeError("boom")
    assert [s.name for s in stages] == ["small", "big"]


def test_report_states_adjacency_the_add_remove_figure_and_a_void_guarantee(tmp_path):
    ledger = {**LEDGER, "accountant": "pld", "adjacency": "replace_one", "epsilon_add_remove": 4.74,
              "guarantee_holds": False, "guarantee_void_reasons": ["the noise was drawn from a fixed seed"]}
    paths = R.write_report(R.POSTResults(**results(privacy=ledger)), str(tmp_path))
    md = open(paths["md"]).read()
    (dp_row,) = _md_table(md, "| ε |")
    assert dp_row[2] == "replace_one" and dp_row[3] == "pld"
    assert "ε = 4.74 under add/remove-one" in md
    assert "**The DP guarantee does not hold:** the noise was drawn from a fixed seed." in md
    held = open(R.write_report(R.POSTResults(**results()), str(tmp_path / "b"))["md"]).read()
    assert "does not hold" not in held and "weighted by its class" not in held
    weighted = R.write_report(R.POSTResults(**results(privacy={**LEDGER, "class_weights": [1.0, 0.448]})),
                              str(tmp_path / "c"))
    assert "weighted by its class (`--dp_class_weights` 1|0.448;" in open(weighted["md"]).read()


def test_a_method_that_could_not_run_is_reported_as_not_applicable(tmp_path):
    # A ready student of another hidden size: p_s cannot be pasted into the target; POST is still scored.
    reason = "hidden sizes differ: 64 vs 32"
    acc = dict(results()["accuracy"], direct_transfer=None)
    paths = R.write_report(results(accuracy=acc, not_applicable={"direct_transfer": reason}), str(tmp_path))
    data = json.loads(open(paths["json"]).read())
    assert data["accuracy"]["direct_transfer"] is None and data["not_applicable"] == {"direct_transfer": reason}
    assert data["derived"]["post_gain_over_direct_transfer"] is None
    assert data["derived"]["post_gain_over_zero_shot"] == pytest.approx(0.805 - 0.773)
    assert R.POSTResults.from_dict(data).to_dict() == R.POSTResults.from_dict(
        results(accuracy=acc, not_applicable={"direct_transfer": reason})).to_dict()  # round trip
    rows = {row[0]: row for row in _md_table(open(paths["md"]).read(), "| Method |")}
    assert rows[R.METHOD_LABELS["direct_transfer"]][1:] == [f"n/a ({reason})", "—"]
    assert float(rows[R.METHOD_LABELS["post"]][1]) == 80.5
    assert _png_size(open(paths["png"], "rb").read()) == (1100, 420)


@pytest.mark.parametrize("accuracy, not_applicable, match", [
    ({"direct_transfer": None}, {"direct_transfer": " "}, "non-empty reason"),
    ({"direct_transfer": 0.6}, {"direct_transfer": "hidden sizes differ"}, "give one or the other"),
    ({"post": None}, {"post": "no transfer"}, "only .* can be not applicable"),
    ({}, {"lora": "not a method"}, "only .* can be not applicable"),
    ({}, ["direct_transfer"], "must be a dict"),
])
def test_not_applicable_needs_a_reason_and_no_accuracy(tmp_path, accuracy, not_applicable, match):
    acc = {**results()["accuracy"], **accuracy}
    with pytest.raises(ValueError, match=match):
        R.write_report(results(accuracy=acc, not_applicable=not_applicable), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_report_states_the_default_delta_without_a_warning():
    # The DP trainer records `target_delta`: None when nobody chose δ, so it is 1/N, the paper's convention.
    md = R.render_markdown(results(privacy={**LEDGER, "delta": 1 / 8530, "target_delta": None}))
    assert "δ = 1/N (N = 8530 training examples), the default and the paper's convention." in md
    for ledger in ({**LEDGER, "target_delta": 1e-4}, LEDGER):  # a δ the user chose, or a ledger from before
        assert "δ = 1/N" not in R.render_markdown(results(privacy=ledger))
