"""benchmarks/utility.py on tiny models: the grid shares stages across cells and summarises what it ran."""

import json

import pytest

from benchmarks import cost, utility


def _as_set_flags(args):
    pairs = dict(zip(args[::2], args[1::2]))
    public = pairs.pop("--public_dataset")
    pairs.pop("--run_dir")
    return public, [f"--set={k[2:]}={v}" for k, v in pairs.items()]


def test_grid_shares_the_source_prompt_across_alphas_and_summarises(tiny_run, tmp_path, monkeypatch):
    _, args = tiny_run
    public, flags = _as_set_flags(args)
    root, out = str(tmp_path / "grid"), str(tmp_path / "utility.json")
    argv = ["--root", root, "--out", out, "--dp", "false", "true", "--public", public, "--alphas", "heuristic", "0.5",
            "--dp-alphas", "heuristic", "0.5", "0.0", *flags, "--dp-set=tune_batch_size=4"]
    utility.main(argv)
    result = json.loads(open(out).read())
    cells = result["cells"]
    assert [(c["dp"], c["alpha_setting"]) for c in cells] == [
        (False, "heuristic"), (False, "0.5"), (True, "heuristic"), (True, "0.5"), (True, "0.0")]
    for dp in (False, True):
        first, second = [c for c in cells if c["dp"] is dp][:2]
        reused = {s["name"]: s["reused"] for s in second["stages"]}
        assert reused["tune"] and not reused["transfer"]  # the α cell copied the source prompt, then transferred
        for method in ("zero_shot", "student_prompt", "direct_transfer"):
            assert first["accuracy"][method] == second["accuracy"][method]
        assert second["alpha"] == 0.5
    assert cells[2]["privacy"]["epsilon"] <= 8.0 and cells[0]["privacy"] is None
    assert result["dp_config"]["tune_batch_size"] == 4 and result["config"]["tune_batch_size"] == 8
    assert cells[4]["alpha"] == 0.0 and cells[4]["accuracy"]["student_prompt"] == cells[2]["accuracy"]["student_prompt"]
    assert len(result["summary"]) == 5 and result["markdown"].count("\n") == 6
    # Rerunning resumes: every stage of every cell is read back.
    utility.main(argv)
    again = json.loads(open(out).read())
    assert all(s["reused"] for c in again["cells"] for s in c["stages"])
    assert [c["accuracy"] for c in again["cells"]] == [c["accuracy"] for c in cells]
    with pytest.raises(SystemExit, match="tune_learning_rate differ.*another --root"):
        utility.main([*argv, "--set=tune_learning_rate=0.5"])
    # The root guards the resolved settings: a flag spelling out the preset's own value is the same grid, but a
    # preset changed under the root is refused.
    utility.main([*argv, "--set=distill_learning_rate=0.001"])
    from peft_post.pipeline import PRESETS

    monkeypatch.setitem(PRESETS["quick"], "distill_learning_rate", 5e-3)
    with pytest.raises(SystemExit, match="distill_learning_rate differ"):
        utility.main(argv)


def test_dp_cells_with_other_tuning_settings_borrow_the_seeds_full_baseline(tiny_run, tmp_path):
    """A DP cell whose --dp-set changes the tuning would refuse the copied full tuning (other settings); it borrows
    the non-private cell's full prompt tuning scores instead, and its headline uses them."""
    _, args = tiny_run
    public, flags = _as_set_flags(args)
    out = str(tmp_path / "utility.json")
    utility.main(["--root", str(tmp_path / "grid"), "--out", out, "--dp", "false", "true", "--public", public,
                  "--alphas", "0.5", "--full-baseline", *flags, "--dp-set=tune_batch_size=4"])
    nodp, dp = json.loads(open(out).read())["cells"]
    assert nodp["full_prompt_tuning_from"] is None and dp["full_prompt_tuning_from"] == nodp["run_dir"]
    assert dp["accuracy"]["full_prompt_tuning"] == nodp["accuracy"]["full_prompt_tuning"]
    assert "full_tuning" not in {s["name"] for s in dp["stages"]}
    assert any("non-private cell" in n for n in dp["notes"])


def test_cost_benchmark_times_the_three_steps_interleaved(tiny_run, tmp_path):
    from peft_post.cli import main as cli

    run_dir, args = tiny_run
    assert cli(["run", *args, "--dp", "false", "--full_baseline", "true"]) == 0
    public, flags = _as_set_flags(args)
    out = str(tmp_path / "cost.json")
    cost.main(["--run-dir", run_dir, "--out", out, "--rounds", "2", f"--set=public_dataset={public}", *flags])
    result = json.loads(open(out).read())
    median, budget = result["median_step_s"], result["budget"]
    assert all(len(result["step_seconds"][k]) == 2 for k in median)
    assert result["estimated_s"]["full_prompt_tuning"] == pytest.approx(
        budget["tune_steps"] * median["full_prompt_tuning"])
    assert result["estimated_s"]["student_tuning_plus_transfer"] == pytest.approx(
        budget["tune_steps"] * median["student_tuning"] + budget["transfer_steps"] * median["transfer"]
        + result["transfer_cache_build_s"])
    assert result["time_ratio_full_over_post"] == pytest.approx(
        result["estimated_s"]["full_prompt_tuning"] / result["estimated_s"]["student_tuning_plus_transfer"])
    assert budget["tune_steps"] == 3 and budget["tune_batch_size"] == 8
    assert result["peak_memory_mb"]["full_prompt_tuning"] > 0


def test_a_full_baseline_is_borrowed_only_from_the_same_test_examples():
    """Same dataset and size are not enough: the donor's zero-shot bits must equal the cell's (another order or other
    examples of the same size differ), as headline.py checks."""
    from peft_post.report import POSTResults

    def results(zero_shot_bits, full=None):
        accuracy = {"zero_shot": zero_shot_bits.count("1") / 4, "student_prompt": 0.5, "direct_transfer": 0.5,
                    "post": 0.5}
        bits = {"zero_shot": zero_shot_bits, "student_prompt": "1100", "direct_transfer": "1100", "post": "1100"}
        if full:
            accuracy["full_prompt_tuning"], bits["full_prompt_tuning"] = full.count("1") / 4, full
        return POSTResults(target_model="t", private_dataset="embedded:trec", num_test_examples=4, accuracy=accuracy,
                           per_example_correct=bits)

    borrowed = utility.with_full_baseline(results("1000"), results("1000", full="1110"))
    assert borrowed.accuracy["full_prompt_tuning"] == 0.75
    assert borrowed.per_example_correct["full_prompt_tuning"] == "1110"
    with pytest.raises(SystemExit, match="other test examples"):
        utility.with_full_baseline(results("1000"), results("0001", full="1110"))
