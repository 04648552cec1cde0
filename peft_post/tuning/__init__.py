"""Stage 2 of POST: local prompt tuning, non-private (`PromptTrainer`) and differentially private (`DPPromptTrainer`)."""

from .config import DPConfig, PromptTrainingConfig
from .trainer import DPPromptTrainer, PromptTrainer

__all__ = ["DPConfig", "DPPromptTrainer", "PromptTrainer", "PromptTrainingConfig"]
