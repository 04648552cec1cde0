import json
import os
import random

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from scipy.stats import norm
from sklearn.metrics import roc_curve

from peft_post.audit import (AuditConfig, attack_metrics, bootstrap_auc_interval, lira_scores, logit_confidence,
                             membership_matrix, run_audit, tpr_at_fpr)
from peft_post.cli import main
from peft_post.pipeline import PipelineConfig
from peft_post.testing import tiny_sentiment_rows


# ------------------------------------------------------------------------------------------------ pure statistics
@pytest.mark.parametrize("shadows,examples", [(4, 2), (8, 16), (6, 40)])
def test_membership_is_balanced_both_ways_and_seeded(shadows, examples):
    m = membership_matrix(shadows, examples, seed=3)
    assert m.shape == (shadows, examples) and m.dtype == bool
    assert (m.sum(0) == shadows // 2).all() and (m.sum(1) == examples // 2).all()
    assert (membership_matrix(shadows, examples, seed=3) == m).all()
    if examples > 2:
        assert (membership_matrix(shadows, examples, seed=4) != m).any()


def test_logit_confidence_is_log_odds_of_the_true_class():
    scores = torch.tensor([[2.0, -1.0], [0.5, 3.0], [1.0, 2.0, 0.0]][:2])
    labels = torch.tensor([0, 0])
    assert np.allclose(logit_confidence(scores, labels), [3.0, -2.5], rtol=0, atol=1e-12)
    three = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.0, 4.0]])
    p = torch.softmax(three.double(), -1).numpy()
    y = np.array([1, 2])
    expected = np.log(p[[0, 1], y]) - np.log(1 - p[[0, 1], y])
    assert np.allclose(logit_confidence(three, torch.tensor(y)), expected, rtol=1e-12, atol=0)


def _brute_force_lira(membership, phi, variance):
    k_count, n = membership.shape
    out = np.zeros_like(phi)
    for k in range(k_count):
        others = [j for j in range(k_count) if j != k]
        groups = {side: [[phi[j, x] for j in others if membership[j, x] == side] for x in range(n)]
                  for side in (True, False)}
        if variance == "global":
            dev = sum((v - np.mean(g)) ** 2 for side in groups.values() for g in side for v in g)
            dof = sum(len(g) - 1 for side in groups.values() for g in side)
            pooled = np.sqrt(dev / dof)
        for x in range(n):
            size = min(len(groups[True][x]), len(groups[False][x]))
            (gi, go) = groups[True][x][:size], groups[False][x][:size]
            si, so = (np.std(gi, ddof=1), np.std(go, ddof=1)) if variance == "per_example" else (pooled, pooled)
            out[k, x] = norm.logpdf(phi[k, x], np.mean(gi), si) - norm.logpdf(phi[k, x], np.mean(go), so)
    return out


@pytest.mark.parametrize("variance,shadows", [("global", 4), ("global", 8), ("per_example", 6)])
def test_lira_equals_brute_force_scipy(variance, shadows):
    rng = np.random.default_rng(0)
    m = membership_matrix(shadows, 10, seed=1)
    phi = rng.normal(size=m.shape) + 0.7 * m
    np.testing.assert_allclose(lira_scores(m, phi, variance), _brute_force_lira(m, phi, variance), rtol=1e-10)


def test_lira_separated_scores_give_auc_one_and_identical_ones_give_chance():
    rng = np.random.default_rng(0)
    m = membership_matrix(8, 2000, seed=0)
    separated = rng.normal(size=m.shape) + 10.0 * m
    result = attack_metrics(lira_scores(m, separated), m)
    assert result["auc"] == 1.0 and result["tpr_at_fpr"] == {"0.01": 1.0, "0.001": 1.0}
    assert result["num_pairs"] == 16000 and result["num_member_pairs"] == 8000
    same = attack_metrics(lira_scores(m, rng.normal(size=m.shape)), m)
    assert abs(same["auc"] - 0.5) < 0.02 and same["tpr_at_fpr"]["0.01"] < 0.03


def test_lira_calibrates_per_example_where_a_global_threshold_cannot():
    """Examples differ far more in difficulty than membership moves φ: thresholding φ itself (the loss attack)
    barely beats chance, while LiRA compares each example with its own IN/OUT distribution."""
    rng = np.random.default_rng(0)
    m = membership_matrix(8, 500, seed=0)
    phi = rng.normal(scale=5.0, size=(1, 500)) + 1.0 * m + 0.3 * rng.normal(size=m.shape)
    lira, loss = attack_metrics(lira_scores(m, phi), m)["auc"], attack_metrics(phi, m)["auc"]
    assert lira > 0.9 and loss < 0.6


