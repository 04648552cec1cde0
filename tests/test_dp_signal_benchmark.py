"""benchmarks/dp_signal.py on a tiny student: per (B, C), the step's signal against the noise σ·C·√D / B at the σ the
accountant calibrates for the private run's size, at the initial prompt and after non-private public steps."""

import json
import math

import pytest

from benchmarks import dp_signal
from peft_post.tuning.accountant import REPLACE_ONE, calibrate_noise_multiplier


@pytest.fixture
def signal_argv(tiny_student_and_proxy):
    student, data = tiny_student_and_proxy
    return ["--student", student, "--data", data, "--heldout", "20", "--private-size", "100", "--examples", "16",
            "--chunk", "5", "--set=template=Review: {text}\nSentiment:", "--set=label_words=bad,awful|good,great",
            "--set=num_virtual_tokens=4", "--set=prompt_init_text=good bad"]


def test_each_recipe_gets_its_calibrated_noise_and_the_signal_is_measured_along_public_training(
        signal_argv, tmp_path, tokenizer):
    import transformers

    out = str(tmp_path / "signal.json")
    assert dp_signal.main([*signal_argv, "--batches", "8", "40", "--clip-norms", "0.001", "100",
                           "--after-steps", "3", "0", "--train-batch", "4", "--out", out]) == 0
    result = json.loads(open(out).read())
    hidden = transformers.AutoConfig.from_pretrained(signal_argv[1]).hidden_size
    assert result["prompt_numbers"] == 4 * hidden and result["num_examples"] == 16
    assert list(result["at_step"]) == ["0", "3"]
    for table in result["at_step"].values():
        assert [(r["expected_batch"], r["max_grad_norm"]) for r in table["rows"]] == [
            (8, 0.001), (8, 100.0), (40, 0.001), (40, 100.0)]
        for r in table["rows"]:
            steps = round(2.0 * 100 / r["expected_batch"])
            sigma = calibrate_noise_multiplier(8.0, 1 / 100, r["expected_batch"] / 100, steps, REPLACE_ONE)
            assert (r["steps"], r["noise_multiplier"]) == (steps, pytest.approx(sigma))
            assert r["noise"] == pytest.approx(sigma * r["max_grad_norm"] * math.sqrt(4 * hidden)
                                               / r["expected_batch"])
            assert r["signal_to_noise"] == pytest.approx(r["signal"] / r["noise"])
        tight, loose = table["rows"][0], table["rows"][1]
        # C far below every norm clips all (the signal is C times the alignment), far above clips none.
        assert (tight["clipped_share"], loose["clipped_share"]) == (1.0, 0.0)
        assert tight["signal"] == pytest.approx(0.001 * table["alignment"], rel=1e-4)
        assert table["per_example_norm"]["p10"] <= table["per_example_norm"]["median"] <= \
            table["per_example_norm"]["p90"] < 100
        votes = table["class_alignment"]
        assert set(votes["per_class"]) == set(votes["shares"]) == {"0", "1"}
        assert sum(votes["shares"].values()) == pytest.approx(1.0) and votes["balanced"] >= 0
    # Three public steps moved the prompt: its gradients are others.
    assert result["at_step"]["0"]["per_example_norm"] != result["at_step"]["3"]["per_example_norm"]
    assert result["command"].startswith("python benchmarks/dp_signal.py --student")
    assert str(tmp_path) not in json.dumps({k: v for k, v in result.items() if k != "command"})


def test_the_class_balanced_vote_removes_the_majoritys_shared_pull():
    import torch

    # Class 0 pulls along e0 + e1, class 1 along e0 - e1, three times as often: the plain vote points mostly along
    # e0 (the pull both share, the prior's); balanced, the two classes' e1 parts cancel and e0 remains.
    pulls = torch.tensor([[1.0, 1.0, 0.0]] * 30 + [[1.0, -1.0, 0.0]] * 90)
    votes = dp_signal.class_alignment(pulls, [0] * 30 + [1] * 90)
    assert votes["per_class"] == {"0": pytest.approx(1.0), "1": pytest.approx(1.0)}
    assert votes["balanced"] == pytest.approx(1 / math.sqrt(2)) and votes["shares"] == {"0": 0.25, "1": 0.75}
    # Opposite pulls: the balanced vote has no signal, however lopsided the shares.
    opposed = dp_signal.class_alignment(torch.tensor([[1.0, 0.0]] * 10 + [[-1.0, 0.0]] * 30), [0] * 10 + [1] * 30)
    assert opposed["balanced"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--batches", "101"], "--batches"),
    (["--examples", "1"], "--examples"),
    (["--after-steps", "-1"], "--after-steps"),
    (["--clip-norms", "0"], "--clip-norms"),
    (["--set", "seed=3"], "--set seed: set by this script's own flags"),
])
def test_bad_arguments_are_refused_naming_them(signal_argv, flags, message, capsys):
    with pytest.raises(SystemExit) as err:
        dp_signal.main([*signal_argv, "--batches", "8", *flags])
    assert message in str(err.value)
