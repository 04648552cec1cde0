"""The statistics of the DP audit: Clopper-Pearson and DKW upper bounds on a test's error rates, and the ε lower
bound they imply (pure numpy/scipy; see the package docstring for the argument)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

METHODS = ("split", "dkw")
DIRECTIONS = ("greater", "less")


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
