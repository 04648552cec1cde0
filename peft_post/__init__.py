"""peft_post: POST (Privacy Of Soft-prompt Transfer, ICML 2025) as a Hugging Face PEFT extension."""

__version__ = "0.1.0"

from .config import POST_CONFIG_NAME, POSTConfig
from .distill import DistillationConfig, DistillationTrainer, make_student
from .evaluation import evaluate_prompt, load_accuracy_metric
from .hub import build_model_card, load_transferred_prompt, push_transferred_prompt
from .losses import class_scores, verbalizer_loss
from .modeling import label_logits
from .prompts import get_prompt, prompt_from_text, set_prompt
from .tasks import TaskTemplate, Verbalizer, VerbalizerCollator, label_positions
from .tuning import DPConfig, DPPromptTrainer, PromptTrainer, PromptTrainingConfig
from .losses import transfer_loss
from .transfer import TransferConfig, TransferTrainer, direct_transfer, suggest_alpha
from .assets import default_model_path, load_text_dataset
from .report import POSTResults, write_report

__all__ = [
    "POSTResults",
    "default_model_path",
    "load_text_dataset",
    "write_report",
    "DistillationConfig",
    "DistillationTrainer",
    "make_student",
    "DPConfig",
    "DPPromptTrainer",
    "PromptTrainer",
    "PromptTrainingConfig",
    "POSTConfig",
    "POST_CONFIG_NAME",
    "TaskTemplate",
    "TransferConfig",
    "TransferTrainer",
    "Verbalizer",
    "VerbalizerCollator",
    "class_scores",
    "evaluate_prompt",
    "build_model_card",
    "load_transferred_prompt",
    "push_transferred_prompt",
    "get_prompt",
    "label_logits",
    "label_positions",
    "load_accuracy_metric",
    "prompt_from_text",
    "set_prompt",
    "verbalizer_loss",
    "direct_transfer",
    "suggest_alpha",
    "transfer_loss",
]
