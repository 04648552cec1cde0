"""peft_post: POST (Privacy Of Soft-prompt Transfer, ICML 2025) as a Hugging Face PEFT extension."""

__version__ = "0.1.0"

from .assets import load_text_dataset
from .audit import AuditConfig, run_audit
from .config import POST_CONFIG_NAME, POSTConfig
from .distill import DistillationConfig, DistillationTrainer, make_student
from .dp_audit import DPAuditConfig, run_distinguishing_audit
from .evaluation import evaluate_prompt
from .hub import build_model_card, load_transferred_prompt, push_transferred_prompt
from .losses import transfer_loss, verbalizer_loss
from .pipeline import PipelineConfig, run_pipeline
from .report import POSTResults, write_report
from .tasks import TaskTemplate, Verbalizer, VerbalizerCollator
from .transfer import TransferConfig, TransferTrainer, direct_transfer, suggest_alpha
from .tuning import DPConfig, DPPromptTrainer, PromptTrainer, PromptTrainingConfig

# The workflow's entry points and configs only. Building blocks (label_logits, class_scores, score_dataset, get_prompt,
# set_prompt, ...) are imported from their modules: peft_post.modeling, .losses, .evaluation, .prompts, ...
__all__ = [
    "AuditConfig",
    "build_model_card",
    "direct_transfer",
    "DistillationConfig",
    "DistillationTrainer",
    "DPAuditConfig",
    "DPConfig",
    "DPPromptTrainer",
    "evaluate_prompt",
    "load_text_dataset",
    "load_transferred_prompt",
    "make_student",
    "POST_CONFIG_NAME",
    "POSTConfig",
    "POSTResults",
    "PipelineConfig",
    "PromptTrainer",
    "PromptTrainingConfig",
    "push_transferred_prompt",
    "run_audit",
    "run_distinguishing_audit",
    "run_pipeline",
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
