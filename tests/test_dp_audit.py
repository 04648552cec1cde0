"""The distinguishing DP audit (`peft_post.dp_audit`): its statistics exactly, its validity on a mechanism whose ε is
known in closed form, and a small end-to-end audit of `DPPromptTrainer` on a tiny model."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from peft import get_peft_model
from scipy.optimize import brentq
from scipy.stats import beta, norm

from peft_post import POSTConfig
from peft_post import dp_audit as A
from peft_post.testing import build_tiny_model, tiny_sentiment_dataset
from peft_post.tuning import DPConfig

ALPHA = 0.05


def separable_closed_form(n_in, n_out, delta, confidence=0.95):
    """ε_lb of a test with no errors: each error rate's one-sided CP bound at level 1 − α/2 is 1 − (α/2)^(1/n)."""
    a = (1 - confidence) / 2
    fnr, fpr = 1 - a ** (1 / n_in), 1 - a ** (1 / n_out)
    return max(math.log((1 - delta - fnr) / fpr), math.log((1 - delta - fpr) / fnr), 0.0)


def gaussian_epsilon(mu, delta):
    """Exact ε(δ) of the Gaussian mechanism with sensitivity/σ = mu (Balle & Wang 2018)."""
    def gap(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta
    return brentq(gap, 0.0, 50.0)


# ------------------------------------------------------------------------------------------------ pure statistics
def test_clopper_pearson_upper_matches_its_definition():
    n, c = 20, 0.975
    assert A.clopper_pearson_upper(0, n, c) == pytest.approx(1 - (1 - c) ** (1 / n), abs=1e-12)
    assert A.clopper_pearson_upper(n, n, c) == 1.0
    for k in (1, 5, 19):
        assert A.clopper_pearson_upper(k, n, c) == pytest.approx(beta.ppf(c, k + 1, n - k), abs=1e-12)
        # The defining property: at the bound, P(Bin(n, p) <= k) = 1 − c.
        from scipy.stats import binom
        assert binom.cdf(k, n, A.clopper_pearson_upper(k, n, c)) == pytest.approx(1 - c, abs=1e-9)
    bounds = [A.clopper_pearson_upper(k, n, c) for k in range(n + 1)]
    assert all(b1 < b2 for b1, b2 in zip(bounds, bounds[1:]))
    with pytest.raises(ValueError):
        A.clopper_pearson_upper(3, 2, c)
    with pytest.raises(ValueError):
        A.clopper_pearson_upper(0, 5, 1.0)


def test_epsilon_from_rates_formula():
    assert A.epsilon_from_rates(0.1, 0.2, 0.0) == pytest.approx(max(math.log(0.8 / 0.1), math.log(0.9 / 0.2)))
    assert A.epsilon_from_rates(0.2, 0.1, 0.01) == pytest.approx(math.log(0.79 / 0.1))
    assert A.epsilon_from_rates(0.5, 0.5, 0.0) == 0.0          # a coin flip shows nothing
    assert A.epsilon_from_rates(0.7, 0.6, 0.0) == 0.0          # worse than a coin flip: clamped at 0
    assert A.epsilon_from_rates(0.0, 0.3, 0.0) == math.inf     # no false positive at all: unbounded
    assert A.epsilon_from_rates(0.05, 0.9, 0.2) == 0.0         # 1 − δ − FNR <= 0 on one side, 0.75/0.9 < 1 on the other


@pytest.mark.parametrize("n,delta", [(10, 0.0), (25, 1e-3), (100, 1e-5)])
def test_perfectly_separable_scores_give_the_closed_form_bound(n, delta):
    scores_in, scores_out = np.linspace(1, 2, n), np.linspace(-2, -1, n)
    fixed = A.distinguishing_bound(scores_in, scores_out, delta, threshold=0.0)
    assert fixed["false_negatives"] == fixed["false_positives"] == 0
    assert fixed["epsilon_lb"] == pytest.approx(separable_closed_form(n, n, delta), abs=1e-9)
    split = A.distinguishing_bound(scores_in, scores_out, delta, method="split", seed=3)
    # The threshold is picked on ⌊n/2⌋ trials per side and the bound is that of the other n − ⌊n/2⌋.
    assert split["num_in"] == split["num_out"] == n - n // 2
    assert split["epsilon_lb"] == pytest.approx(separable_closed_form(n - n // 2, n - n // 2, delta), abs=1e-9)
    assert split["epsilon_lb"] == pytest.approx(split["max_epsilon_lb"])
    # The direction is learnt: a statistic where lower means "in" gives the same bound.
    flipped = A.distinguishing_bound(-scores_in, -scores_out, delta, method="split", seed=3)
    assert flipped["epsilon_lb"] == pytest.approx(split["epsilon_lb"])
    if split["epsilon_lb"] > 0:  # (5 evaluated trials per side cannot show anything: every test ties at 0)
        assert -1.0 < split["threshold"] < 1.0 and split["direction"] == "greater" and flipped["direction"] == "less"
    lam = math.sqrt(math.log(2 / (ALPHA / 2)) / (2 * n))
    dkw = A.distinguishing_bound(scores_in, scores_out, delta, method="dkw")
    assert dkw["epsilon_lb"] == pytest.approx(max(math.log((1 - delta - lam) / lam), 0.0), abs=1e-9)


def test_bound_grows_with_the_trial_count_and_never_exceeds_what_it_allows():
    previous = -1.0
    for n in (8, 16, 32, 64, 128, 256):
        eps = A.epsilon_lower_bound(np.ones(n), np.zeros(n), 1e-3)
        assert eps > previous
        assert eps <= A.max_epsilon_lower_bound(n - n // 2, n - n // 2, 1e-3) + 1e-12
        previous = eps
    # 8 evaluated trials per side cannot show anything at 95%; ε = 8 would take ~11 000.
    assert A.max_epsilon_lower_bound(4, 4, 0.0) == 0.0
    assert A.max_epsilon_lower_bound(10_000, 10_000, 0.0) < 8 < A.max_epsilon_lower_bound(12_000, 12_000, 0.0)
    rng = np.random.default_rng(0)
    for _ in range(20):  # whatever the scores, the bound stays within the trial count's reach
        n_in, n_out = rng.integers(2, 60, size=2)
        a, b = rng.normal(size=(n_in, 3)) * 5, rng.normal(size=(n_out, 3))
        for method in ("split", "dkw"):
            r = A.distinguishing_bound(a, b, 1e-3, method=method, seed=int(rng.integers(100)))
            assert 0.0 <= r["epsilon_lb"] <= r["max_epsilon_lb"] + 1e-12


def test_identical_distributions_give_about_zero():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=1000), rng.normal(size=1000)
    assert A.epsilon_lower_bound(a, b, 1e-5) < 0.15
    assert A.epsilon_lower_bound(a, b, 1e-5, method="dkw") == 0.0
    # Under ε = 0 a positive bound is a false alarm, allowed with probability at most 5%.
    positives = sum(A.epsilon_lower_bound(rng.normal(size=40), rng.normal(size=40), 1e-5, seed=s) > 0
                    for s in range(200))
    assert positives <= 10
    # Constant scores: no threshold separates anything.
    assert A.epsilon_lower_bound(np.zeros(50), np.zeros(50), 0.0) == 0.0


def test_bound_is_valid_and_useful_on_a_gaussian_mechanism():
    """Scores N(μ, 1) on D and N(0, 1) on D' are releases of a Gaussian mechanism of exact ε(δ): the lower bound may
    exceed it in at most 5% of audits (here: never), and it does detect the mechanism."""
    delta = 1e-3
    rng = np.random.default_rng(2)
    for mu, n, least in ((2.0, 200, 1.0), (0.5, 1000, 0.1)):
        true_eps = gaussian_epsilon(mu, delta)  # 7.58 and 1.35
        bounds = np.array([A.epsilon_lower_bound(rng.normal(mu, 1, n), rng.normal(0, 1, n), delta, seed=s)
                           for s in range(100)])
        assert (bounds > true_eps).mean() <= 0.05 and bounds.max() < true_eps
        assert np.median(bounds) > least
    # Several statistics: choosing one on the selection half keeps the guarantee (one informative, two noise).
    true_eps = gaussian_epsilon(2.0, delta)
    multi = np.array([A.epsilon_lower_bound(np.c_[rng.normal(size=(200, 2)), rng.normal(2.0, 1, 200)],
                                            np.c_[rng.normal(size=(200, 2)), rng.normal(0, 1, 200)], delta, seed=s)
                      for s in range(50)])
    assert multi.max() < true_eps and np.median(multi) > 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        A.epsilon_lower_bound([0.0, np.nan], [0.0, 1.0], 0.0)
    with pytest.raises(ValueError, match="statistics"):
        A.epsilon_lower_bound(np.zeros((4, 2)), np.zeros((4, 3)), 0.0)
    with pytest.raises(ValueError, match="method"):
        A.epsilon_lower_bound(np.zeros(4), np.zeros(4), 0.0, method="best")
    with pytest.raises(ValueError, match="split"):
        A.epsilon_lower_bound(np.zeros(1), np.zeros(4), 0.0)
    with pytest.raises(ValueError, match="delta"):
        A.epsilon_lower_bound(np.zeros(4), np.zeros(4), 1.0)


# ------------------------------------------------------------------------------------------------ datasets, cases
def test_neighbouring_datasets_differ_in_the_canary_only():
    data = tiny_sentiment_dataset(6)
    canary = {"text": "zq xv", "label": 1}
    d_in, d_out, replacement = A.neighbouring_datasets(data, canary)
    assert len(d_in) == len(d_out) == 7 and d_in[6] == canary and d_out[6] == replacement == data[0]
    assert d_in.select(range(6)).to_list() == d_out.select(range(6)).to_list() == data.to_list()
    d_in, d_out, replacement = A.neighbouring_datasets(data, canary, A.ADD_OR_REMOVE_ONE)
    assert len(d_in) == 7 and len(d_out) == 6 and replacement is None
    with pytest.raises(ValueError, match="columns"):
        A.neighbouring_datasets(data, {"text": "x"})


def test_broken_cases_keep_the_noise_std_and_break_one_thing():
    honest = DPConfig(noise_multiplier=2.0, max_grad_norm=0.1, target_delta=1e-3)
    cases = A.case_dp_configs(honest, ["honest", "no_clipping", "no_noise"])
    assert cases["honest"] is honest
    clip = cases["no_clipping"]
    assert clip.max_grad_norm == 1e4 and clip.noise_multiplier * clip.max_grad_norm == pytest.approx(0.2)
    assert cases["no_noise"].noise_multiplier == 0.0 and cases["no_noise"].max_grad_norm == 0.1
    assert A.case_dp_configs(honest, ["replay"])["replay"].insecure_noise_seed is not None
    with pytest.raises(ValueError, match="noise_multiplier"):
        A.case_dp_configs(DPConfig(target_epsilon=1.0), ["honest"])


# ------------------------------------------------------------------------------------------------ end to end
CAUSAL = dict(task_type="CAUSAL_LM", template="{text} It was", label_words=[["bad"], ["good"]])
CANARY = {"text": "zq xv qqj vvk zzt kx jjq", "label": 1}


@pytest.fixture(scope="module")
def tiny_llama(tokenizer, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dp-audit-llama"))
    build_tiny_model("llama", tokenizer, path)
    return path


def factory(path):
    import transformers as tf

    def make():
        torch.manual_seed(0)
        return get_peft_model(tf.AutoModelForCausalLM.from_pretrained(path).eval(),
                              POSTConfig(num_virtual_tokens=4, **CAUSAL))
    return make


def sgd_args(**kw):
    base = dict(max_steps=4, per_device_train_batch_size=8, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", use_cpu=True)
    base.update(kw)
    return base


def test_audit_flags_training_without_noise(tiny_llama, tokenizer):
    """σ = 0 on the tiny model: the canary's gradient direction separates the releases, so the audit proves ε > 0.5
    (the most 20 runs per side allow is 0.81; one run on D that never drew the canary, 1.6% a run with q = 1/2 and
    6 steps, costs 0.22) while the ledger of such a run claims ε = ∞. The batches are drawn from seeds
    (`insecure_noise_seed`; σ = 0 has no noise to hide) so that the test is deterministic: with secret batches, two
    or more of the 20 runs on D miss the canary about 4% of the time and the bound falls below 0.5."""
    result = A.run_distinguishing_audit(
        factory(tiny_llama), tokenizer, tiny_sentiment_dataset(15), CANARY,
        DPConfig(noise_multiplier=0.0, max_grad_norm=0.1, target_delta=1e-3, insecure_noise_seed=0),
        sgd_args(max_steps=6), trials=20,
        statistics=["canary_loss", "gradient_alignment"], seed=0)
    json.dumps(result, allow_nan=False)  # JSON-ready, no NaN/inf literals
    assert result["claimed_epsilon"] == "inf" and result["ledger"]["noise_multiplier"] == 0.0
    assert result["max_epsilon_lb"] == pytest.approx(separable_closed_form(10, 10, 1e-3))
    assert result["per_statistic"]["gradient_alignment"]["auc"] > 0.95
    assert 0.5 < result["epsilon_lb"] <= result["max_epsilon_lb"] + 1e-12
    assert result["bound"]["statistic"] == "gradient_alignment"
    assert len(result["runs"]) == 40 and sum(r["canary_in"] for r in result["runs"]) == 20
    assert len(result["per_statistic"]["canary_loss"]["scores_in"]) == 20


def test_every_run_starts_from_the_initial_prompt(tiny_llama, tokenizer, monkeypatch):
    from peft_post.prompts import get_prompt
    from peft_post.tuning import DPPromptTrainer

    starts, train = [], DPPromptTrainer.train

    def recording_train(self, *args, **kwargs):
        starts.append(get_prompt(self.model))
        return train(self, *args, **kwargs)

    monkeypatch.setattr(DPPromptTrainer, "train", recording_train)
    model = factory(tiny_llama)()
    initial = get_prompt(model)
    result = A.run_distinguishing_audit(model, tokenizer, tiny_sentiment_dataset(15), CANARY,
                                        DPConfig(noise_multiplier=1.0, max_grad_norm=0.1, target_delta=1e-3),
                                        sgd_args(max_steps=2), trials=2, statistics=["canary_margin"])
    assert len(starts) == 4 and all(torch.equal(s, initial) for s in starts)
    assert torch.equal(get_prompt(model), initial)  # and the model is left as it was given
    assert result["ledger"]["steps"] == 2 and result["trials_per_dataset"] == 2


def test_replay_attack_catches_replayable_noise_and_not_secret_noise(tiny_llama, tokenizer):
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=0.1, target_delta=1e-3)
    data = tiny_sentiment_dataset(15)
    replayable = A.run_distinguishing_audit(
        factory(tiny_llama), tokenizer, data, CANARY, dataclasses.replace(dp, insecure_noise_seed=0), sgd_args(),
        trials=4, statistics=["replay"], seed=1)
    replay = replayable["per_statistic"]["replay"]
    assert replay["scores_in"] == [0.0] * 4  # the attacker reproduces every release on D exactly
    # and not those on D' (unless a run never drew the canary's slot: 1/16 with q = 1/2 and 4 steps)
    assert sum(s < 0 for s in replay["scores_out"]) >= 2
    assert len({r["noise_seed"] for r in replayable["runs"]}) == 8  # every run its own published seed
    assert replayable["ledger"]["guarantee_holds"] is False  # the ledger itself says so
    secret = A.run_distinguishing_audit(factory(tiny_llama), tokenizer, data, CANARY, dp, sgd_args(), trials=2,
                                        statistics=["replay"], seed=1)
    assert all(s < 0 for s in secret["per_statistic"]["replay"]["scores_in"])  # secret noise: no replay


def test_cli_audit_dp_runs_on_the_pipelines_student(tiny_llama, tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    from peft_post.cli import main
    from peft_post.testing import tiny_sentiment_rows

    private = str(tmp_path / "private")
    DatasetDict({"train": Dataset.from_list(tiny_sentiment_rows(12, seed=1)),
                 "test": Dataset.from_list(tiny_sentiment_rows(4, seed=2))}).save_to_disk(private)
    out = str(tmp_path / "dp_audit.json")
    code = main(["audit-dp", "--run_dir", str(tmp_path / "run"), "--preset", "quick", "--student_model", tiny_llama,
                 "--private_dataset", private, "--label_words", "bad,awful|good,great", "--num_virtual_tokens", "4",
                 "--cases", "no_noise", "--trials", "2", "--num_examples", "8", "--batch_size", "4", "--steps", "2",
                 "--output", out])
    assert code == 0
    printed = capsys.readouterr().out
    assert "no_noise" in printed and "epsilon_lb" in printed
    with open(out, encoding="utf-8") as f:
        result = json.load(f)
    case = result["cases"]["no_noise"]
    assert case["num_examples_in"] == 9 and case["trials_per_dataset"] == 2 and case["ledger"]["noise_multiplier"] == 0
    assert result["canary"]["text"] in A.CANARY_CANDIDATES and result["command"].startswith("peft-post audit-dp")
    assert case["max_epsilon_lb"] == 0.0  # 1 evaluated run per side proves nothing, and the result says so
    with pytest.raises(ValueError, match="cases"):
        A.DPAuditConfig(cases="honest,broken")
