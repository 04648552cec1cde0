"""`DPAuditConfig`: the options of `peft-post audit-dp`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..tuning.accountant import ADJACENCIES, REPLACE_ONE
from .bounds import METHODS

DP_AUDIT_FILE = "dp_audit.json"

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
        default=None, metadata={"help": "σ of the honest case; None calibrates σ to the pipeline's dp_target_epsilon."})
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
