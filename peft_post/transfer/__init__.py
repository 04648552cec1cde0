"""POST stage 3: transfer a small-model soft prompt into the large model on public data only."""

from .cache import TransferCache, build_transfer_cache, frozen_logits, select_support
from .config import TransferConfig
from .trainer import TransferTrainer, direct_transfer, suggest_alpha

__all__ = [
    "TransferCache",
    "TransferConfig",
    "TransferTrainer",
    "build_transfer_cache",
    "direct_transfer",
    "frozen_logits",
    "select_support",
    "suggest_alpha",
]
