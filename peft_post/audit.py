"""Membership-inference audit of a soft prompt: LiRA (Carlini et al. 2022, "Membership Inference Attacks From First
Principles"), online variant, in the standard leave-one-out evaluation.

N audit examples are drawn from the private training split. K shadow prompts are tuned with the pipeline's own
recipe (`pipeline.tune_stage`: the same trainer, settings and DP or not) on K membership halves, each example IN
for exactly K/2 shadows. Every shadow scores every example with the logit-scaled confidence
φ = log p_y − log(1 − p_y). Each shadow in turn plays the attacked prompt: for each example, Gaussians fitted to
φ over the OTHER shadows where the example was IN and where it was OUT give the likelihood ratio

    LR = log N(φ_k; μ_in, σ_in) − log N(φ_k; μ_out, σ_out),

and AUC / TPR at low FPR are taken over all K·N (shadow, example) pairs with their known membership.

The statistics (`membership_matrix`, `logit_confidence`, `lira_scores`, `attack_metrics`) are pure functions of
arrays; `run_audit` trains and scores the shadows and writes ``audit.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .io import atomic_write_json
# The DP audit (an empirical lower bound on ε from canary runs) lives in `dp_audit`; both audits are reachable here.
from .dp_audit import DPAuditConfig, epsilon_lower_bound, run_distinguishing_audit, run_dp_audit  # noqa: F401

AUDIT_FILE = "audit.json"
VARIANCES = ("global", "per_example")
FPR_LEVELS = (0.01, 0.001)
# Keeps a Gaussian whose shadows all gave the same φ from dividing by zero; far below any real spread of φ.
MIN_STD = 1e-8
# Changing these does not change what the shadows learn or how they are scored, so a rerun may differ in them.
_RESUME_FREE = ("run_dir", "audit_dir", "save_steps", "eval_batch_size", "bootstrap_resamples", "threads",
                "gradient_checkpointing", "device", "dtype", "device_map", "quantization")
# Fields added after audits were first saved: an audit saved before them ran at these values.
_ADDED_AT_DEFAULT = {"transfer_alpha_method": "heuristic"}


@dataclass
class AuditConfig:
    """Arguments of `peft-post audit` beyond the pipeline's (which give the model, data and tuning recipe)."""

    num_examples: int = field(
        default=256,
        metadata={"help": "N: audit examples drawn from the private training split (even; each shadow trains on N/2)."},
    )
    num_shadows: int = field(
        default=8,
        metadata={"help": "K: shadow prompts (even, >= 4); each example is IN for exactly K/2 of them. More shadows "
                  "give tighter Gaussians and a stronger, less noisy audit (Carlini et al. use 64+)."},
    )
    variance: str = field(
        default="global",
        metadata={"help": "'global': one σ shared by IN and OUT, pooled over all examples (LiRA's choice with few "
                  "shadows); 'per_example': each example's own σ_in and σ_out (needs num_shadows >= 6)."},
    )
    audit_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Folder of the audit (shadow scores, audit.json); a rerun into it reuses finished shadows. "
                  "None: <run_dir>/audit_dp or <run_dir>/audit_non_dp."},
    )
    bootstrap_resamples: int = field(
        default=1000,
        metadata={"help": "Bootstrap resamples (of shadows and examples) for the AUC's 95 percent interval; 0 skips it."},
    )

    def __post_init__(self):
        if not isinstance(self.num_shadows, int) or self.num_shadows < 4 or self.num_shadows % 2:
            raise ValueError(f"`num_shadows` must be an even int >= 4 (each example IN for half), got "
                             f"{self.num_shadows!r}.")
        if not isinstance(self.num_examples, int) or self.num_examples < 2 or self.num_examples % 2:
            raise ValueError(f"`num_examples` must be an even int >= 2 (each shadow trains on half), got "
                             f"{self.num_examples!r}.")
        if self.variance not in VARIANCES:
            raise ValueError(f"`variance` must be one of {VARIANCES}, got {self.variance!r}.")
        if not isinstance(self.bootstrap_resamples, int) or self.bootstrap_resamples < 0:
            raise ValueError(f"`bootstrap_resamples` must be an int >= 0, got {self.bootstrap_resamples!r}.")
        if self.variance == "per_example" and self.num_shadows < 6:
            raise ValueError(f"`variance='per_example'` needs num_shadows >= 6 (two IN shadows besides the attacked "
                             f"one), got {self.num_shadows}; use variance='global'.")