def _brute_force_auc_and_tpr(scores, members, fpr):
    pos, neg = scores[members], scores[~members]
    auc = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    best = 0.0
    for t in np.concatenate([scores, [np.inf]]):
        if (neg >= t).mean() <= fpr:
            best = max(best, (pos >= t).mean())
    return auc, best


def test_metrics_match_a_brute_force_pair_count_and_threshold_sweep():
    rng = np.random.default_rng(2)
    members = rng.random(3000) < 0.5
    scores = np.round(rng.normal(size=3000) + 0.8 * members, 1)  # rounding makes ties, the subtle case
    result = attack_metrics(scores, members)
    auc, tpr = _brute_force_auc_and_tpr(scores, members, 0.01)
    assert result["auc"] == pytest.approx(auc, rel=1e-12)
    assert result["tpr_at_fpr"]["0.01"] == pytest.approx(tpr, rel=1e-12)
    fprs, tprs, _ = roc_curve(members, scores)
    assert result["tpr_at_fpr"]["0.001"] == tprs[fprs <= 0.001].max()


def test_bootstrap_interval_brackets_the_auc_narrows_with_more_pairs_and_is_seeded():
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400):
        m = membership_matrix(8, n, seed=0)
        phi = rng.normal(size=m.shape) + 0.5 * m
        lo, hi = bootstrap_auc_interval(phi, m, num_resamples=300, seed=1)
        assert lo < attack_metrics(phi, m)["auc"] < hi
        assert (lo, hi) == bootstrap_auc_interval(phi, m, num_resamples=300, seed=1)
        assert attack_metrics(phi, m, num_resamples=300)["auc_interval"] == bootstrap_auc_interval(phi, m, 300)
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2
    m = membership_matrix(4, 20, seed=0)
    assert bootstrap_auc_interval(10.0 * m, m, num_resamples=50) == (1.0, 1.0)


def test_tpr_at_an_fpr_finer_than_the_negatives_allow_is_none():
    members = np.array([False] * 50 + [True] * 60)
    assert tpr_at_fpr(np.arange(110.0), members, 0.01) is None
    assert tpr_at_fpr(np.arange(110.0), members, 0.02) == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_shadows=3), "num_shadows"),
        (dict(num_shadows=5), "num_shadows"),
        (dict(num_shadows=2), "num_shadows"),
        (dict(num_examples=1), "num_examples"),
        (dict(num_examples=7), "num_examples"),
        (dict(variance="median"), "variance"),
        (dict(variance="per_example", num_shadows=4), "num_shadows >= 6"),
        (dict(bootstrap_resamples=-1), "bootstrap_resamples"),
    ],
)
def test_bad_audit_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AuditConfig(**kwargs)


def test_lira_rejects_bad_inputs():
    m = membership_matrix(4, 4, seed=0)
    with pytest.raises(ValueError, match="one shape"):
        lira_scores(m, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="IN and"):
        lira_scores(np.ones((4, 4), dtype=bool), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="variance"):
        lira_scores(m, np.zeros((4, 4)), variance="x")
    with pytest.raises(ValueError, match="both members and non-members"):
        attack_metrics(np.zeros(4), np.ones(4, dtype=bool))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and on a shared 2-core machine it made them many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_private(tmp_path, tokenizer):
    """A tiny student and a private set with random labels: membership is the only thing a prompt can learn."""
    import transformers as tf

    from peft_post.testing import tiny_config

    config = tiny_config("llama", len(tokenizer), num_layers=2, hidden_size=64, pad_token_id=tokenizer.pad_token_id)
    # At the default 0.02 the label slot barely sees the text and a prompt only learns the label bias (measured:
    # training loss flat at 0.68); larger weights let the prompt memorise its examples.
    config.initializer_range = 0.2
    torch.manual_seed(0)
    student = str(tmp_path / "student")
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(student)
    tokenizer.save_pretrained(student)
    rows = tiny_sentiment_rows(40, seed=5)
    rng = random.Random(0)
    for row in rows:
        row["label"] = rng.randint(0, 1)
    private = str(tmp_path / "private")
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(private)
    flags = dict(student_model=student, private_dataset=private, preset="quick", tune_max_steps=60,
                 tune_learning_rate=0.1, tune_batch_size=8, num_virtual_tokens=16, label_words="bad,awful|good,great",
                 eval_batch_size=16, save_steps=1000, run_dir=str(tmp_path / "run"))
    return flags


