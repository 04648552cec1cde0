"""benchmarks/dp_recipe.py on a tiny student: each recipe is a DP tuning on the public proxy at its own q and steps,
scored on the proxy's held-out split; the best macro-F1 is chosen; a rerun or a split grid reuses finished rows."""

import json

import pytest

from benchmarks import dp_recipe


@pytest.fixture
def proxy_argv(tiny_student_and_proxy):
    student, proxy = tiny_student_and_proxy
    return ["--student", student, "--proxy", proxy, "--heldout", "20", "--private-size", "100",
            "--set=template=Review: {text}\nSentiment:", "--set=label_words=bad,awful|good,great",
            "--set=num_virtual_tokens=4", "--set=eval_batch_size=8", "--set=prompt_init_text=good bad"]


def test_recipes_run_at_their_own_rate_and_the_best_macro_f1_is_chosen(proxy_argv, tmp_path, monkeypatch):
    out = str(tmp_path / "recipe.json")
    dp_recipe.main([*proxy_argv, "--recipes", "4:0.5:0.1", "8:1:0.01", "--non-private-reference", "4:0.5:0.1",
                    "--out", out])
    result = json.loads(open(out).read())
    assert result["num_proxy_train"] == 40 and result["num_proxy_heldout"] == 20
    assert len(result["zero_shot_bits"]) == 20
    first, second = result["rows"]
    # E epochs at q = B / N: round(0.5 * 40 / 4) = 5 and round(1 * 40 / 8) = 5 steps on the proxy, and the private
    # run's steps from --private-size: round(0.5 * 100 / 4) = 12 and round(100 / 8) = 12 (banker's rounding of 12.5).
    assert (first["proxy_steps"], second["proxy_steps"]) == (5, 5)
    assert (first["private_steps"], second["private_steps"]) == (12, 12)
    for row, batch in ((first, 4), (second, 8)):
        privacy = row["privacy"]
        assert privacy["steps"] == 5 and privacy["sample_rate"] == pytest.approx(batch / 40)
        assert privacy["epsilon"] <= 8.0 + 1e-9 and privacy["noise_multiplier"] > 0
        assert 0.0 <= row["heldout_macro_f1"] <= 1.0
        lo, hi = row["gain_over_zero_shot_ci"]
        assert lo <= row["heldout_accuracy"] - result["student_zero_shot"] <= hi
    # The non-private reference is the same tuning without DP: no ledger, and never a candidate.
    reference = result["non_private_reference"]
    assert reference["privacy"] is None and reference["proxy_steps"] == 5 and 0.0 <= reference["heldout_macro_f1"] <= 1
    best = max(result["rows"], key=lambda r: (r["heldout_macro_f1"], -r["epochs"], -r["expected_batch"]))
    assert result["chosen"]["recipe"] == best["recipe"]
    assert result["command"].startswith("python benchmarks/dp_recipe.py --student")
    assert str(tmp_path) not in json.dumps(result["settings"])

    # A rerun keeps the finished rows; a grid split across processes is gathered with --reuse.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished recipe was rerun")

    monkeypatch.setattr(dp_recipe, "recipe_row", refuse)
    dp_recipe.main([*proxy_argv, "--recipes", "4:0.5:0.1", "8:1:0.01", "--non-private-reference", "4:0.5:0.1",
                    "--out", out])
    again = json.loads(open(out).read())
    assert again["rows"] == result["rows"] and again["non_private_reference"] == reference
    gathered = str(tmp_path / "gathered.json")
    dp_recipe.main([*proxy_argv, "--recipes", "8:1:0.01", "4:0.5:0.1", "--reuse", out, "--out", gathered])
    assert [r["recipe"] for r in json.loads(open(gathered).read())["rows"]] == ["8:1:0.01", "4:0.5:0.1"]


@pytest.mark.parametrize("recipe, message", [("4:1", "not B:E:LR"), ("0:1:0.1", "B >= 1"), ("4:1:-1", "LR > 0")])
def test_a_malformed_recipe_is_refused_before_any_work(proxy_argv, recipe, message):
    with pytest.raises(SystemExit, match=message):
        dp_recipe.main([*proxy_argv, "--recipes", recipe])


def test_a_non_private_reference_alone_is_written_without_a_choice(proxy_argv, tmp_path):
    out = str(tmp_path / "reference.json")
    dp_recipe.main([*proxy_argv, "--non-private-reference", "8:1:0.1", "--out", out])
    result = json.loads(open(out).read())
    # 1 epoch at batch 8 of the 40 proxy examples: 5 steps, no ledger, and no recipe to choose among.
    assert result["non_private_reference"]["proxy_steps"] == 5 and result["non_private_reference"]["privacy"] is None
    assert result["rows"] == [] and "chosen" not in result


def test_no_recipe_and_no_reference_is_refused(proxy_argv):
    with pytest.raises(SystemExit, match="--recipes: give at least one"):
        dp_recipe.main(proxy_argv)
