"""The POST report of one run: `report.json`, `report.md` (a table like the paper's) and `report.png`.

A run's results are a `POSTResults` (or the equivalent dict, see `POSTResults.from_dict`): accuracy of each
method on the private task's held-out test split, the DP ledger when the student prompt was trained with DP,
wall time and peak memory of each stage, the transfer curve, and which test examples each method got right.
Everything else in the report (time ratio, gain over zero-shot, share of the gap to full prompt tuning closed, and
their intervals from a paired bootstrap over the test examples) is derived here, from those numbers only.

The functions are pure (results in, text/bytes out) except `write_report`, which writes the three files
atomically. A stage's wall time and peak memory are measured by `peft_post.profiling.track_stage`.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .config import guarantee_holds, validate_privacy_ledger
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1
REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"

# Methods in the paper's row order. Accuracies are fractions in [0, 1] on the private test split.
METHODS = ("zero_shot", "full_prompt_tuning", "student_prompt", "direct_transfer", "post")
METHOD_LABELS = {
    "zero_shot": "Target zero-shot",
    "full_prompt_tuning": "Full prompt tuning on the target (upper bound)",
    "student_prompt": "Compressed PT: student with p_s",
    "direct_transfer": "Direct transfer: p_s pasted into the target",
    "post": "POST: transferred p_t on the target",
}
METHOD_SHORT = {"zero_shot": "zero-shot", "full_prompt_tuning": "full PT", "student_prompt": "student p_s",
                "direct_transfer": "direct", "post": "POST"}
REQUIRED_METHODS = ("zero_shot", "student_prompt", "direct_transfer", "post")
# The methods the report compares everything with: they are never "not applicable".
ALWAYS_APPLICABLE = ("zero_shot", "post")

# The paired bootstrap of the headline numbers (`paired_bootstrap`): resamples of the test examples, its seed (fixed,
# so an interval is a function of the per-example results alone) and the two-sided level of every interval.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95

# Stage names the time ratio reads: (student tuning + transfer) / full prompt tuning of the target.
STAGE_DISTILL, STAGE_TUNE, STAGE_TRANSFER, STAGE_EVALUATE, STAGE_FULL = (
    "distill", "tune", "transfer", "evaluate", "full_tuning")


@dataclass
class StageStats:
    """Cost of one pipeline stage."""

    name: str = field(metadata={"help": "Stage name: distill, tune, transfer, evaluate, full_tuning, or another."})
    wall_time_s: float = field(metadata={"help": "Wall-clock seconds the stage took (>= 0)."})
    peak_memory_mb: Optional[float] = field(
        default=None, metadata={"help": "Peak resident memory of the process during the stage, in MiB."})
    reused: bool = field(
        default=False,
        metadata={"help": "True when the stage's output came from an earlier run (e.g. the cached distilled "
                  "student); `wall_time_s` is then the original cost, if known, else 0."})

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"`StageStats.name` must be a non-empty string, got {self.name!r}.")
        if not _finite_number(self.wall_time_s) or self.wall_time_s < 0:
            raise ValueError(
                f"`wall_time_s` of stage {self.name!r} must be a finite number >= 0, got {self.wall_time_s!r}.")
        if self.peak_memory_mb is not None and (not _finite_number(self.peak_memory_mb) or self.peak_memory_mb < 0):
            raise ValueError(
                f"`peak_memory_mb` of stage {self.name!r} must be >= 0 or None, got {self.peak_memory_mb!r}.")


@dataclass
class CurvePoint:
    """One point of the transfer curve: the training loss and/or accuracy on the public held-out split."""

    step: int = field(metadata={"help": "Optimizer step (>= 0)."})
    loss: Optional[float] = field(default=None, metadata={"help": "Transfer loss at this step."})
    public_accuracy: Optional[float] = field(
        default=None, metadata={"help": "Target accuracy with p_t on the public held-out split, in [0, 1]."})

    def __post_init__(self):
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"`CurvePoint.step` must be an int >= 0, got {self.step!r}.")
        if self.loss is not None and not _finite_number(self.loss):
            raise ValueError(f"`loss` at step {self.step} must be a finite number or None, got {self.loss!r}.")
        if self.public_accuracy is not None and not _is_fraction(self.public_accuracy):
            raise ValueError(f"`public_accuracy` at step {self.step} must be in [0, 1], got {self.public_accuracy!r}.")


@dataclass
class POSTResults:
    """The results of one POST run, the input of the report (`report.json` holds it, plus derived numbers).

    ``accuracy`` maps each of `METHODS` to a fraction in [0, 1] measured on ``num_test_examples`` examples of the
    private task's held-out test split (the split is used for this report only, never for selection);
    ``full_prompt_tuning`` may be None (it runs only with ``--full-baseline``), the others are required unless
    ``not_applicable`` gives the reason they could not run (direct transfer across hidden sizes): their accuracy
    is then None and the report prints "n/a (reason)". ``per_example_correct`` (optional) says which test examples
    each method got right; the report's intervals (`derived_metrics`) come from it, and without it there are none.
    """

    target_model: str = field(metadata={"help": "The large model Φ_t (Hub id, local folder or embedded name)."})
    private_dataset: str = field(metadata={"help": "The private task's dataset name."})
    num_test_examples: int = field(metadata={"help": "Size of the private test split all accuracies are measured on."})
    accuracy: dict = field(
        metadata={"help": f"Accuracy in [0, 1] per method {METHODS}; full_prompt_tuning may be None."})
    student_model: Optional[str] = field(default=None, metadata={"help": "The distilled small model Φ_s."})
    public_dataset: Optional[str] = field(default=None, metadata={"help": "The public transfer dataset."})
    num_public_examples: Optional[int] = field(default=None, metadata={"help": "Public examples used by the transfer."})
    privacy: Optional[dict] = field(
        default=None,
        metadata={"help": "DP ledger of p_s (epsilon, delta, accountant, noise_multiplier, max_grad_norm, "
                  "sample_rate, steps, and the trainer's further keys: adjacency, history, ...); None when p_s was "
                  "trained without DP."})
    stages: list = field(default_factory=list, metadata={"help": "`StageStats` of each stage, in run order."})
    transfer_curve: list = field(default_factory=list, metadata={"help": "`CurvePoint`s of the transfer, by step."})
    transfer_alpha: Optional[float] = field(default=None, metadata={"help": "α of the POST loss used."})
    preset: Optional[str] = field(default=None, metadata={"help": "Preset name of the run (e.g. default, quick)."})
    seed: Optional[int] = field(default=None, metadata={"help": "Seed of the run."})
    precision: Optional[dict] = field(
        default=None,
        metadata={"help": "Where and in which precision the stages ran (`Precision.record()`: device, dtype, "
                  "device_map, quantization, and why 'auto' chose them)."})
    num_processes: int = field(
        default=1,
        metadata={"help": "Processes the run was launched with (`accelerate launch`, torchrun). Its batch sizes are "
                  "global, so the results do not depend on it."})
    command: Optional[str] = field(default=None, metadata={"help": "The command line that produced the run."})
    notes: list = field(default_factory=list, metadata={"help": "Free-text remarks printed under the table."})
    not_applicable: dict = field(
        default_factory=dict,
        metadata={"help": "Why a method could not run, by method, e.g. {'direct_transfer': 'hidden sizes differ: "
                  "64 vs 32'}; its accuracy is then None and the report prints 'n/a (reason)'. Never zero_shot or "
                  "post."})
    task_kind: str = field(
        default="classification",
        metadata={"help": "'classification' (`accuracy` is the share of test examples classified right) or "
                  "'generation' (`accuracy` is the exact-match rate of greedy answers, `token_f1` beside it, and the "
                  "transfer curve's public score is token F1)."})
    token_f1: dict = field(
        default_factory=dict,
        metadata={"help": "Generation: mean token F1 in [0, 1] of each method's answers, by method."})
    per_example_correct: dict = field(
        default_factory=dict,
        metadata={"help": "Which private test examples each method got right, by method: a string of '0'/'1' (a "
                  "list of 0/1 is accepted) of length `num_test_examples`, the same examples in the same order for "
                  "every method, whose mean is the method's accuracy. The paired bootstrap of the report's intervals "
                  "resamples it. Empty in reports written before it existed (they have no intervals). Like the "
                  "accuracies it is the user's: it stays in the run folder."})

    def __post_init__(self):
        if not isinstance(self.accuracy, dict):
            raise ValueError(f"`accuracy` must be a dict keyed by {METHODS}, got {type(self.accuracy).__name__}.")
        unknown = sorted(set(self.accuracy) - set(METHODS))
        if unknown:
            raise ValueError(f"`accuracy` has unknown methods {unknown}; use keys from {METHODS}.")
        self._check_not_applicable()
        missing = [m for m in REQUIRED_METHODS if self.accuracy.get(m) is None and m not in self.not_applicable]
        if missing:
            raise ValueError(f"`accuracy` is missing {missing}; a POST report needs {REQUIRED_METHODS} "
                             "(full_prompt_tuning is optional; a method that cannot run needs its reason in "
                             "`not_applicable`).")
        for m, v in self.accuracy.items():
            if v is not None and not _is_fraction(v):
                raise ValueError(f"`accuracy['{m}']` must be a fraction in [0, 1] (not a percentage), got {v!r}.")
        self.accuracy = {m: (None if self.accuracy.get(m) is None else float(self.accuracy[m])) for m in METHODS}
        if isinstance(self.num_test_examples, bool) or not isinstance(self.num_test_examples, int) \
                or self.num_test_examples < 1:
            raise ValueError(f"`num_test_examples` must be a positive int, got {self.num_test_examples!r}.")
        self._check_per_example_correct()
        if self.task_kind not in ("classification", "generation"):
            raise ValueError(f"`task_kind` must be 'classification' or 'generation', got {self.task_kind!r}.")
        for m, v in self.token_f1.items():
            if m not in METHODS or not _is_fraction(v):
                raise ValueError(f"`token_f1[{m!r}]` must be a fraction in [0, 1] of a method in {METHODS}, got {v!r}.")
        if self.privacy is not None:
            validate_privacy_ledger(self.privacy, "privacy")
        alpha = self.transfer_alpha
        if alpha is not None and not (_finite_number(alpha) and 0 <= alpha <= 1):
            raise ValueError(f"`transfer_alpha` must be in [0, 1] or None, got {self.transfer_alpha!r}.")
        self.stages = [s if isinstance(s, StageStats) else StageStats(**s) for s in self.stages]
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"`stages` names must be unique, got {names}.")
        self.transfer_curve = sorted(
            (p if isinstance(p, CurvePoint) else CurvePoint(**p) for p in self.transfer_curve), key=lambda p: p.step)
        if not isinstance(self.notes, list) or not all(isinstance(n, str) for n in self.notes):
            raise ValueError("`notes` must be a list of strings.")

    def _check_not_applicable(self) -> None:
        if not isinstance(self.not_applicable, dict):
            raise ValueError(f"`not_applicable` must be a dict {{method: reason}}, got {self.not_applicable!r}.")
        for m, reason in self.not_applicable.items():
            if m not in METHODS or m in ALWAYS_APPLICABLE:
                raise ValueError(f"`not_applicable` names {m!r}; only {sorted(set(METHODS) - set(ALWAYS_APPLICABLE))} "
                                 "can be not applicable (the report compares everything with zero-shot and POST).")
            if not isinstance(reason, str) or not reason.strip():
                raise ValueError(f"`not_applicable[{m!r}]` must be a non-empty reason, got {reason!r}.")
            if self.accuracy.get(m) is not None:
                raise ValueError(f"`accuracy[{m!r}]` is {self.accuracy[m]!r} but `not_applicable` says it could "
                                 f"not run ({reason}); give one or the other.")

    def _check_per_example_correct(self) -> None:
        if not isinstance(self.per_example_correct, dict):
            raise ValueError("`per_example_correct` must be a dict {method: '0'/'1' string}, got "
                             f"{type(self.per_example_correct).__name__}.")
        normalised = {}
        for m, bits in self.per_example_correct.items():
            if m not in METHODS or self.accuracy.get(m) is None:
                raise ValueError(f"`per_example_correct` names {m!r}, which has no accuracy; give per-example results "
                                 f"only for methods scored in `accuracy` ({METHODS}).")
            try:
                vector = correctness_vector(bits)
            except ValueError as err:
                raise ValueError(f"`per_example_correct[{m!r}]`: {err}") from None
            if vector.size != self.num_test_examples:
                raise ValueError(f"`per_example_correct[{m!r}]` has {vector.size} examples, but `num_test_examples` is "
                                 f"{self.num_test_examples}: every method is scored on the same test examples.")
            # The intervals must be about the accuracies the report prints: a vector of other examples is refused.
            if abs(vector.mean() - self.accuracy[m]) > 1e-9:
                raise ValueError(f"`per_example_correct[{m!r}]` gives accuracy {vector.mean():.6g}, but "
                                 f"`accuracy[{m!r}]` is {self.accuracy[m]:.6g}: they must come from the same scoring.")
            normalised[m] = "".join("1" if v else "0" for v in vector.tolist())
        self.per_example_correct = {m: normalised[m] for m in METHODS if m in normalised}

    @classmethod
    def from_dict(cls, data: dict) -> "POSTResults":
        """Build from a plain dict (e.g. a loaded `report.json`); derived keys written by the report are ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"POST results must be a dict, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        ignored = {"schema_version", "derived"}
        unknown = sorted(set(data) - known - ignored)
        if unknown:
            raise ValueError(f"Unknown POST results keys {unknown}; known keys are {sorted(known)}.")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def stage(self, name: str) -> Optional[StageStats]:
        return next((s for s in self.stages if s.name == name), None)


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_fraction(x) -> bool:
    return _finite_number(x) and 0.0 <= x <= 1.0