def test_overfit_prompts_are_audited_well_above_chance_and_a_rerun_reuses_every_shadow(tiny_private, tmp_path):
    cfg = PipelineConfig(dp=False, **tiny_private)
    audit = AuditConfig(num_examples=16, num_shadows=4, audit_dir=str(tmp_path / "audit"))
    result = run_audit(cfg, audit, command="test")
    # Measured: AUC 0.859 (loss attack 0.837); train accuracy 1.0 while held-out sits at chance on random labels.
    assert result["auc"] > 0.8 and result["auc_interval"][0] < result["auc"] < result["auc_interval"][1]
    assert result["shadow_train_accuracy"] == 1.0 and result["shadow_test_accuracy"] < 0.7
    assert result["num_pairs"] == 64 and result["num_member_pairs"] == 32
    # 32 non-member pairs cannot realise a 1 % false-positive rate.
    assert result["tpr_at_fpr"] == {"0.01": None, "0.001": None}
    assert result["privacy"] is None and result["shadows_reused"] == 0 and result["shadow_steps"] == 60
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert saved["auc"] == result["auc"] and saved["command"] == "test"
    shadow = json.loads((tmp_path / "audit" / "shadows" / "000" / "scores.json").read_text())
    assert sum(shadow["membership"]) == 8 and len(shadow["confidence"]) == 16
    # A shadow trains in memory: its half of the data, its prompt and its checkpoints never stay on disk.
    assert os.listdir(tmp_path / "audit" / "shadows" / "000") == ["scores.json"]
    stage = tmp_path / "audit" / "shadows" / "000" / "scores.json"
    mtime = os.path.getmtime(stage)

    again = run_audit(cfg, AuditConfig(num_examples=16, num_shadows=4, audit_dir=str(tmp_path / "audit")))
    assert again["shadows_reused"] == 4 and again["auc"] == result["auc"]
    assert os.path.getmtime(stage) == mtime
    with pytest.raises(ValueError, match="audit.num_shadows"):
        run_audit(cfg, AuditConfig(num_examples=16, num_shadows=6, audit_dir=str(tmp_path / "audit")))


@pytest.mark.parametrize(
    "flags,audit,match",
    [
        (dict(), dict(num_examples=50), "fewer than num_examples"),
        (dict(tune_batch_size=16), dict(num_examples=16), "tune_batch_size"),
        (dict(label_column="stars"), dict(num_examples=16), "no label column 'stars'"),
    ],
)
def test_bad_audit_arguments_fail_before_any_work(tiny_private, tmp_path, flags, audit, match):
    cfg = PipelineConfig(dp=False, **{**tiny_private, **flags})
    with pytest.raises(ValueError, match=match):
        run_audit(cfg, AuditConfig(num_shadows=4, audit_dir=str(tmp_path / "audit"), **audit))
    assert not (tmp_path / "audit").exists()


def test_cli_audit_of_dp_prompts(tiny_private, tmp_path, capsys):
    args = [f"--{k}={v}" for k, v in tiny_private.items()]
    # Batch 1 (q = 1/8) keeps the shadows' DP runs small.
    assert main(["audit", *args, "--dp", "true", "--dp_target_epsilon", "1",
                 "--tune_batch_size", "1", "--num_examples", "16", "--num_shadows", "4"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "audit_dp" / "audit.json").read_text())
    assert f"AUC {result['auc']:.3f}" in out and "4 shadows x 16 examples = 64 pairs" in out
    ledger = result["privacy"]
    assert ledger["steps"] == 60 and ledger["epsilon"] <= 1.0 and ledger["delta"] == 1 / 8
    assert result["command"].startswith("peft-post audit ")


def test_cli_audit_help_and_bad_flags(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "peft-post audit" in out and "--num_shadows" in out and "--tune_max_steps" in out
    assert main(["audit", "--run_dir", str(tmp_path / "r"), "--num_shadows", "5"]) == 2
    assert "num_shadows" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
