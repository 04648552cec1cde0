"""`DistillationConfig`: training arguments of POST stage 1 (DistilBERT-style distillation of the teacher)."""

from __future__ import annotations

from dataclasses import dataclass, field
from transformers import TrainingArguments


@dataclass
class DistillationConfig(TrainingArguments):
    """
    Arguments for `DistillationTrainer`. The loss is
    ``alpha_ce·T²·KL(teacher ‖ student) + alpha_lm·(CLM or MLM loss) + alpha_cos·(1 − cos(h_t, h_s))`` over
    non-padding tokens, plus ``alpha_label_slot·T²·KL`` over the label slots of templated texts; the defaults are the
    paper's (α_ce 5, α_lm 2, α_cos 1, T 2, learning rate 2.5e-4).
    ``remove_unused_columns`` defaults to False because the trainer brings its own collator.
    """

    learning_rate: float = field(default=2.5e-4, metadata={"help": "AdamW learning rate (paper: 2.5e-4)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the distillation collator needs the dataset's own columns."}
    )
    alpha_ce: float = field(default=5.0, metadata={"help": "Weight of the T²·KL(teacher ‖ student) term."})
    alpha_lm: float = field(default=2.0, metadata={"help": "Weight of the student's own CLM (or MLM) loss."})
    alpha_cos: float = field(
        default=1.0, metadata={"help": "Weight of 1 − cos(h_t, h_s) between last hidden states (needs equal width)."}
    )
    alpha_label_slot: float = field(
        default=0.0,
        metadata={"help": "Weight of an extra T²·KL averaged over the label slots of templated texts only (see "
                          "`with_task_template`): the one position a prompt tuned on the student acts through. 0 off."},
    )
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T of the KL term (> 0)."})
    mlm_probability: float = field(
        default=0.15, metadata={"help": "Fraction of tokens masked for masked-LM students (ignored for causal LMs)."}
    )
    block_size: int = field(
        default=128,
        metadata={"help": "Raw text datasets are tokenized, concatenated and cut into blocks of this many tokens."},
    )
    dataset_text_field: str = field(
        default="text", metadata={"help": "Text column of a raw dataset (one without `input_ids`)."}
    )
    freeze_embeddings: bool = field(
        default=False,
        metadata={"help": "Freeze the student's input (and position) embeddings. With tied embeddings this also "
                          "freezes the LM head. Keeps soft prompts in the teacher's input space (paper ablation)."},
    )
    freeze_lm_head: bool = field(
        default=False,
        metadata={"help": "Freeze the student's output embeddings / LM head (with tied embeddings: the input ones too)."},
    )

    def __post_init__(self):
        for name in ("alpha_ce", "alpha_lm", "alpha_cos", "alpha_label_slot"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.alpha_ce == 0 and self.alpha_lm == 0 and self.alpha_cos == 0 and self.alpha_label_slot == 0:
            raise ValueError("`alpha_ce`, `alpha_lm`, `alpha_cos` and `alpha_label_slot` are all 0: the loss would be "
                             "0. Set at least one (paper: 5, 2, 1).")
        if isinstance(self.learning_rate, bool) or not (isinstance(self.learning_rate, (int, float))
                                                         and 0 < self.learning_rate < float("inf")):
            raise ValueError(f"`learning_rate` must be a finite number > 0, got {self.learning_rate!r}.")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature} (paper: 2).")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"`mlm_probability` must be in (0, 1), got {self.mlm_probability} (paper: 0.15).")
        if self.block_size < 2:
            raise ValueError(f"`block_size` must be >= 2 tokens, got {self.block_size}.")
        super().__post_init__()
