"""`run_dp_audit` (`peft-post audit-dp`): the honest case and the broken controls on the pipeline's student."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
import warnings
from typing import Optional, Sequence

from .config import CASES, DP_AUDIT_FILE, DPAuditConfig
from .trials import (DEFAULT_STATISTICS, choose_canary, flipped_label, max_example_gradient_norm,
                     neighbouring_datasets, run_distinguishing_audit, to_jsonable)


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
    from ..tuning import DPPromptTrainer

    outdir = tempfile.mkdtemp(prefix="peft-post-dp-audit-")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPPromptTrainer(model, dataclasses.replace(training_args, output_dir=outdir),
                                      dp_config=dp_config, train_dataset=dataset, processing_class=tokenizer)
        return float(trainer.noise_multiplier)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def run_dp_audit(cfg, audit: DPAuditConfig, command: Optional[str] = None) -> dict:
    """`peft-post audit-dp`: the distinguishing audit of the pipeline's DP tuning (its student, private data, prompt
    and DP budget) for each case of `audit.cases`; writes the result as JSON (`audit.output`, default
    ``<run_dir>/dp_audit.json``) and returns it. D and D' hold `audit.num_examples` examples of the private
    training split plus the canary (D) or a replacement (D')."""
    from ..assets import resolve_model
    from ..io import atomic_write_json
    from ..pipeline import distill_stage, load_tokenizer, new_prompted_model, private_split
    from ..tasks import check_classification_dataset
    from ..tuning import DPConfig, PromptTrainingConfig

    if not isinstance(audit, DPAuditConfig):
        raise ValueError(f"`audit` must be a DPAuditConfig, got {type(audit).__name__}.")
    start = time.perf_counter()
    text_column, label_column = cfg.text_column, cfg.label_column
    train = private_split(cfg, "train")
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
    model = new_prompted_model(student_path, cfg.post_config(student_path), masked, cfg.seed, cfg.precision())
    if audit.canary_text is None:
        canary, candidates = choose_canary(model, tokenizer, data, text_column=text_column, label_column=label_column)
    else:
        candidates = None
        canary = {text_column: audit.canary_text,
                  label_column: flipped_label(model, tokenizer, audit.canary_text, label_column, text_column)}
    args = PromptTrainingConfig(
        output_dir="dp-audit", max_steps=audit.steps, learning_rate=audit.learning_rate, optim=audit.optim,
        lr_scheduler_type="constant", per_device_train_batch_size=audit.batch_size, text_column=text_column,
        label_column=label_column, **cfg.precision().trainer_arguments(), seed=cfg.seed, save_strategy="no",
        report_to="none", disable_tqdm=True)
    d_in, _, replacement = neighbouring_datasets(data, canary, audit.adjacency, replacement)
    clip = cfg.dp_max_grad_norm
    sigma = audit.noise_multiplier
    if sigma is None:
        sigma = calibrated_noise_multiplier(model, tokenizer, d_in, cfg.dp_config(), args)
    honest = DPConfig(noise_multiplier=sigma, target_delta=cfg.dp_target_delta, max_grad_norm=clip)
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
        "honest_dp": {"noise_multiplier": sigma, "max_grad_norm": clip, "target_delta": cfg.dp_target_delta},
        "no_clipping_norm": no_clipping_norm,
        "largest_example_gradient_norm_at_p0": max_norm,
        "student_model": cfg.student_model or "distilled by the pipeline (cached)",
        "precision": cfg.precision().record(),
        "settings": {"pipeline": dataclasses.asdict(cfg), "audit": dataclasses.asdict(audit)},
        "command": command,
        "wall_time_s": time.perf_counter() - start,
    }
    path = audit.output or os.path.join(cfg.run_dir, DP_AUDIT_FILE)
    out = to_jsonable(out)
    atomic_write_json(path, out)
    out["path"] = path
    return out
