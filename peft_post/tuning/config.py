"""Configuration of stage 2 (local prompt tuning): `PromptTrainingConfig` and the DP settings `DPConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

# Only an accountant with a replace-one analysis of the Poisson-subsampled Gaussian: the ledger publishes q = B/N,
# so N is public and add/remove adjacency would overstate the guarantee (docs/privacy.md). Opacus's "prv" and "rdp"
# analyse add/remove only.
DP_ACCOUNTANTS = ("pld",)


@dataclass
class PromptTrainingConfig(TrainingArguments):
    """
    `TrainingArguments` for `PromptTrainer` / `DPPromptTrainer`, with defaults chosen for training a soft prompt
    (a few thousand parameters in front of a frozen LM) rather than a full model.
    """

    learning_rate: float = field(
        default=3e-2,
        metadata={
            "help": "Adam learning rate of the prompt. Prompts need far larger rates than weights: measured on "
            "SmolLM2 (DESIGN §5), lr 1e-2 left the loss flat for 300 steps, 3e-2 gave the best distilled student "
            "(69.9 percent) and 1e-1 the best full model (84.4 percent in 160 steps). 3e-2 is the safe default; try 1e-1 on "
            "larger models."
        },
    )
    weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "Decoupled (AdamW) decay of the prompt rows. Off by default, as in the paper. Prompt rows grow "
            "well past real word-embedding norms without it (3.2 -> 11-29 on SmolLM2), which may hurt transfer to "
            "another model: set e.g. 0.01-0.1 to keep them nearer the embedding scale, and watch `prompt_norm_mean` "
            "against `embedding_norm_mean` in the evaluation metrics. Under DP the decay is post-processing of the "
            "noisy gradient and costs no privacy."
        },
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={
            "help": "Trainer's clipping of the batch gradient; 0 disables it. Adam is invariant to the gradient's "
            "scale, so it rarely matters for a prompt. Must be 0 for `DPPromptTrainer`: DP clips each example's "
            "gradient itself (`DPConfig.max_grad_norm`)."
        },
    )
    per_device_train_batch_size: int = field(
        default=16,
        metadata={"help": "Training batch size; under DP it is the *expected* Poisson batch size (q = batch / N)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the raw text/label rows go to the verbalizer collator as they are."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Set every dropout of the frozen LM to 0 (as TRL does). The LM does not learn, so dropout only "
            "adds noise to the prompt's gradient and makes training differ from evaluation."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Dataset column holding the input text."})
    label_column: str = field(default="label", metadata={"help": "Dataset column holding the integer class label."})
    answer_column: str = field(
        default="answer", metadata={"help": "Generation tasks: dataset column holding the answer text."})
    report_to: Optional[str] = field(
        default="none",
        metadata={"help": "Experiment trackers to report to; 'none' keeps private-data runs local by default."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.remove_unused_columns:
            raise ValueError(
                "`remove_unused_columns` must be False: prompt training feeds raw text/label rows to its collator."
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"`learning_rate` must be a finite number > 0, got {self.learning_rate!r}.")
        if self.weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay!r}.")
        if self.max_grad_norm is None or self.max_grad_norm < 0:
            raise ValueError(f"`max_grad_norm` must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}.")
        for name in ("text_column", "label_column", "answer_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"`{name}` must be a non-empty column name, got {getattr(self, name)!r}.")


@dataclass
class DPConfig:
    """
    Differential privacy of prompt tuning (PromptDPSGD): per-example clipping to `max_grad_norm`, Gaussian noise of
    std `noise_multiplier * max_grad_norm` on the clipped sum, Poisson sampling, and a replace-one PLD accountant.
    The sampling and the noise draw from a secret generator keyed from the OS, never from the Trainer's seed.

    Give exactly one of `target_epsilon` (the noise multiplier is then found with Opacus's `get_noise_multiplier`
    for the planned number of steps) or `noise_multiplier`.
    """

    target_epsilon: Optional[float] = field(
        default=None,
        metadata={"help": "Privacy budget ε to reach at the end of training (the paper uses 8). Excludes `noise_multiplier`."},
    )
    noise_multiplier: Optional[float] = field(
        default=None,
        metadata={
            "help": "Noise multiplier σ (noise std = σ·C). Excludes `target_epsilon`. σ = 0 means no privacy "
            "(ε = ∞) and is allowed only for debugging."
        },
    )
    target_delta: Optional[float] = field(
        default=None,
        metadata={
            "help": "δ of the (ε, δ) guarantee, in (0, 1). None means 1/N (N = training examples, the paper's "
            "choice); any δ >= 1/N warns, since a δ of that size allows leaking about one example outright."
        },
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Per-example clipping bound C (> 0) on the L2 norm of each example's prompt gradient."},
    )
    accountant: str = field(
        default="pld",
        metadata={
            "help": "Privacy accountant: 'pld', Google dp_accounting's privacy-loss-distribution analysis (tight, "
            "pessimistic) under replace-one adjacency. Opacus's 'prv' and 'rdp' are not offered: they analyse "
            "add/remove adjacency only, which does not hold once N is published (see docs/privacy.md)."
        },
    )
    poisson_sampling: bool = field(
        default=True,
        metadata={
            "help": "Sample each batch by including every example independently with rate q (what the "
            "accountant's analysis assumes). False uses shuffled fixed-size batches and warns: ε is then the usual "
            "approximation, not a proven bound."
        },
    )
    secure_mode: bool = field(
        default=False,
        metadata={
            "help": "Opacus's secure mode: a cryptographic RNG (torchcsprng) and noise robust to floating-point "
            "attacks. torchcsprng has no release for current torch or Python, so True raises; see docs/privacy.md "
            "for what the default (secret OS-entropy keyed generators) does and does not cover."
        },
    )
    insecure_noise_seed: Optional[int] = field(
        default=None,
        metadata={
            "help": "FOR TESTS AND STUDIES ONLY. Derive the Poisson batches and the noise from this number instead "
            "of a secret from the OS, so a run can be replayed exactly. Anyone who learns the number can replay and "
            "subtract the noise: the ledger and the model card then state that the DP guarantee does not hold."
        },
    )
    public_initial_prompt: bool = field(
        default=False,
        metadata={
            "help": "State that a starting prompt which was trained WITHOUT DP (its provenance says so) was trained "
            "on public data only. Without it the trainer refuses such a prompt: the DP guarantee cannot cover what "
            "earlier non-private training on private data revealed. The ledger records the statement."
        },
    )
    max_physical_batch_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Largest number of examples run through the model at once; a larger Poisson batch is split "
            "into chunks whose clipped gradients are summed before the noise is added once (exact, and the right "
            "way to save memory under DP; Trainer gradient accumulation is refused)."
        },
    )
    class_weights: Optional[list[float]] = field(
        default=None,
        metadata={
            "help": "Weights in (0, 1], one per class (or a 'w0|w1|...' string), on each example's clipped gradient. "
            "A clipped DP step is a vote of one bounded vector per example, and when the examples of a class pull "
            "the same way (they do for a soft prompt) the vote mostly moves the prompt towards the majority class: "
            "weights inversely proportional to the class shares, the largest 1, balance it. Each example still "
            "moves the sum by at most C, so σ and ε are unchanged; but weights computed from the private data's "
            "class counts release those counts, which this ledger does not account for: take them from public "
            "knowledge or a separately accounted DP count. The ledger records them. Classification only."
        },
    )
    epsilon_tolerance: float = field(
        default=0.01,
        metadata={"help": "Precision of the search for σ given `target_epsilon` (Opacus `get_noise_multiplier`)."},
    )

    def __post_init__(self):
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "Give exactly one of `target_epsilon` (σ is then derived) and `noise_multiplier`; got "
                f"target_epsilon={self.target_epsilon!r}, noise_multiplier={self.noise_multiplier!r}."
            )
        if self.target_epsilon is not None and not (
            isinstance(self.target_epsilon, (int, float)) and math.isfinite(self.target_epsilon) and self.target_epsilon > 0
        ):
            raise ValueError(f"`target_epsilon` must be a finite number > 0, got {self.target_epsilon!r}.")
        if self.noise_multiplier is not None and not (
            isinstance(self.noise_multiplier, (int, float))
            and math.isfinite(self.noise_multiplier)
            and self.noise_multiplier >= 0
        ):
            raise ValueError(f"`noise_multiplier` must be a finite number >= 0, got {self.noise_multiplier!r}.")
        if self.target_delta is not None and not (
            isinstance(self.target_delta, (int, float)) and 0 < self.target_delta < 1
        ):
            raise ValueError(f"`target_delta` must be in (0, 1) (or None for 1/N), got {self.target_delta!r}.")
        if not (isinstance(self.max_grad_norm, (int, float)) and math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"`max_grad_norm` (the clipping bound C) must be a finite number > 0, got {self.max_grad_norm!r}.")
        if self.accountant not in DP_ACCOUNTANTS:
            raise ValueError(f"`accountant` must be one of {DP_ACCOUNTANTS}, got {self.accountant!r}.")
        if self.max_physical_batch_size is not None and not (
            isinstance(self.max_physical_batch_size, int) and self.max_physical_batch_size >= 1
        ):
            raise ValueError(f"`max_physical_batch_size` must be a positive int or None, got {self.max_physical_batch_size!r}.")
        if isinstance(self.class_weights, str):
            try:
                self.class_weights = [float(w) for w in self.class_weights.split("|")]
            except ValueError:
                raise ValueError(f"`class_weights` must be numbers separated by '|' (e.g. '0.45|1'), got "
                                 f"{self.class_weights!r}.") from None
        if self.class_weights is not None and (
                isinstance(self.class_weights, (str, bytes)) or not self.class_weights
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w <= 1
                           for w in self.class_weights)):
            raise ValueError(f"`class_weights` must be one weight in (0, 1] per class (the clipping bound then still "
                             f"bounds each example's contribution), got {self.class_weights!r}.")
        if self.class_weights is not None:
            self.class_weights = [float(w) for w in self.class_weights]
        if not self.epsilon_tolerance > 0:
            raise ValueError(f"`epsilon_tolerance` must be > 0, got {self.epsilon_tolerance!r}.")
        if self.insecure_noise_seed is not None and (
            isinstance(self.insecure_noise_seed, bool) or not isinstance(self.insecure_noise_seed, int)
        ):
            raise ValueError(f"`insecure_noise_seed` must be None (secret noise) or an int, got {self.insecure_noise_seed!r}.")
        if self.secure_mode:
            try:
                import torchcsprng  # noqa: F401
            except ImportError as e:
                raise ValueError(
                    "`secure_mode=True` needs the `torchcsprng` package (a cryptographic RNG), which has no release "
                    "for current torch or Python and is not installed. Set secure_mode=False: the sampling and noise "
                    "then come from generators keyed by a secret from the OS (docs/privacy.md says what that covers)."
                ) from e