# ------------------------------------------------------------------------------------------------ pure statistics
def membership_matrix(num_shadows: int, num_examples: int, seed: int) -> np.ndarray:
    """(K, N) bool: every example IN for exactly K/2 shadows and every shadow holding exactly N/2 examples.

    The first N/2 examples get random K/2-subsets of shadows and the others their complements (so the shadow sizes
    are equal, and with them the DP recipe); the columns are then shuffled so pairs are not adjacent.
    """
    if num_shadows % 2 or num_examples % 2:
        raise ValueError(f"num_shadows and num_examples must be even, got {num_shadows} and {num_examples}.")
    rng = np.random.default_rng(seed)
    half = np.zeros((num_shadows, num_examples // 2), dtype=bool)
    half[: num_shadows // 2] = True
    half = rng.permuted(half, axis=0)
    return np.concatenate([half, ~half], axis=1)[:, rng.permutation(num_examples)]


def logit_confidence(class_scores: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """φ = log p_y − log(1 − p_y) with p the softmax of the class scores (B, C); for two classes, s_y − s_other."""
    log_p = torch.log_softmax(class_scores.double(), dim=-1)
    log_py = log_p.gather(-1, labels.view(-1, 1)).squeeze(-1)
    others = log_p.masked_fill(torch.nn.functional.one_hot(labels, log_p.shape[-1]).bool(), float("-inf"))
    return (log_py - torch.logsumexp(others, dim=-1)).numpy()


def _means(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, values, 0.0).sum(0) / mask.sum(0)


def _per_example_std(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    squares = np.where(mask, (values - _means(values, mask)) ** 2, 0.0)
    return np.maximum(np.sqrt(squares.sum(0) / (mask.sum(0) - 1)), MIN_STD)


def _pooled_std(values: np.ndarray, membership: np.ndarray) -> float:
    """One σ for IN and OUT alike: every example's spread around its own IN and its own OUT mean, pooled, so that
    examples that are simply easier (a higher φ whatever the membership) do not inflate it."""
    squares, dof = 0.0, 0
    for side in (membership, ~membership):
        squares += np.where(side, (values - _means(values, side)) ** 2, 0.0).sum()
        dof += int((side.sum(0) - 1).sum())
    if dof < 1:
        raise ValueError("A pooled σ needs some example with two shadows on one side; use more shadows.")
    return max(float(np.sqrt(squares / dof)), MIN_STD)


def lira_scores(membership: np.ndarray, confidences: np.ndarray, variance: str = "global") -> np.ndarray:
    """(K, N) LiRA scores: for shadow k as the attacked model, the log likelihood ratio of each example's φ under
    IN vs OUT Gaussians fitted on the other K − 1 shadows. Higher means "member".

    The means use only the first m = min(#IN, #OUT) other shadows of each side (in shadow order). Leaving k out
    makes the side k belongs to one shadow short, and a mean of fewer points sits farther from a fresh φ on
    average, so with unequal sides even identically distributed scores rank non-members above members (measured:
    AUC 0.477 over 16 000 null pairs with 8 shadows); equal sides make the null symmetric. ``variance="global"``
    shares one pooled σ between IN and OUT (from all K − 1 others, see `_pooled_std`); ``"per_example"`` fits
    σ_in and σ_out of each example on the same m shadows as its means.
    """
    membership = np.asarray(membership, dtype=bool)
    confidences = np.asarray(confidences, dtype=np.float64)
    if membership.shape != confidences.shape or membership.ndim != 2:
        raise ValueError(f"membership and confidences must be (K, N) arrays of one shape, got {membership.shape} and "
                         f"{confidences.shape}.")
    if variance not in VARIANCES:
        raise ValueError(f"`variance` must be one of {VARIANCES}, got {variance!r}.")
    need = 2 if variance == "per_example" else 1
    from scipy.stats import norm

    scores = np.empty_like(confidences)
    for k in range(len(membership)):
        others, values = np.delete(membership, k, 0), np.delete(confidences, k, 0)
        m = np.minimum(others.sum(0), (~others).sum(0))
        if m.min() < need:
            raise ValueError(f"Every example needs >= {need} IN and >= {need} OUT shadows besides the attacked one "
                             f"({variance!r} variance); use more shadows, balanced as `membership_matrix` makes them.")
        use_in = others & (np.cumsum(others, 0) <= m)
        use_out = ~others & (np.cumsum(~others, 0) <= m)
        mu_in, mu_out = _means(values, use_in), _means(values, use_out)
        if variance == "per_example":
            sd_in, sd_out = _per_example_std(values, use_in), _per_example_std(values, use_out)
        else:
            sd_in = sd_out = _pooled_std(values, others)
        scores[k] = norm.logpdf(confidences[k], mu_in, sd_in) - norm.logpdf(confidences[k], mu_out, sd_out)
    return scores


def tpr_at_fpr(scores: np.ndarray, members: np.ndarray, fpr: float) -> Optional[float]:
    """Highest TPR of a threshold on `scores` whose FPR is <= `fpr`; None when there are fewer than 1/fpr
    non-members (no threshold can then realise that FPR except 0, which is a different figure)."""
    from sklearn.metrics import roc_curve

    members = np.asarray(members, dtype=bool).ravel()
    if (~members).sum() * fpr < 1:
        return None
    fprs, tprs, _ = roc_curve(members, np.asarray(scores).ravel(), drop_intermediate=False)
    return float(tprs[fprs <= fpr].max())


def bootstrap_auc_interval(scores: np.ndarray, membership: np.ndarray, num_resamples: int = 1000, seed: int = 0,
                           level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUC over (K, N) pairs, resampling shadows and examples independently (with
    replacement), since pairs that share a shadow or an example are not independent draws."""
    from sklearn.metrics import roc_auc_score

    scores, membership = np.atleast_2d(scores), np.atleast_2d(np.asarray(membership, dtype=bool))
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(num_resamples):
        rows = rng.integers(0, scores.shape[0], scores.shape[0])
        cols = rng.integers(0, scores.shape[1], scores.shape[1])
        members = membership[np.ix_(rows, cols)].ravel()
        if members.any() and not members.all():
            aucs.append(roc_auc_score(members, scores[np.ix_(rows, cols)].ravel()))
    tail = 100 * (1 - level) / 2
    return float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100 - tail))


def attack_metrics(scores: np.ndarray, membership: np.ndarray, num_resamples: int = 0) -> dict:
    """AUC (with a bootstrap 95% interval when `num_resamples` > 0, see `bootstrap_auc_interval`) and TPR at
    `FPR_LEVELS` of a membership score over all (shadow, example) pairs: arrays of one shape, (K, N) or flat."""
    from sklearn.metrics import roc_auc_score

    members = np.asarray(membership, dtype=bool).ravel()
    flat = np.asarray(scores, dtype=np.float64).ravel()
    if members.all() or not members.any():
        raise ValueError("The membership labels need both members and non-members.")
    interval = bootstrap_auc_interval(scores, membership, num_resamples) if num_resamples > 0 else None
    return {
        "auc": float(roc_auc_score(members, flat)),
        "auc_interval": interval,
        "tpr_at_fpr": {str(level): tpr_at_fpr(flat, members, level) for level in FPR_LEVELS},
        "num_pairs": int(members.size),
        "num_member_pairs": int(members.sum()),
    }


# ------------------------------------------------------------------------------------------------ the audit run
def default_audit_dir(run_dir: str, dp: bool) -> str:
    return os.path.join(run_dir, "audit_dp" if dp else "audit_non_dp")


def _settings(cfg, audit: AuditConfig) -> dict:
    """What an audit's shadows depend on: the configs' fields, except `_RESUME_FREE`'s (the precision fields as given
    among them: "auto" means another dtype on another machine) and fields still at the default they had before
    they existed, plus the resolved compute dtype when it is not fp32."""
    settings = {name: {k: v for k, v in dataclasses.asdict(obj).items()
                       if k not in _RESUME_FREE and (k not in _ADDED_AT_DEFAULT or v != _ADDED_AT_DEFAULT[k])}
                for name, obj in (("pipeline", cfg), ("audit", audit))}
    precision = cfg.precision()
    if precision.dtype != "float32":
        settings["pipeline"]["resolved_dtype"] = precision.dtype
    return settings


def _check_resume(folder: str, settings: dict) -> None:
    path = os.path.join(folder, "audit_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        if before != json.loads(json.dumps(settings)):
            changed = sorted(f"{part}.{k}" for part in settings for k in settings[part]
                             if before.get(part, {}).get(k) != json.loads(json.dumps(settings[part][k])))
            raise ValueError(f"{folder} holds an audit run with other settings ({', '.join(changed) or 'format'}); "
                             "give a new `audit_dir`, or the same settings to resume.")
    else:
        atomic_write_json(path, settings)


def audit_examples(cfg, num_examples: int):
    """The N audit examples: a seeded sample of the private training split, checked before any work."""
    from .pipeline import private_split
    from .tasks import check_classification_dataset

    train = private_split(cfg, "train")
    if len(train) < num_examples:
        raise ValueError(f"The private training split has {len(train)} examples, fewer than num_examples = "
                         f"{num_examples}; lower num_examples.")
    examples = train.shuffle(seed=cfg.seed).select(range(num_examples))
    check_classification_dataset(examples, cfg.text_column, cfg.label_column, len(cfg.label_word_lists()),
                                 "private training split")
    return examples


def _train_shadow(cfg, student_path: str, masked: bool, examples, in_mask: np.ndarray, folder: str,
                  seed: int) -> dict:
    """Tune one shadow prompt on its IN half with the pipeline's `tune_prompt` (in memory: the shadow's data never
    goes to disk), then score all N examples."""
    from .evaluation import score_dataset
    from .pipeline import load_tokenizer, new_prompted_model, tune_prompt

    shadow_cfg = dataclasses.replace(cfg, seed=seed)
    tokenizer = load_tokenizer(student_path)
    model = new_prompted_model(student_path, cfg.post_config(student_path), masked, seed, cfg.precision())
    checkpoints = os.path.join(folder, "checkpoints")
    start = time.perf_counter()
    trainer, record = tune_prompt(shadow_cfg, model, tokenizer, examples.select(np.flatnonzero(in_mask)), checkpoints,
                                  cfg.dp)
    tune_wall_time = time.perf_counter() - start
    scores, labels = score_dataset(trainer.model, tokenizer, examples, cfg.post_config(),
                                   text_column=cfg.text_column, label_column=cfg.label_column,
                                   batch_size=cfg.eval_batch_size, desc="audit: score")
    # The checkpoints (computed from the shadow's half of the private data) are not needed once it is scored.
    shutil.rmtree(checkpoints, ignore_errors=True)
    right = (scores.argmax(-1) == labels).numpy()
    return {
        "class_scores": scores.tolist(),
        "labels": labels.tolist(),
        "membership": in_mask.tolist(),
        "confidence": logit_confidence(scores, labels).tolist(),
        "train_accuracy": float(right[in_mask].mean()),
        "test_accuracy": float(right[~in_mask].mean()),
        "steps": record["steps"],
        "privacy": record["privacy"],
        "seed": seed,
        "tune_wall_time_s": tune_wall_time,
        "wall_time_s": time.perf_counter() - start,
    }


def run_audit(cfg, audit: AuditConfig, command: Optional[str] = None) -> dict:
    """Run (or resume) the LiRA audit of prompts tuned with `cfg`'s recipe (a `PipelineConfig`, whose `dp`, tuning
    settings, student and private data are used) and write ``audit.json``; returns its content."""
    from tqdm.auto import tqdm

    from .assets import resolve_model
    from .config import PRIVACY_KEYS
    from .pipeline import distill_stage

    if not isinstance(audit, AuditConfig):
        raise ValueError(f"`audit` must be an AuditConfig, got {type(audit).__name__}.")
    start = time.perf_counter()
    examples = audit_examples(cfg, audit.num_examples)
    if cfg.tune_batch_size > audit.num_examples // 2:
        raise ValueError(f"`tune_batch_size` ({cfg.tune_batch_size}) exceeds the shadows' training-set size "
                         f"num_examples / 2 = {audit.num_examples // 2}; lower it or raise num_examples.")
    membership = membership_matrix(audit.num_shadows, audit.num_examples, cfg.seed)
    folder = audit.audit_dir or default_audit_dir(cfg.run_dir, cfg.dp)
    os.makedirs(folder, exist_ok=True)
    _check_resume(folder, _settings(cfg, audit))
    masked = cfg.masked
    if cfg.student_model is not None:
        student_path = resolve_model(cfg.student_model)
    else:
        student_path, _ = distill_stage(cfg, resolve_model(cfg.target_model), masked)
    shadows = []
    for k in tqdm(range(audit.num_shadows), desc="audit: shadows"):
        shadow_dir = os.path.join(folder, "shadows", f"{k:03d}")
        path = os.path.join(shadow_dir, "scores.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                shadows.append({**json.load(f), "reused": True})
            continue
        # Each shadow its own seed: its batch order and, under DP, its noise must be independent of the others'.
        shadow = _train_shadow(cfg, student_path, masked, examples, membership[k], shadow_dir, cfg.seed + 1 + k)
        atomic_write_json(path, shadow)
        shadows.append({**shadow, "reused": False})
    confidences = np.array([s["confidence"] for s in shadows])
    lira = lira_scores(membership, confidences, audit.variance)
    ledgers = [s["privacy"] for s in shadows]
    privacy = None
    if cfg.dp:
        privacy = {k: ledgers[0][k] for k in PRIVACY_KEYS}
        privacy["epsilon"] = max(ledger["epsilon"] for ledger in ledgers)
    result = {
        **attack_metrics(lira, membership, audit.bootstrap_resamples),
        "loss_attack": attack_metrics(confidences, membership, audit.bootstrap_resamples),
        "num_shadows": audit.num_shadows,
        "num_examples": audit.num_examples,
        "shadow_train_size": audit.num_examples // 2,
        "variance": audit.variance,
        "dp": cfg.dp,
        "privacy": privacy,
        "shadow_train_accuracy": float(np.mean([s["train_accuracy"] for s in shadows])),
        "shadow_test_accuracy": float(np.mean([s["test_accuracy"] for s in shadows])),
        "shadow_steps": shadows[0]["steps"],
        "shadow_wall_time_s": float(sum(s["wall_time_s"] for s in shadows)),
        "shadows_reused": sum(s["reused"] for s in shadows),
        "student_model": student_path,
        "precision": cfg.precision().record(),
        "wall_time_s": time.perf_counter() - start,
        "command": command,
        "settings": _settings(cfg, audit),
    }
    atomic_write_json(os.path.join(folder, AUDIT_FILE), result)
    return result
