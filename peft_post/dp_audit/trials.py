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

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .tuning.accountant import ADD_OR_REMOVE_ONE, ADJACENCIES, REPLACE_ONE

METHODS = ("split", "dkw")
DIRECTIONS = ("greater", "less")
DP_AUDIT_FILE = "dp_audit.json"
# An out-of-distribution canary for sentiment tasks: rare words and symbols, so its prompt gradient points where the
# task's examples do not push; its label is chosen against the model's initial prediction (`flipped_label`).
DEFAULT_CANARY_TEXT = "zq xv 0x7f qqj ~~ vvk pfft zzt 9z9 kx jjq wxq"


# ================================================================================================ pure statistics
def clopper_pearson_upper(errors: int, trials: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound on a binomial rate: P(rate ≤ bound) ≥ `confidence`.

    ``Beta(confidence; k + 1, n − k)``, 1 when k = n; for k = 0 it is 1 − (1 − confidence)^(1/n).
    """
    from scipy.stats import beta

    errors, trials = int(errors), int(trials)
    if trials < 1 or not 0 <= errors <= trials:
        raise ValueError(f"Need 0 <= errors <= trials and trials >= 1, got errors={errors}, trials={trials}.")
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}.")
    if errors == trials:
        return 1.0
    return float(beta.ppf(confidence, errors + 1, trials - errors))


def epsilon_from_rates(fpr: float, fnr: float, delta: float) -> float:
    """The ε an (ε, δ)-DP mechanism needs for a test with these error rates (0 when none):
    max(log((1 − δ − FNR) / FPR), log((1 − δ − FPR) / FNR), 0); ∞ when a numerator is positive over a 0 rate."""
    if not 0 <= delta < 1:
        raise ValueError(f"`delta` must be in [0, 1), got {delta!r}.")
    best = 0.0
    for miss, false_alarm in ((fnr, fpr), (fpr, fnr)):
        numerator = 1.0 - delta - miss
        if numerator <= 0:
            continue
        if false_alarm <= 0:
            return math.inf
        best = max(best, math.log(numerator / false_alarm))
    return best


def _as_matrix(scores, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"`{name}` must be a non-empty (T,) or (T, S) array of scores, got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"`{name}` holds NaN or infinite scores; statistics must be finite numbers.")
    return arr


def _error_counts(scores_in: np.ndarray, scores_out: np.ndarray, thresholds: np.ndarray, direction: str):
    """(false negatives, false positives) of "guess IN iff score > t" ("greater") or "< t" ("less"), per threshold."""
    a, b = np.sort(scores_in), np.sort(scores_out)
    if direction == "greater":  # IN iff s > t: FN = #in ≤ t, FP = #out > t
        return np.searchsorted(a, thresholds, side="right"), len(b) - np.searchsorted(b, thresholds, side="right")
    return len(a) - np.searchsorted(a, thresholds, side="left"), np.searchsorted(b, thresholds, side="left")


def _candidates(scores_in: np.ndarray, scores_out: np.ndarray) -> np.ndarray:
    """Midpoints between consecutive distinct scores, plus one below all and one above all."""
    values = np.unique(np.concatenate([scores_in, scores_out]))
    mids = (values[:-1] + values[1:]) / 2
    return np.concatenate([[values[0] - 1.0], mids, [values[-1] + 1.0]])


def _cp_upper_vec(errors: np.ndarray, trials: int, confidence: float) -> np.ndarray:
    from scipy.stats import beta

    errors = np.asarray(errors)
    upper = beta.ppf(confidence, errors + 1, np.maximum(trials - errors, 1))
    return np.where(errors >= trials, 1.0, upper)


def _eps_vec(fpr: np.ndarray, fnr: np.ndarray, delta: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.where(1 - delta - fnr > 0, np.log(np.maximum(1 - delta - fnr, 1e-300) / fpr), 0.0)
        two = np.where(1 - delta - fpr > 0, np.log(np.maximum(1 - delta - fpr, 1e-300) / fnr), 0.0)
    return np.maximum(np.maximum(one, two), 0.0)


def _dkw_margin(n: int, alpha: float) -> float:
    """λ with P(sup_t |F_n(t) − F(t)| > λ) ≤ alpha (Dvoretzky-Kiefer-Wolfowitz with Massart's constant)."""
    return math.sqrt(math.log(2.0 / alpha) / (2.0 * n))


def _upper_rates(fn, fp, n_in, n_out, method: str, alpha: float, num_statistics: int):
    """Upper confidence bounds on FNR and FPR (arrays), holding together with probability ≥ 1 − alpha."""
    if method == "dkw":
        # One two-sided band per (side, statistic): valid for every threshold and both directions at once.
        a = alpha / (2 * num_statistics)
        return (np.minimum(fn / n_in + _dkw_margin(n_in, a), 1.0),
                np.minimum(fp / n_out + _dkw_margin(n_out, a), 1.0))
    return _cp_upper_vec(fn, n_in, 1 - alpha / 2), _cp_upper_vec(fp, n_out, 1 - alpha / 2)


def _separation(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """|AUC − ½| of one statistic: how well it ranks the two sides, whatever the direction (a tie-breaker)."""
    a, b = scores_in[:, None], scores_out[None, :]
    return abs(float((a > b).mean() + 0.5 * (a == b).mean()) - 0.5)


def _best_test(scores_in: np.ndarray, scores_out: np.ndarray, delta: float, method: str, alpha: float):
    """The (statistic, direction, threshold) whose bound on these scores is largest, with that bound. Statistics that
    tie on the bound (common with few trials, where it takes few values) are told apart by their separation."""
    best, best_key = None, None
    for s in range(scores_in.shape[1]):
        thresholds = _candidates(scores_in[:, s], scores_out[:, s])
        separation = _separation(scores_in[:, s], scores_out[:, s])
        for direction in DIRECTIONS:
            fn, fp = _error_counts(scores_in[:, s], scores_out[:, s], thresholds, direction)
            fnr_hi, fpr_hi = _upper_rates(fn, fp, len(scores_in), len(scores_out), method, alpha, scores_in.shape[1])
            eps = _eps_vec(fpr_hi, fnr_hi, delta)
            # Among equally good thresholds prefer the middle one (the middle of a separating gap).
            top = np.flatnonzero(eps == eps.max())
            i = int(top[len(top) // 2])
            # Point estimate of the error rates as a second tie-breaker between directions.
            errors = -(fn[i] / len(scores_in) + fp[i] / len(scores_out))
            key = (round(float(eps[i]), 12), round(separation, 12), errors)
            if best_key is None or key > best_key:
                best, best_key = (float(eps[i]), s, direction, float(thresholds[i])), key
    return best


def distinguishing_bound(
    scores_in,
    scores_out,
    delta: float,
    confidence: float = 0.95,
    method: str = "split",
    threshold: Optional[float] = None,
    direction: str = "greater",
    statistic: int = 0,
    seed: int = 0,
) -> dict:
    """The ε lower bound of a distinguishing test between releases on D (`scores_in`) and on D' (`scores_out`), with
    everything that produced it.

    Scores are (T,) arrays, or (T, S) arrays of S statistics per release; higher should mean "trained on D", but
    the direction is chosen from the data too. With `threshold` given (chosen before seeing the scores), the test
    "IN iff score > threshold" (`direction="greater"`, or "< threshold" for "less") on column `statistic` is
    evaluated on all trials. Otherwise, ``method="split"`` shuffles each side (seeded) and picks the statistic,
    direction and threshold that maximise the bound on the first ⌊T/2⌋ trials, then evaluates that test on the
    rest; ``method="dkw"`` picks on all trials and replaces Clopper-Pearson by a DKW band valid for every threshold.

    ε_lb = max(log((1 − δ − FNR⁺) / FPR⁺), log((1 − δ − FPR⁺) / FNR⁺), 0), where FPR⁺ and FNR⁺ are upper
    confidence bounds that hold together with probability ≥ `confidence` (each at 1 − α/2).
    """
    a, b = _as_matrix(scores_in, "scores_in"), _as_matrix(scores_out, "scores_out")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"scores_in has {a.shape[1]} statistics per release, scores_out {b.shape[1]}.")
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}.")
    if not 0 <= delta < 1:
        raise ValueError(f"`delta` must be in [0, 1), got {delta!r}.")
    if direction not in DIRECTIONS:
        raise ValueError(f"`direction` must be one of {DIRECTIONS}, got {direction!r}.")
    alpha = 1 - confidence
    selection = None
    if threshold is not None:
        if not 0 <= statistic < a.shape[1]:
            raise ValueError(f"`statistic` {statistic} is out of range for {a.shape[1]} statistics.")
        chosen, method, eval_in, eval_out = (statistic, direction, float(threshold)), "fixed", a, b
    elif method == "split":
        if len(a) < 2 or len(b) < 2:
            raise ValueError("The split method needs at least 2 trials per side (half selects, half evaluates).")
        rng = np.random.default_rng(seed)
        a, b = a[rng.permutation(len(a))], b[rng.permutation(len(b))]
        sel_in, eval_in = a[: len(a) // 2], a[len(a) // 2:]
        sel_out, eval_out = b[: len(b) // 2], b[len(b) // 2:]
        eps_sel, s, d, t = _best_test(sel_in, sel_out, delta, "split", alpha)
        chosen = (s, d, t)
        selection = {"num_in": len(sel_in), "num_out": len(sel_out), "epsilon_lb_on_selection_half": eps_sel}
    elif method == "dkw":
        _, s, d, t = _best_test(a, b, delta, "dkw", alpha)
        chosen, eval_in, eval_out = (s, d, t), a, b
    else:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    s, d, t = chosen
    fn, fp = _error_counts(eval_in[:, s], eval_out[:, s], np.array([t]), d)
    n_in, n_out = len(eval_in), len(eval_out)
    fnr_hi, fpr_hi = _upper_rates(fn, fp, n_in, n_out, "dkw" if method == "dkw" else "cp", alpha, a.shape[1])
    eps = epsilon_from_rates(float(fpr_hi[0]), float(fnr_hi[0]), delta)
    return {
        "epsilon_lb": eps,
        "max_epsilon_lb": max_epsilon_lower_bound(n_in, n_out, delta, confidence, method, a.shape[1]),
        "method": method,
        "confidence": confidence,
        "delta": delta,
        "statistic": int(s),
        "direction": d,
        "threshold": t,
        "num_in": n_in,
        "num_out": n_out,
        "false_negatives": int(fn[0]),
        "false_positives": int(fp[0]),
        "fnr": float(fn[0]) / n_in,
        "fpr": float(fp[0]) / n_out,
        "fnr_upper": float(fnr_hi[0]),
        "fpr_upper": float(fpr_hi[0]),
        "selection": selection,
        "seed": seed if method == "split" else None,
    }


def epsilon_lower_bound(scores_in, scores_out, delta: float, confidence: float = 0.95, **kwargs) -> float:
    """ε_lb of `distinguishing_bound` (same arguments): ε ≥ ε_lb with probability ≥ `confidence` if the scores are
    i.i.d. releases of the mechanism on D and on D'."""
    return distinguishing_bound(scores_in, scores_out, delta, confidence, **kwargs)["epsilon_lb"]


def max_epsilon_lower_bound(num_in: int, num_out: int, delta: float, confidence: float = 0.95,
                            method: str = "fixed", num_statistics: int = 1) -> float:
    """The largest ε_lb that `num_in` / `num_out` evaluated trials can give: a test with no errors at all.

    For Clopper-Pearson ("fixed", "split": pass the evaluated counts) the zero-error bound is 1 − (α/2)^(1/n), so
    with n evaluated trials per side ε_lb ≤ log(((α/2)^(1/n) − δ) / (1 − (α/2)^(1/n))). To certify ε = 8 at δ ≈ 0
    and 95% confidence takes about e^8 · ln(40) ≈ 11 000 evaluated trials per side (twice that with the split); a few
    hundred trials can refute ε ≲ 3.
    """
    alpha = 1 - confidence
    fn, fp = np.array([0]), np.array([0])
    fnr_hi, fpr_hi = _upper_rates(fn, fp, int(num_in), int(num_out), "dkw" if method == "dkw" else "cp", alpha,
                                  num_statistics)
    return epsilon_from_rates(float(fpr_hi[0]), float(fnr_hi[0]), delta)


# ================================================================================================ the trials
@dataclass
class Release:
    """What the attacker sees of one training run: the released prompt and the published artifacts.

    `seed` is the Trainer seed (published in older releases' provenance, and guessable from defaults);
    `noise_seed` is `DPConfig.insecure_noise_seed` when the run used one (then the ledger says the guarantee is
    void and the seed counts as published), None for secret OS-entropy noise."""

    prompt: torch.Tensor
    ledger: dict
    seed: int
    noise_seed: Optional[int] = None


class AuditSetup:
    """The model (loaded once), the two neighbouring datasets and the recipe; `train` runs the mechanism once.

    Statistic functions get ``(release, setup)`` and may use everything here: the threat model is the strongest
    one DP covers, an attacker who knows all of D and D' and the training recipe and sees the released prompt.
    """

    def __init__(self, model, tokenizer, dataset_in, dataset_out, canary: dict, replacement: Optional[dict],
                 dp_config, training_args, adjacency: str):
        from .modeling import prompt_parameter
        from .prompts import get_prompt
        from .tasks import TaskTemplate, Verbalizer, VerbalizerCollator

        self.model = model
        self.tokenizer = tokenizer
        self.dataset_in, self.dataset_out = dataset_in, dataset_out
        self.canary, self.replacement = canary, replacement
        self.dp_config = dp_config
        self.training_args = training_args
        self.adjacency = adjacency
        self.post_config = model.peft_config[model.active_adapter]
        self.verbalizer = Verbalizer.from_config(self.post_config, tokenizer)
        self.text_column = getattr(training_args, "text_column", "text")
        self.label_column = getattr(training_args, "label_column", "label")
        self.collator = VerbalizerCollator(TaskTemplate.from_config(self.post_config, tokenizer), self.text_column,
                                           self.label_column)
        self.initial_prompt = get_prompt(model)
        self._prompt = prompt_parameter(model)
        self._cache: dict = {}
        self._noise_multipliers: dict = {}
        self.warnings: set = set()

    # ---- the mechanism
    def reset_prompt(self) -> None:
        from .prompts import set_prompt

        set_prompt(self.model, self.initial_prompt)

    def train(self, dataset, seed: int, noise_seed: Optional[int] = None) -> Release:
        """One run of `DPPromptTrainer` from the initial prompt on `dataset`; returns its release."""
        from transformers.trainer_callback import PrinterCallback

        from .prompts import get_prompt
        from .tuning import DPPromptTrainer

        self.reset_prompt()
        dp = self.dp_config
        if noise_seed is not None:
            dp = dataclasses.replace(dp, insecure_noise_seed=noise_seed)
        # σ and the ledger depend on the DPConfig and N only (not on the run's randomness): calibrate σ and compute
        # the ledger once per (config, N) rather than per run.
        key = (len(dataset), repr(dataclasses.replace(dp, insecure_noise_seed=None) if noise_seed is not None else dp),
               noise_seed is not None)
        known = self._noise_multipliers.get(key)
        run_dp = dp
        if known is not None and dp.target_epsilon is not None:
            run_dp = dataclasses.replace(dp, target_epsilon=None, noise_multiplier=known[0])
        outdir = tempfile.mkdtemp(prefix="peft-post-dp-audit-")
        try:
            args = dataclasses.replace(self.training_args, output_dir=outdir, seed=seed)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer = DPPromptTrainer(self.model, args, dp_config=run_dp, train_dataset=dataset,
                                          processing_class=self.tokenizer)
                trainer.remove_callback(PrinterCallback)
                trainer.train()
                if known is None:
                    known = (float(trainer.noise_multiplier), trainer.privacy_report())
                    self._noise_multipliers[key] = known
            self.warnings.update(str(w.message).split("\n")[0][:200] for w in caught)
        finally:
            shutil.rmtree(outdir, ignore_errors=True)
        if int(trainer.state.global_step) != int(known[1]["steps"]):
            raise RuntimeError(f"A run took {trainer.state.global_step} steps, its ledger counts {known[1]['steps']}.")
        return Release(prompt=get_prompt(self.model), ledger=dict(known[1]), seed=seed,
                       noise_seed=dp.insecure_noise_seed)

    # ---- helpers for statistics
    def example_batch(self, rows: Sequence[dict]) -> dict:
        return self.collator(list(rows))

    def class_scores(self, prompt: torch.Tensor, rows: Sequence[dict]) -> torch.Tensor:
        """(B, C) class scores of `rows` under `prompt` (no gradient)."""
        from .modeling import label_logits

        batch = self.example_batch(rows)
        device = self._prompt.device
        with torch.no_grad(), _eval_mode(self.model):
            logits = label_logits(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  batch["label_positions"].to(device), prompt=prompt.to(device))
        return self.verbalizer.class_scores(logits).float().cpu()

    def prompt_gradient(self, row: dict, prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The (n, d) gradient of `row`'s verbalizer loss w.r.t. the prompt (default: the initial prompt)."""
        from .losses import verbalizer_loss
        from .modeling import label_logits

        device = self._prompt.device
        p = (self.initial_prompt if prompt is None else prompt).detach().to(device).clone().requires_grad_(True)
        batch = self.example_batch([row])
        with _eval_mode(self.model):
            logits = label_logits(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  batch["label_positions"].to(device), prompt=p.unsqueeze(0))
        loss = verbalizer_loss(logits, batch["labels"].to(device), self.verbalizer.index.to(device),
                               self.verbalizer.weight.to(device))
        (grad,) = torch.autograd.grad(loss, p)
        return grad.detach().float().cpu()

    def cached(self, key: str, compute: Callable):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


class _eval_mode:
    """Run the model in eval mode (no dropout) and restore its mode afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


Statistic = Callable[[Release, AuditSetup], float]


def canary_loss_statistic(release: Release, setup: AuditSetup) -> float:
    """−(verbalizer cross-entropy of the canary) under the released prompt: higher when the canary was trained on."""
    scores = setup.class_scores(release.prompt, [setup.canary])
    label = torch.tensor([int(setup.canary[setup.label_column])])
    return -float(torch.nn.functional.cross_entropy(scores, label))


def canary_margin_statistic(release: Release, setup: AuditSetup) -> float:
    """The canary's class-score margin s_y − max_{c≠y} s_c under the released prompt."""
    scores = setup.class_scores(release.prompt, [setup.canary])[0]
    y = int(setup.canary[setup.label_column])
    others = torch.cat([scores[:y], scores[y + 1:]])
    return float(scores[y] - others.max())


def canary_direction(setup: AuditSetup) -> torch.Tensor:
    """Unit vector of the canary's prompt gradient at p_0 with the span of every other training example's gradient at
    p_0 projected out (the rows D and D' share, and the replacement): the direction in which only the canary pushes.
    Cached per setup; N + 1 single-example backward passes."""
    def compute():
        rows = [dict(r) for r in setup.dataset_out]
        basis = torch.stack([setup.prompt_gradient(r).flatten().double() for r in rows])
        g = setup.prompt_gradient(setup.canary).flatten().double()
        q, _ = torch.linalg.qr(basis.T)  # orthonormal basis of the others' gradients (d, N)
        residual = g - q @ (q.T @ g)
        if residual.norm() < 1e-6 * g.norm().clamp_min(1e-30):
            residual = g  # the canary's gradient lies in the others' span: fall back to it
        return (residual / residual.norm().clamp_min(1e-30)).float().view_as(setup.initial_prompt)

    return setup.cached("canary_direction", compute)


def gradient_alignment_statistic(release: Release, setup: AuditSetup) -> float:
    """White-box: how far the prompt moved against the canary's gradient, ⟨p_0 − p, u⟩ with u = `canary_direction`
    (the canary's gradient at p_0, orthogonal to every other example's). Each step that samples the canary moves the
    prompt along −g_canary, and the other examples' steps move it (to first order) only within their own span, so
    releases on D score higher and the sampling of the other examples adds little variance."""
    u = canary_direction(setup)
    return float(((setup.initial_prompt.float() - release.prompt.float().cpu()) * u).sum())


def replay_statistic(release: Release, setup: AuditSetup) -> float:
    """The replay attack: retrain on D with the seeds the release publishes (the Trainer seed and, when the run used
    one, `insecure_noise_seed`) and return −‖release − replay‖. Replayable noise gives exactly 0 for releases on D;
    secret noise gives a fresh draw, unrelated to the release. Costs one training run per release."""
    replay = setup.train(setup.dataset_in, seed=release.seed, noise_seed=release.noise_seed)
    return 0.0 - float((release.prompt.float() - replay.prompt.float()).norm())  # 0.0, not -0.0, for a replay


STATISTICS: dict = {
    "canary_loss": canary_loss_statistic,
    "canary_margin": canary_margin_statistic,
    "gradient_alignment": gradient_alignment_statistic,
    "replay": replay_statistic,
}
DEFAULT_STATISTICS = ("canary_loss", "canary_margin", "gradient_alignment")


def neighbouring_datasets(dataset, canary: dict, adjacency: str = REPLACE_ONE, replacement: Optional[dict] = None):
    """(D, D'): D is `dataset` with `canary` appended; D' has `replacement` in the canary's place (replace-one;
    default replacement: the dataset's first example, duplicated) or no last row at all (add/remove).

    The canary sits at the same index in both, so Poisson sampling with the same randomness picks the same rows."""
    from datasets import Dataset, concatenate_datasets

    if adjacency not in ADJACENCIES:
        raise ValueError(f"`adjacency` must be one of {ADJACENCIES}, got {adjacency!r}.")
    columns = dataset.column_names
    missing = [c for c in columns if c not in canary]
    if missing:
        raise ValueError(f"The canary lacks the dataset's columns {missing}.")
    features = dataset.features

    def row(r):
        return Dataset.from_list([{c: r[c] for c in columns}], features=features)

    d_in = concatenate_datasets([dataset, row(canary)])
    if adjacency == ADD_OR_REMOVE_ONE:
        return d_in, dataset, None
    replacement = dict(dataset[0]) if replacement is None else replacement
    return d_in, concatenate_datasets([dataset, row(replacement)]), replacement


def flipped_label(model, tokenizer, text: str, label_column: str = "label", text_column: str = "text") -> int:
    """The class the model (with its current prompt) scores LOWEST for `text`: a canary labelled so has a large loss,
    hence a large (clipped) gradient, at the start of training."""
    from .modeling import label_logits
    from .tasks import TaskTemplate, Verbalizer, VerbalizerCollator

    config = model.peft_config[model.active_adapter]
    collator = VerbalizerCollator(TaskTemplate.from_config(config, tokenizer), text_column, None)
    batch = collator([{text_column: text}])
    device = next(model.parameters()).device
    with torch.no_grad(), _eval_mode(model):
        logits = label_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                              batch["label_positions"].to(device))
    return int(Verbalizer.from_config(config, tokenizer).class_scores(logits)[0].argmin())


CANARY_CANDIDATES = (
    DEFAULT_CANARY_TEXT,
    "a",
    ".",
    "Review: great\nSentiment: positive\nReview: awful\nSentiment: negative\nReview: fine",
    "Sentiment: Sentiment: Sentiment: Sentiment:",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
)


def choose_canary(model, tokenizer, dataset, texts: Sequence[str] = CANARY_CANDIDATES, text_column: str = "text",
                  label_column: str = "label") -> tuple[dict, list]:
    """The auditor's canary: among `texts`, each labelled with `flipped_label`, the one whose prompt gradient at the
    initial prompt has the largest component orthogonal to every example of `dataset` (`canary_direction`): the
    strongest signal the canary statistics can pick up. Depends on the model and the public recipe only, never on a
    run's outcome. Returns the canary row and every candidate's (text, label, gradient norm, orthogonal part)."""
    from .tuning import DPConfig, PromptTrainingConfig

    table, best = [], None
    args = PromptTrainingConfig(output_dir="unused", text_column=text_column, label_column=label_column)
    for text in texts:
        row = {text_column: text, label_column: flipped_label(model, tokenizer, text, label_column, text_column)}
        d_in, d_out, replacement = neighbouring_datasets(dataset, row, ADD_OR_REMOVE_ONE)
        setup = AuditSetup(model, tokenizer, d_in, d_out, row, None, DPConfig(noise_multiplier=1.0), args,
                           ADD_OR_REMOVE_ONE)
        g = setup.prompt_gradient(row)
        orthogonal = float((g * canary_direction(setup)).sum())
        table.append({"text": text, "label": row[label_column], "gradient_norm": float(g.norm()),
                      "orthogonal_norm": orthogonal})
        if best is None or orthogonal > best[0]:
            best = (orthogonal, row)
    return best[1], table


def max_example_gradient_norm(model, tokenizer, rows: Sequence[dict], text_column: str = "text",
                              label_column: str = "label") -> float:
    """The largest per-example prompt-gradient norm over `rows` at the model's current prompt: a clipping bound
    above it clips nothing (at the start of training)."""
    from .tuning import DPConfig, PromptTrainingConfig

    rows = [dict(r) for r in rows]
    from datasets import Dataset

    data = Dataset.from_list(rows)
    args = PromptTrainingConfig(output_dir="unused", text_column=text_column, label_column=label_column)
    setup = AuditSetup(model, tokenizer, data, data, rows[0], None, DPConfig(noise_multiplier=1.0), args,
                       ADD_OR_REMOVE_ONE)
    return max(float(setup.prompt_gradient(r).norm()) for r in rows)


def _json_number(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return x


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float):
        return _json_number(obj)
    return obj


def claimed_epsilon(ledger: dict, adjacency: str) -> float:
    """The ledger's ε for `adjacency` (`epsilon` is the trainer's stated guarantee; `epsilon_add_remove` when the
    ledger states replace-one and the audit uses add/remove)."""
    if adjacency == ADD_OR_REMOVE_ONE and ledger.get("adjacency", REPLACE_ONE) != ADD_OR_REMOVE_ONE:
        return float(ledger.get("epsilon_add_remove", ledger["epsilon"]))
    return float(ledger["epsilon"])


def run_distinguishing_audit(
    model_factory: Union[Callable[[], object], object],
    tokenizer,
    dataset,
    canary: dict,
    dp_config,
    training_args,
    trials: int = 32,
    statistics: Union[Sequence[str], Mapping[str, Statistic]] = DEFAULT_STATISTICS,
    adjacency: str = REPLACE_ONE,
    replacement: Optional[dict] = None,
    confidence: float = 0.95,
    method: str = "split",
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Train `trials` releases on D = dataset + canary and `trials` on its neighbour D', score each with every
    statistic, and bound ε from below (`distinguishing_bound`, selecting the statistic on the selection half).

    `model_factory` returns a fresh ``get_peft_model(base, POSTConfig(...))`` (or is that model); it is called once and
    the prompt is reset to its initial value before every run. `dp_config` is a `DPConfig`; when it sets
    `insecure_noise_seed`, every run gets its own fresh seed (trials must be independent), which counts as
    published. `training_args` is a `PromptTrainingConfig` (or a dict of its arguments); its seed is replaced by a
    fresh one per run. Runs on D and D' alternate, each with seeds drawn independently of its side. Returns a
    JSON-ready dict: every score, the bound and its test, the claimed ε of the ledger, the full ledger, the settings.
    """
    from .tuning import DPConfig, PromptTrainingConfig

    if not isinstance(dp_config, DPConfig):
        raise ValueError(f"`dp_config` must be a DPConfig, got {type(dp_config).__name__}.")
    if isinstance(training_args, dict):
        training_args = PromptTrainingConfig(**{"output_dir": "dp-audit", **training_args})
    if not isinstance(training_args, PromptTrainingConfig):
        raise ValueError(f"`training_args` must be a PromptTrainingConfig or a dict, got "
                         f"{type(training_args).__name__}.")
    if not isinstance(trials, int) or trials < 2:
        raise ValueError(f"`trials` (runs per dataset) must be an int >= 2, got {trials!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if not isinstance(statistics, Mapping):
        unknown = [s for s in statistics if s not in STATISTICS]
        if unknown:
            raise ValueError(f"Unknown statistics {unknown}; choose from {sorted(STATISTICS)} or pass functions.")
        statistics = {name: STATISTICS[name] for name in statistics}
    if not statistics:
        raise ValueError("Give at least one statistic.")
    training_args = dataclasses.replace(training_args, save_strategy="no", report_to="none", disable_tqdm=True,
                                        logging_strategy="no")
    say = progress or (lambda message: None)
    start = time.perf_counter()
    is_factory = callable(model_factory) and not isinstance(model_factory, torch.nn.Module)
    model = model_factory() if is_factory else model_factory
    d_in, d_out, replacement = neighbouring_datasets(dataset, canary, adjacency, replacement)
    setup = AuditSetup(model, tokenizer, d_in, d_out, canary, replacement, dp_config, training_args, adjacency)
    replayable = dp_config.insecure_noise_seed is not None

    rng = np.random.default_rng(seed)
    order = [side for _ in range(trials) for side in (True, False)]
    seeds = rng.integers(0, 2**31 - 1, size=(len(order), 2))
    scores = {True: {name: [] for name in statistics}, False: {name: [] for name in statistics}}
    runs, ledgers = [], {}
    for i, (side, (train_seed, noise_seed)) in enumerate(zip(order, seeds)):
        t0 = time.perf_counter()
        release = setup.train(d_in if side else d_out, int(train_seed), int(noise_seed) if replayable else None)
        ledgers.setdefault(side, release.ledger)
        t1 = time.perf_counter()
        values = {name: float(fn(release, setup)) for name, fn in statistics.items()}
        for name, value in values.items():
            scores[side][name].append(value)
        runs.append({"canary_in": side, "seed": int(train_seed), "noise_seed": release.noise_seed,
                     "train_s": t1 - t0, "statistics_s": time.perf_counter() - t1, **values})
        if (i + 1) % 10 == 0 or i + 1 == len(order):
            say(f"dp audit: {i + 1}/{len(order)} runs, {time.perf_counter() - start:.0f} s")
    setup.reset_prompt()

    names = list(statistics)
    matrix_in = np.array([scores[True][n] for n in names]).T
    matrix_out = np.array([scores[False][n] for n in names]).T
    delta = float(ledgers[True]["delta"])
    bound = distinguishing_bound(matrix_in, matrix_out, delta, confidence, method=method, seed=seed)
    bound["statistic"] = names[bound["statistic"]]
    per_statistic = {}
    for j, name in enumerate(names):
        b = distinguishing_bound(matrix_in[:, j], matrix_out[:, j], delta, confidence, method=method, seed=seed)
        b.pop("statistic")
        per_statistic[name] = {**b, "scores_in": scores[True][name], "scores_out": scores[False][name],
                               "auc": _auc(scores[True][name], scores[False][name])}
    claimed = claimed_epsilon(ledgers[True], adjacency)
    dp_settings = {k: v for k, v in dataclasses.asdict(dp_config).items()}
    return _jsonable({
        "epsilon_lb": bound["epsilon_lb"],
        "claimed_epsilon": claimed,
        "refutes_claim": bool(bound["epsilon_lb"] > claimed),
        "max_epsilon_lb": bound["max_epsilon_lb"],
        "bound": bound,
        "per_statistic": per_statistic,
        "ledger": ledgers[True],
        "ledger_out": ledgers[False] if ledgers[False] != ledgers[True] else None,
        "adjacency": adjacency,
        "trials_per_dataset": trials,
        "num_examples_in": len(d_in),
        "num_examples_out": len(d_out),
        "canary": dict(canary),
        "replacement": dict(replacement) if replacement is not None else None,
        "dp_config": dp_settings,
        "training_args": {k: getattr(training_args, k) for k in (
            "max_steps", "num_train_epochs", "per_device_train_batch_size", "learning_rate", "weight_decay", "optim",
            "lr_scheduler_type")},
        "statistics": names,
        "runs": runs,
        "warnings": sorted(setup.warnings),
        "wall_time_s": time.perf_counter() - start,
    })


def _auc(scores_in: Sequence[float], scores_out: Sequence[float]) -> float:
    """P(score_in > score_out) + ½ P(tie): how well the statistic ranks releases on D above releases on D'."""
    a, b = np.asarray(scores_in)[:, None], np.asarray(scores_out)[None, :]
    return float((a > b).mean() + 0.5 * (a == b).mean())


# ======================================================================================== CLI: peft-post audit-dp
CASES = ("honest", "replay", "no_clipping", "no_noise")


@dataclass
class DPAuditConfig:
    """Arguments of `peft-post audit-dp` beyond the pipeline's (which give the student, private data, template,
    label words, prompt length, DP budget and clipping bound)."""

    cases: str = field(
        default="honest,no_noise",
        metadata={"help": "Comma-separated mechanisms to audit: 'honest' (the pipeline's DP settings, secret noise), "
                  "and deliberately broken controls: 'replay' (insecure_noise_seed, replayed by the attacker), "
                  "'no_clipping' (C above every example's gradient norm, same noise std σC) and 'no_noise' (σ = 0). "
                  "A control whose ε_lb stays low shows the audit is too weak to say anything."},
    )
    trials: int = field(default=32, metadata={"help": "Training runs per dataset (D and D') per case."})
    num_examples: int = field(
        default=16,
        metadata={"help": "Examples of the private training split in both datasets; D adds the canary, D' a "
                  "replacement (one more example of the split)."})
    steps: int = field(default=4, metadata={"help": "DP-SGD steps of each run."})
    batch_size: int = field(
        default=12,
        metadata={"help": "Expected Poisson batch (q = batch / N). A high q (12/17 by default) makes nearly every run "
                  "draw the canary, which the audit needs; it says nothing about the real training's q."})
    optim: str = field(
        default="sgd",
        metadata={"help": "Optimizer of the runs (a TrainingArguments `optim`). The optimizer is post-processing of "
                  "the noisy gradients, so any choice audits the same mechanism; plain SGD keeps the canary's "
                  "signal linear in the release and so gives the attack the most power."})
    learning_rate: float = field(default=0.01, metadata={"help": "Learning rate of the runs (small: linear regime)."})
    noise_multiplier: Optional[float] = field(
        default=None, metadata={"help": "σ of the honest case; None calibrates σ to the pipeline's target_epsilon."})
    canary_text: Optional[str] = field(
        default=None,
        metadata={"help": "Text of the canary; None picks, from a few out-of-distribution candidates, the one whose "
                  "gradient is largest outside the span of the data's (`choose_canary`)."})
    adjacency: str = field(default=REPLACE_ONE, metadata={"help": f"One of {ADJACENCIES}."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence of the ε lower bound."})
    method: str = field(default="split", metadata={"help": f"Threshold selection: one of {METHODS}."})
    output: Optional[str] = field(
        default=None, metadata={"help": f"Where to write the result (default <run_dir>/{DP_AUDIT_FILE})."})

    def __post_init__(self):
        cases = self.case_list()
        unknown = [c for c in cases if c not in CASES]
        if unknown or not cases:
            raise ValueError(f"`cases` must list some of {CASES}, got {self.cases!r}.")
        for name in ("trials", "num_examples", "steps", "batch_size"):
            value = getattr(self, name)
            least = 2 if name == "trials" else 1
            if not isinstance(value, int) or value < least:
                raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}.")
        if self.batch_size > self.num_examples:
            raise ValueError(f"`batch_size` ({self.batch_size}) must be at most `num_examples` ({self.num_examples}).")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"`learning_rate` must be > 0, got {self.learning_rate!r}.")
        if self.adjacency not in ADJACENCIES:
            raise ValueError(f"`adjacency` must be one of {ADJACENCIES}, got {self.adjacency!r}.")
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}.")
        if not 0 < self.confidence < 1:
            raise ValueError(f"`confidence` must be in (0, 1), got {self.confidence!r}.")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"`noise_multiplier` must be > 0 or None, got {self.noise_multiplier!r}.")

    def case_list(self) -> list[str]:
        return [c.strip() for c in self.cases.split(",") if c.strip()]


def case_dp_configs(honest, cases: Sequence[str], no_clipping_norm: float = 1e4) -> dict:
    """The DPConfig of each case, derived from the honest one (which must give `noise_multiplier` σ):

    - honest: as given (secret noise);
    - replay: the same, with `insecure_noise_seed` set (the audit gives every run its own published seed);
    - no_clipping: C = `no_clipping_norm` and σ' = σ·C / C', so the noise std σ'C' equals the honest σC (below
      σ' = 0.05 the ledger's ε is a looser bound without sampling amplification, which is fine for a broken control);
    - no_noise: σ = 0.
    """
    if honest.noise_multiplier is None:
        raise ValueError("Derive the cases from a DPConfig with an explicit noise_multiplier (calibrate it first).")
    sigma, clip = float(honest.noise_multiplier), float(honest.max_grad_norm)
    out = {}
    for case in cases:
        if case == "honest":
            out[case] = honest
        elif case == "replay":
            out[case] = dataclasses.replace(honest, insecure_noise_seed=0)
        elif case == "no_clipping":
            out[case] = dataclasses.replace(honest, max_grad_norm=no_clipping_norm,
                                            noise_multiplier=sigma * clip / no_clipping_norm)
        elif case == "no_noise":
            out[case] = dataclasses.replace(honest, noise_multiplier=0.0)
        else:
            raise ValueError(f"Unknown case {case!r}; choose from {CASES}.")
    return out


def case_statistics(case: str) -> tuple:
    """The statistics of a case: the replay attack where the noise may be replayable or the honest claim is tested
    (it costs one extra training per run), the cheap canary statistics everywhere."""
    return DEFAULT_STATISTICS + (("replay",) if case in ("honest", "replay") else ())


def calibrated_noise_multiplier(model, tokenizer, dataset, dp_config, training_args) -> float:
    """σ that `DPPromptTrainer` derives for `dp_config` (target_epsilon) on `dataset` with `training_args`."""
    from .tuning import DPPromptTrainer

    outdir = tempfile.mkdtemp(prefix="peft-post-dp-audit-")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPPromptTrainer(model, dataclasses.replace(training_args, output_dir=outdir),
                                      dp_config=dp_config, train_dataset=dataset, processing_class=tokenizer)
        return float(trainer.noise_multiplier)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


# The trainer's PLD accountant needs time and memory ~1/σ²: σ = 0.1 takes ~3 s per ledger, σ = 2.5e-5 asked for
# 5.8 TiB. A no_clipping case (σ' = σC/C') below this is refused rather than left to hang.


def run_dp_audit(cfg, audit: DPAuditConfig, command: Optional[str] = None) -> dict:
    """`peft-post audit-dp`: the distinguishing audit of the pipeline's DP tuning (its student, private data, prompt
    and DP budget) for each case of `audit.cases`; writes the result as JSON (`audit.output`, default
    ``<run_dir>/dp_audit.json``) and returns it. D and D' hold `audit.num_examples` examples of the private
    training split plus the canary (D) or a replacement (D')."""
    from peft import get_peft_model

    from .assets import load_text_dataset, resolve_model
    from .io import atomic_write_json
    from .pipeline import distill_stage, load_model, load_tokenizer
    from .tasks import check_classification_dataset
    from .tuning import DPConfig, PromptTrainingConfig

    if not isinstance(audit, DPAuditConfig):
        raise ValueError(f"`audit` must be a DPAuditConfig, got {type(audit).__name__}.")
    start = time.perf_counter()
    text_column, label_column = cfg.text_column, cfg.label_column
    train = load_text_dataset(cfg.private_dataset, split=cfg.private_train_split)
    if len(train) < audit.num_examples + 1:
        raise ValueError(f"The private training split has {len(train)} examples, fewer than num_examples + 1 = "
                         f"{audit.num_examples + 1}.")
    pool = train.shuffle(seed=cfg.seed).select(range(audit.num_examples + 1)).select_columns([text_column,
                                                                                                label_column])
    check_classification_dataset(pool, text_column, label_column, len(cfg.label_word_lists()),
                                 "private training split")
    data, replacement = pool.select(range(audit.num_examples)), dict(pool[audit.num_examples])
    masked = cfg.masked
    if cfg.student_model is not None:
        student_path = resolve_model(cfg.student_model)
    else:
        student_path, _ = distill_stage(cfg, resolve_model(cfg.target_model), masked)
    tokenizer = load_tokenizer(student_path)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(load_model(student_path, masked), cfg.post_config(student_path))
    if audit.canary_text is None:
        canary, candidates = choose_canary(model, tokenizer, data, text_column=text_column, label_column=label_column)
    else:
        candidates = None
        canary = {text_column: audit.canary_text,
                  label_column: flipped_label(model, tokenizer, audit.canary_text, label_column, text_column)}
    args = PromptTrainingConfig(
        output_dir="dp-audit", max_steps=audit.steps, learning_rate=audit.learning_rate, optim=audit.optim,
        lr_scheduler_type="constant", per_device_train_batch_size=audit.batch_size, text_column=text_column,
        label_column=label_column, use_cpu=not torch.cuda.is_available(), seed=cfg.seed, save_strategy="no",
        report_to="none", disable_tqdm=True)
    d_in, _, replacement = neighbouring_datasets(data, canary, audit.adjacency, replacement)
    clip = cfg.dp_max_grad_norm
    sigma = audit.noise_multiplier
    if sigma is None:
        probe = DPConfig(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta, max_grad_norm=clip)
        sigma = calibrated_noise_multiplier(model, tokenizer, d_in, probe, args)
    honest = DPConfig(noise_multiplier=sigma, target_delta=cfg.target_delta, max_grad_norm=clip)
    rows = list(d_in) + ([replacement] if replacement is not None else [])
    max_norm = max_example_gradient_norm(model, tokenizer, rows, text_column, label_column)
    no_clipping_norm = math.ceil(1.1 * max(max_norm, clip) * 10) / 10
    results = {}
    for case, dp in case_dp_configs(honest, audit.case_list(), no_clipping_norm=no_clipping_norm).items():
        results[case] = run_distinguishing_audit(
            model, tokenizer, data, canary, dp, args, trials=audit.trials, statistics=case_statistics(case),
            adjacency=audit.adjacency, replacement=replacement, confidence=audit.confidence, method=audit.method,
            seed=cfg.seed, progress=lambda m, c=case: print(f"[{c}] {m}", flush=True))
    first = results["honest"] if "honest" in results else next(iter(results.values()))
    out = {
        "claimed_epsilon": first["claimed_epsilon"],
        "num_examples": len(d_in),
        "cases": results,
        "canary": canary,
        "canary_candidates": candidates,
        "honest_dp": {"noise_multiplier": sigma, "max_grad_norm": clip, "target_delta": cfg.target_delta},
        "no_clipping_norm": no_clipping_norm,
        "largest_example_gradient_norm_at_p0": max_norm,
        "student_model": cfg.student_model or "distilled by the pipeline (cached)",
        "settings": {"pipeline": dataclasses.asdict(cfg), "audit": dataclasses.asdict(audit)},
        "command": command,
        "wall_time_s": time.perf_counter() - start,
    }
    path = audit.output or os.path.join(cfg.run_dir, DP_AUDIT_FILE)
    out = _jsonable(out)
    atomic_write_json(path, out)
    out["path"] = path
    return out
