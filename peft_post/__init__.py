"""peft_post: POST (Privacy Of Soft-prompt Transfer, ICML 2025) as a Hugging Face PEFT extension."""

__version__ = "0.1.0"

from .assets import default_model_path, load_text_dataset
from .config import POST_CONFIG_NAME, POSTConfig
from .distill import DistillationConfig, DistillationTrainer, make_student
from .dp_audit import DPAuditConfig, epsilon_lower_bound, run_distinguishing_audit
from .evaluation import evaluate_prompt, load_accuracy_metric, score_dataset
from .hub import build_model_card, load_transferred_prompt, push_transferred_prompt
from .losses import class_scores, transfer_loss, verbalizer_loss
from .modeling import label_logits
from .prompts import get_prompt, prompt_from_text, set_prompt
from .report import POSTResults, write_report
from .tasks import TaskTemplate, Verbalizer, VerbalizerCollator, label_positions
from .transfer import TransferConfig, TransferTrainer, direct_transfer, suggest_alpha
from .tuning import DPConfig, DPPromptTrainer, PromptTrainer, PromptTrainingConfig

__all__ = [
    "build_model_card",
    "class_scores",
    "default_model_path",
    "direct_transfer",
    "DistillationConfig",
    "DistillationTrainer",
    "DPAuditConfig",
    "DPConfig",
    "DPPromptTrainer",
    "epsilon_lower_bound",
    "evaluate_prompt",
    "score_dataset",
    "get_prompt",
    "label_logits",
    "label_positions",
    "load_accuracy_metric",
    "load_text_dataset",
    "load_transferred_prompt",
    "make_student",
    "POST_CONFIG_NAME",
    "POSTConfig",
    "POSTResults",
    "prompt_from_text",
    "PromptTrainer",
    "PromptTrainingConfig",
    "push_transferred_prompt",
    "run_distinguishing_audit",
    "set_prompt",
    "suggest_alpha",
    "TaskTemplate",
    "transfer_loss",
    "TransferConfig",
    "TransferTrainer",
    "Verbalizer",
    "verbalizer_loss",
    "VerbalizerCollator",
    "write_report",
]