def _as_results(results: Union[POSTResults, dict]) -> POSTResults:
    return results if isinstance(results, POSTResults) else POSTResults.from_dict(results)


# ------------------------------------------------------------------------------------------------ paired bootstrap
def correctness_vector(bits: Union[str, Sequence]) -> np.ndarray:
    """Per-example correctness as a uint8 array of 0/1, from a string of "0"/"1" (`evaluation.correctness_bits`) or a
    sequence of 0/1 (or bools)."""
    if isinstance(bits, str):
        if set(bits) - {"0", "1"}:
            raise ValueError("a correctness string holds only '0' and '1'.")
        vector = np.frombuffer(bits.encode("ascii"), dtype=np.uint8) - ord("0")
    else:
        values = list(bits)
        if not all(v in (0, 1) and not isinstance(v, float) for v in values):
            raise ValueError("a correctness list holds only 0 and 1 (or bools).")
        vector = np.asarray(values, dtype=np.uint8)
    if vector.size == 0:
        raise ValueError("no examples.")
    return vector


def paired_bootstrap(correct: Mapping[str, Union[str, Sequence]], num_resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict[str, np.ndarray]:
    """Accuracy of each method on `num_resamples` resamples of the test examples: {method: (num_resamples,) array}.

    Every method was scored on the same examples (`correct` maps a method to its per-example correctness, see
    `correctness_vector`), so each resample draws example indices with replacement once and applies them to every
    method: a difference or ratio of two methods computed per resample keeps the pairing, and the examples that
    every method gets right or wrong add no spurious noise to it. Deterministic for a given `seed`.
    """
    vectors = {m: correctness_vector(v) for m, v in correct.items()}
    if not vectors:
        raise ValueError("No per-example results to resample.")
    sizes = {v.size for v in vectors.values()}
    if len(sizes) != 1:
        raise ValueError("Paired resampling needs every method scored on the same examples; got sizes "
                         f"{sorted(sizes)}.")
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 1:
        raise ValueError(f"`num_resamples` must be a positive int, got {num_resamples!r}.")
    n = sizes.pop()
    rng = np.random.default_rng(seed)
    out = {m: np.empty(num_resamples) for m in vectors}
    # Indices are drawn in blocks of about 4M, so memory stays bounded whatever the size of the test split.
    block = max(1, min(num_resamples, (1 << 22) // n))
    for start in range(0, num_resamples, block):
        stop = min(start + block, num_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        for m, v in vectors.items():
            out[m][start:stop] = v[idx].mean(axis=1)
    return out


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    """The two-sided percentile interval [lo, hi] of bootstrap `values` at `confidence` (0.95: 2.5th, 97.5th)."""
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail])
    return [float(lo), float(hi)]


def zero_shot_verdict(interval: Optional[Sequence[float]]) -> Optional[str]:
    """What an interval of POST − zero-shot allows the report to say: "beats" (entirely above 0), "below" (entirely
    below 0), "within_noise" (it holds 0, the degenerate [0, 0] of identical results included); None without one."""
    if interval is None:
        return None
    lo, hi = interval
    return "beats" if lo > 0 else "below" if hi < 0 else "within_noise"


def _headline_intervals(r: POSTResults, gap_closed: Optional[float]) -> dict[str, Any]:
    """The paired-bootstrap intervals of POST − zero-shot, full PT − zero-shot and gap closed, with the verdict on
    zero-shot and, when gap closed has no interval (or no value), the reason."""
    acc, correct = r.accuracy, r.per_example_correct
    out: dict[str, Any] = {"post_gain_over_zero_shot_ci": None, "post_vs_zero_shot": None,
                           "full_gain_over_zero_shot_ci": None, "gap_closed_ci": None,
                           "gap_closed_undefined_share": None, "gap_closed_note": None, "bootstrap": None}
    full = acc["full_prompt_tuning"]
    if full is None:
        out["gap_closed_note"] = ("full prompt tuning on the target did not run (--full_baseline true runs it), so "
                                  "there is no gap to measure")
    elif gap_closed is None:
        out["gap_closed_note"] = (f"full prompt tuning ({_pct(full)}%) does not beat zero-shot "
                                  f"({_pct(acc['zero_shot'])}%), so there is no gap to close")
    if "zero_shot" not in correct or "post" not in correct:
        if gap_closed is not None:
            out["gap_closed_note"] = "no interval: this report has no per-example test results"
        return out
    boot = paired_bootstrap({m: correct[m] for m in ("zero_shot", "post", "full_prompt_tuning") if m in correct})
    out["bootstrap"] = {"method": "paired percentile bootstrap over test examples", "resamples": BOOTSTRAP_RESAMPLES,
                        "seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE}
    zs = boot["zero_shot"]
    out["post_gain_over_zero_shot_ci"] = percentile_interval(boot["post"] - zs)
    out["post_vs_zero_shot"] = zero_shot_verdict(out["post_gain_over_zero_shot_ci"])
    if full is None:
        return out
    if "full_prompt_tuning" not in boot:
        if gap_closed is not None:
            out["gap_closed_note"] = "no interval: full prompt tuning has no per-example test results"
        return out
    denominator = boot["full_prompt_tuning"] - zs
    out["full_gain_over_zero_shot_ci"] = percentile_interval(denominator)
    if gap_closed is None:
        return out
    # The ratio is undefined on a resample where full PT does not beat zero-shot (denominator 0), and meaningless
    # where it is below (the sign flips; near 0 the ratio runs off to ±infinity). So gap closed gets an interval only
    # when full PT − zero-shot has its own interval above 0: then at most about 2.5% of the resamples are undefined,
    # they are left out, and their share is reported. Otherwise the interval is None, with the reason, rather than an
    # interval made of exploding ratios.
    undefined = denominator <= 0
    out["gap_closed_undefined_share"] = float(undefined.mean())
    if out["full_gain_over_zero_shot_ci"][0] <= 0:
        lo, hi = out["full_gain_over_zero_shot_ci"]
        out["gap_closed_note"] = (f"no interval: full PT − zero-shot has a {CONFIDENCE:.0%} interval "
                                  f"[{100 * lo:+.2f}, {100 * hi:+.2f}] percentage points that does not exclude 0, so "
                                  "the ratio is unstable")
        return out
    defined = ~undefined
    out["gap_closed_ci"] = percentile_interval((boot["post"] - zs)[defined] / denominator[defined])
    return out


# ------------------------------------------------------------------------------------------------- derived numbers
def derived_metrics(results: Union[POSTResults, dict]) -> dict[str, Any]:
    """Numbers computed from the results: gains over zero-shot, gap closed, their intervals, the time ratio.

    - ``gap_closed``: (POST − zero-shot) / (full PT − zero-shot), when full PT ran and beat zero-shot; None
      otherwise, with the reason in ``gap_closed_note``.
    - ``gap_closed_ci``: its 95% interval from a paired bootstrap over the test examples (`paired_bootstrap`), when
      full PT − zero-shot has an interval above 0 (``full_gain_over_zero_shot_ci``); resamples where full PT does not
      beat zero-shot are left out, ``gap_closed_undefined_share`` is their share. None otherwise, with the reason.
    - ``post_gain_over_zero_shot``: POST − zero-shot (fraction); ``post_gain_over_zero_shot_ci`` its paired interval.
    - ``post_vs_zero_shot``: "beats" or "below" when that interval excludes 0 (above or below), else
      "within_noise"; ``post_beats_zero_shot`` is True only for "beats". Both None without per-example results.
    - ``bootstrap``: how the intervals were computed (method, resamples, seed, confidence); None without them.
    - ``post_gain_over_direct_transfer``: POST − direct transfer; None when direct transfer was not applicable.
    - ``time_ratio``: (tune + transfer wall time) / full_tuning wall time, when all three stages were timed;
      ``speedup`` is its inverse (the paper's 6.5× for GPT2-XL).
    - ``total_wall_time_s``: the sum over stages not reused from an earlier run.
    """
    r = _as_results(results)
    acc = r.accuracy
    full = acc["full_prompt_tuning"]
    gap_closed = None
    if full is not None and full > acc["zero_shot"]:
        gap_closed = (acc["post"] - acc["zero_shot"]) / (full - acc["zero_shot"])
    intervals = _headline_intervals(r, gap_closed)
    out: dict[str, Any] = {
        "gap_closed": gap_closed,
        "gap_closed_ci": intervals["gap_closed_ci"],
        "gap_closed_undefined_share": intervals["gap_closed_undefined_share"],
        "gap_closed_note": intervals["gap_closed_note"],
        "post_gain_over_zero_shot": acc["post"] - acc["zero_shot"],
        "post_gain_over_zero_shot_ci": intervals["post_gain_over_zero_shot_ci"],
        "post_vs_zero_shot": intervals["post_vs_zero_shot"],
        "post_beats_zero_shot": (None if intervals["post_vs_zero_shot"] is None
                                 else intervals["post_vs_zero_shot"] == "beats"),
        "full_gain_over_zero_shot": None if full is None else full - acc["zero_shot"],
        "full_gain_over_zero_shot_ci": intervals["full_gain_over_zero_shot_ci"],
        "bootstrap": intervals["bootstrap"],
        "post_gain_over_direct_transfer": (None if acc["direct_transfer"] is None
                                           else acc["post"] - acc["direct_transfer"]),
        "time_ratio": None,
        "speedup": None,
        "total_wall_time_s": sum(s.wall_time_s for s in r.stages if not s.reused),
    }
    tune, transfer, full_stage = r.stage(STAGE_TUNE), r.stage(STAGE_TRANSFER), r.stage(STAGE_FULL)
    if tune and transfer and full_stage and full_stage.wall_time_s > 0:
        out["time_ratio"] = (tune.wall_time_s + transfer.wall_time_s) / full_stage.wall_time_s
        if out["time_ratio"] > 0:
            out["speedup"] = 1.0 / out["time_ratio"]
    return out


def report_dict(results: Union[POSTResults, dict]) -> dict[str, Any]:
    """The content of `report.json`: the results, ``derived`` numbers and ``schema_version``."""
    r = _as_results(results)
    return {**r.to_dict(), "derived": derived_metrics(r), "schema_version": SCHEMA_VERSION}


# ------------------------------------------------------------------------------------------------------ markdown
def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def not_applicable_text(reason: str) -> str:
    """How the report prints a method that could not run: "n/a (hidden sizes differ: 64 vs 32)"."""
    return f"n/a ({reason})"


def _num(x, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def _pp_interval(interval: Sequence[float]) -> str:
    return f"[{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]"


def _bootstrap_text(r: POSTResults, d: dict) -> str:
    b = d["bootstrap"]
    return f"paired bootstrap over the {r.num_test_examples} test examples, {b['resamples']} resamples"


def _gap_closed_line(r: POSTResults, d: dict) -> str:
    """The headline: gap closed with its interval, or why there is none."""
    name = "- **Gap closed**, (POST − zero-shot) / (full PT − zero-shot)"
    if d["gap_closed"] is None:
        return f"{name}: not available: {d['gap_closed_note']}."
    value = f"{name}: **{d['gap_closed']:.2f}**"
    if d["gap_closed_ci"] is None:
        return f"{value}, {d['gap_closed_note']}."
    lo, hi = d["gap_closed_ci"]
    left_out = d["gap_closed_undefined_share"]
    dropped = (f"; {left_out:.1%} of the resamples, where full PT did not beat zero-shot, are left out"
               if left_out else "")
    level = f"{d['bootstrap']['confidence']:.0%}"
    return f"{value}, {level} interval [{lo:.2f}, {hi:.2f}] ({_bootstrap_text(r, d)}{dropped})."


def score_name(r: POSTResults) -> str:
    """What `accuracy` measures in `r`, for the report's words: accuracy, or exact match for a generation task."""
    return "exact match" if r.task_kind == "generation" else "accuracy"


def _zero_shot_line(r: POSTResults, d: dict) -> str:
    """POST − zero-shot with its interval, and the verdict the interval allows (never one from the point estimate)."""
    gain = f"{100 * d['post_gain_over_zero_shot']:+.2f} percentage points"
    verdict = d["post_vs_zero_shot"]
    if verdict is None:
        return (f"- **POST − zero-shot**: {gain}; no interval is available (this report has no per-example test "
                "results), so it does not say whether POST beats zero-shot.")
    interval = (f"{d['bootstrap']['confidence']:.0%} interval {_pp_interval(d['post_gain_over_zero_shot_ci'])} "
                f"({_bootstrap_text(r, d)})")
    if verdict == "beats":
        return f"- **POST − zero-shot**: {gain}, {interval}: POST beats the target's zero-shot {score_name(r)}."
    if verdict == "below":
        return f"- **POST − zero-shot**: {gain}, {interval}: POST is below the target's zero-shot {score_name(r)}."
    return (f"- **POST − zero-shot**: {gain}, {interval}: the difference is within noise (the interval includes 0), "
            "so POST is not shown to beat zero-shot.")


def render_markdown(results: Union[POSTResults, dict]) -> str:
    """`report.md`: the headline (gap closed and POST − zero-shot, with their paired-bootstrap intervals), the
    accuracy table (percent, 2 decimals, of the values in `report.json`), the DP ledger, the stage costs and the
    time ratio."""
    r = _as_results(results)
    d = derived_metrics(r)
    acc = r.accuracy
    dp = r.privacy is not None
    lines = [
        "# POST report",
        "",
        f"- target model: `{r.target_model}`",
        f"- student model: `{r.student_model or '—'}`",
        f"- private task: `{r.private_dataset}`"
        + (" (generation: greedy answers scored by exact match and token F1)" if r.task_kind == "generation" else "")
        + f", {score_name(r)} on {r.num_test_examples} held-out test examples "
        "(used for this report only, never for selection)",
        f"- public transfer set: `{r.public_dataset or '—'}`"
        + (f" ({r.num_public_examples} examples)" if r.num_public_examples is not None else ""),
        f"- training of p_s: {'DP, ε = ' + format(r.privacy['epsilon'], 'g') if dp else 'non-private'}"
        + (f"; transfer α = {r.transfer_alpha:g}" if r.transfer_alpha is not None else ""),
    ]
    if r.preset:
        lines.append(f"- preset: `{r.preset}`")
    if r.seed is not None:
        lines.append(f"- seed: {r.seed}")
    if r.precision:
        p = r.precision
        placed = "".join(f", {k} {p[k]}" for k in ("device_map", "quantization") if p.get(k))
        lines.append(f"- precision: {p.get('dtype')} on {p.get('device')}{placed} ({p.get('reason')})")
    if r.num_processes > 1:
        lines.append(f"- processes: {r.num_processes} (global batches split among them)")
    lines += ["", "## Headline", "", _gap_closed_line(r, d), _zero_shot_line(r, d)]
    name = score_name(r).capitalize()
    f1 = " Token F1 (%) |" if r.token_f1 else ""
    lines += ["", f"## {name}", "", f"| Method | {name} (%) | Δ vs zero-shot (pp) |{f1}",
              "|---|---:|---:|" + ("---:|" if f1 else "")]
    for m in METHODS:
        if m in r.not_applicable:
            reason = not_applicable_text(r.not_applicable[m])
            lines.append(f"| {METHOD_LABELS[m]} | {reason} | — |" + (" — |" if f1 else ""))
            continue
        if m == "full_prompt_tuning" and acc[m] is None:
            continue
        delta = "" if m == "zero_shot" else f"{100 * (acc[m] - acc['zero_shot']):+.2f}"
        extra = f" {_pct(r.token_f1[m]) if m in r.token_f1 else '—'} |" if f1 else ""
        lines.append(f"| {METHOD_LABELS[m]} | {_pct(acc[m])} | {delta} |{extra}")
    if dp:
        p = r.privacy
        adjacency = p.get("adjacency", "add_or_remove_one (not recorded)")
        lines += ["", "## Differential privacy (training of p_s)", "",
                  "| ε | δ | adjacency | accountant | σ (noise multiplier) | C (clip norm) | q (sample rate) | steps |",
                  "|---:|---:|---|---|---:|---:|---:|---:|",
                  f"| {p['epsilon']:g} | {p['delta']:.3g} | {adjacency} | {p['accountant']} | "
                  f"{p['noise_multiplier']:.4g} | {p['max_grad_norm']:g} | {p['sample_rate']:.4g} | {p['steps']} |"]
        if "target_delta" in p and p["target_delta"] is None:  # nobody chose δ: the trainer's default, 1/N
            lines += ["", f"δ = 1/N (N = {round(1 / p['delta'])} training examples), the default and the paper's "
                      "convention. A δ this large allows a mechanism that publishes one training example outright; "
                      "pass `--dp_target_delta` well below 1/N for a stronger guarantee."]
        if "epsilon_add_remove" in p:
            lines += ["", f"The same steps give ε = {p['epsilon_add_remove']:g} under add/remove-one adjacency, the "
                      "relation the paper reports; it is not this prompt's guarantee, because N is published "
                      "(docs/privacy.md)."]
        if p.get("class_weights"):
            lines += ["", "Each clipped gradient was weighted by its class (`--dp_class_weights` "
                      f"{'|'.join(f'{w:g}' for w in p['class_weights'])}; each weight ≤ 1, so C still bounds an "
                      "example's contribution and ε is unchanged)."]
        if not guarantee_holds(p):
            lines += ["", "**The DP guarantee does not hold:** " + "; ".join(p.get("guarantee_void_reasons", [])) + "."]
    if r.stages:
        lines += ["", "## Cost per stage", "", "| Stage | Wall time (s) | Peak memory (MiB) | Reused |",
                  "|---|---:|---:|---|"]
        for s in r.stages:
            lines.append(f"| {s.name} | {s.wall_time_s:.1f} | {_num(s.peak_memory_mb, '{:.0f}')} | "
                         f"{'yes (cached)' if s.reused else 'no'} |")
        lines += ["", f"Total wall time of the stages run: {d['total_wall_time_s']:.1f} s "
                      f"({d['total_wall_time_s'] / 60:.1f} min)."]
    if d["time_ratio"] is not None:
        lines.append(f"(student tuning + transfer) / full target prompt tuning time = {d['time_ratio']:.3f} "
                     f"({d['speedup']:.2f}× faster).")
    if r.transfer_curve:
        last = r.transfer_curve[-1]
        lines += ["", f"Transfer curve: {len(r.transfer_curve)} points up to step {last.step} (see {REPORT_PNG})."]
    if r.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r.notes]
    if r.command:
        lines += ["", "## Command", "", "```", r.command, "```"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- plot
def render_plot_png(results: Union[POSTResults, dict], dpi: int = 100) -> bytes:
    """`report.png`: accuracy bars (left) and the transfer loss / public accuracy curve (right), as PNG bytes.

    Uses matplotlib's Agg canvas directly, so it neither needs a display nor changes the global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = _as_results(results)
    fig = Figure(figsize=(11, 4.2), dpi=dpi)
    FigureCanvasAgg(fig)
    ax_bar, ax_curve = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})

    # A method that could not run keeps its place, with an empty bar labelled n/a.
    methods = [m for m in METHODS if r.accuracy[m] is not None or m in r.not_applicable]
    values = [0.0 if r.accuracy[m] is None else 100 * r.accuracy[m] for m in methods]
    colors = {"zero_shot": "#9e9e9e", "full_prompt_tuning": "#4c72b0", "student_prompt": "#dd8452",
              "direct_transfer": "#c44e52", "post": "#55a868"}
    bars = ax_bar.bar([METHOD_SHORT[m] for m in methods], values, color=[colors[m] for m in methods])
    for bar, m, v in zip(bars, methods, values):
        label = "n/a" if r.accuracy[m] is None else f"{v:.1f}"
        ax_bar.text(bar.get_x() + bar.get_width() / 2, v + 0.5, label, ha="center", va="bottom", fontsize=9)
    ax_bar.axhline(100 * r.accuracy["zero_shot"], color="#616161", linestyle="--", linewidth=1)
    ax_bar.set_ylim(0, 105)
    ax_bar.set_ylabel(f"{score_name(r)} on private test split (%)")
    title = f"{r.private_dataset}" + (f" (DP ε={r.privacy['epsilon']:g})" if r.privacy else "")
    ax_bar.set_title(title, fontsize=10)

    losses = [(p.step, p.loss) for p in r.transfer_curve if p.loss is not None]
    accs = [(p.step, 100 * p.public_accuracy) for p in r.transfer_curve if p.public_accuracy is not None]
    if losses:
        ax_curve.plot(*zip(*losses), color="#4c72b0", label="transfer loss")
        ax_curve.set_ylabel("transfer loss", color="#4c72b0")
    if accs:
        ax_acc = ax_curve.twinx() if losses else ax_curve
        public = "token F1" if r.task_kind == "generation" else "accuracy"
        ax_acc.plot(*zip(*accs), color="#55a868", marker="o", markersize=3, label=f"public held-out {public}")
        ax_acc.set_ylabel(f"public held-out {public} (%)", color="#55a868")
    if not losses and not accs:
        ax_curve.text(0.5, 0.5, "no transfer curve recorded", ha="center", va="center", transform=ax_curve.transAxes)
    ax_curve.set_xlabel("transfer step")
    ax_curve.set_title("transfer", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------- files
def write_report(results: Union[POSTResults, dict], output_dir: str, plot: bool = True) -> dict[str, str]:
    """Validate `results` and write `report.json`, `report.md` and (with `plot`) `report.png` into `output_dir`,
    each atomically. Everything is rendered before the first file is written, so bad input writes nothing.
    Returns ``{"json": path, "md": path, "png": path}``."""
    r = _as_results(results)
    content = report_dict(r)
    markdown = render_markdown(r)
    png = render_plot_png(r) if plot else None
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, REPORT_JSON), "md": os.path.join(output_dir, REPORT_MD)}
    atomic_write_json(paths["json"], content)
    atomic_write_text(paths["md"], markdown)
    if png is not None:
        paths["png"] = os.path.join(output_dir, REPORT_PNG)
        atomic_write_bytes(paths["png"], png)
    return paths


def curve_from_log_history(log_history: list[dict], accuracy_key: str = "eval_accuracy") -> list[CurvePoint]:
    """Transfer curve from a `Trainer.state.log_history`: training ``loss`` entries and public-eval accuracy
    entries (``accuracy_key``), merged by step."""
    points: dict[int, dict] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        if "loss" in entry and _finite_number(entry["loss"]):
            points.setdefault(int(step), {})["loss"] = float(entry["loss"])
        if accuracy_key in entry:
            points.setdefault(int(step), {})["public_accuracy"] = float(entry[accuracy_key])
    return [CurvePoint(step=s, **v) for s, v in sorted(points.items())]
