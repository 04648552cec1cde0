"""peft_post: POST (Privacy Of Soft-prompt Transfer, ICML 2025) as a Hugging Face PEFT extension."""

__version__ = "0.1.0"

from .config import POST_CONFIG_NAME, POSTConfig
from .evaluation import evaluate_prompt, load_accuracy_metric
from .losses import class_scores, verbalizer_loss
from .modeling import label_logits
from .prompts import get_prompt, prompt_from_text, set_prompt
from .tasks import TaskTemplate, Verbalizer, VerbalizerCollator, label_positions
from .tuning import DPConfig, DPPromptTrainer, PromptTrainer, PromptTrainingConfig

__all__ = [
    "DPConfig",
    "DPPromptTrainer",
    "PromptTrainer",
    "PromptTrainingConfig",
    "POSTConfig",
    "POST_CONFIG_NAME",
    "TaskTemplate",
    "Verbalizer",
    "VerbalizerCollator",
    "class_scores",
    "evaluate_prompt",
    "get_prompt",
    "label_logits",
    "label_positions",
    "load_accuracy_metric",
    "prompt_from_text",
    "set_prompt",
    "verbalizer_loss",
]
