"""Empirical DP audit of prompt tuning: a multi-run distinguishing test that gives a statistically valid LOWER bound
on ε (Jagielski, Ullman & Oprea 2020, "Auditing Differentially Private Machine Learning: How Private is Private
SGD?"; Nasr, Song, Thakurta, Papernot & Carlini 2021, "Adversary Instantiation: Lower Bounds for Differentially
Private Machine Learning").

Two neighbouring training sets differ in one *canary* example: D holds the canary, D' replaces it by another
example (replace-one adjacency, the relation the library's ledger states) or lacks it (add/remove). The mechanism,
`DPPromptTrainer`, is run T times on each with fresh randomness, and every released prompt is turned into a number
by an attacker's statistic (higher means "the canary was in"). If training is (ε, δ)-DP, every test "guess D when
the statistic exceeds t" obeys

    1 − FNR ≤ e^ε · FPR + δ    and    1 − FPR ≤ e^ε · FNR + δ,

so ε ≥ max(log((1 − δ − FNR) / FPR), log((1 − δ − FPR) / FNR)). With one-sided Clopper-Pearson upper bounds on the
two error rates, each at level 1 − α/2 (so that both hold together with probability ≥ 1 − α), this is a lower
bound on ε that holds with probability ≥ 1 − α (`confidence`). The threshold, the direction of the test and (when
several statistics are given) the statistic are chosen on one half of the trials and the bound is evaluated on the
other half (``method="split"``), or on all trials with a DKW band that holds for every threshold at once
(``method="dkw"``).

A lower bound far below the claimed ε is the normal outcome for a correct mechanism audited in a black-box way
with a few hundred runs: it cannot prove the guarantee. What it does is refute a broken one: an ε_lb above the
claimed ε, at 95% confidence, means the claim is false (replayable noise, clipping off, no noise).

The statistics part (`clopper_pearson_upper`, `epsilon_from_rates`, `distinguishing_bound`,
`epsilon_lower_bound`, `max_epsilon_lower_bound`) is pure numpy/scipy; `run_distinguishing_audit` trains the
trials; `run_dp_audit` (``peft-post audit-dp``) runs it on the pipeline's student.
"""

from .bounds import (DIRECTIONS, METHODS, clopper_pearson_upper, distinguishing_bound, epsilon_from_rates,
                     epsilon_lower_bound, max_epsilon_lower_bound)
from .config import CASES, DP_AUDIT_FILE, DPAuditConfig
from .runner import calibrated_noise_multiplier, case_dp_configs, case_statistics, run_dp_audit
from .trials import (CANARY_CANDIDATES, DEFAULT_CANARY_TEXT, DEFAULT_STATISTICS, AuditSetup, Release,
                     canary_direction, canary_loss_statistic, canary_margin_statistic, choose_canary,
                     claimed_epsilon, flipped_label, gradient_alignment_statistic, max_example_gradient_norm,
                     neighbouring_datasets, replay_statistic, run_distinguishing_audit, to_jsonable)
from ..tuning.accountant import ADD_OR_REMOVE_ONE, ADJACENCIES, REPLACE_ONE

__all__ = [
    "ADD_OR_REMOVE_ONE",
    "ADJACENCIES",
    "AuditSetup",
    "CANARY_CANDIDATES",
    "CASES",
    "DEFAULT_CANARY_TEXT",
    "DEFAULT_STATISTICS",
    "DIRECTIONS",
    "DPAuditConfig",
    "DP_AUDIT_FILE",
    "METHODS",
    "REPLACE_ONE",
    "Release",
    "calibrated_noise_multiplier",
    "canary_direction",
    "canary_loss_statistic",
    "canary_margin_statistic",
    "case_dp_configs",
    "case_statistics",
    "choose_canary",
    "claimed_epsilon",
    "clopper_pearson_upper",
    "distinguishing_bound",
    "epsilon_from_rates",
    "epsilon_lower_bound",
    "flipped_label",
    "gradient_alignment_statistic",
    "max_epsilon_lower_bound",
    "max_example_gradient_norm",
    "neighbouring_datasets",
    "replay_statistic",
    "run_distinguishing_audit",
    "run_dp_audit",
    "to_jsonable",
]
