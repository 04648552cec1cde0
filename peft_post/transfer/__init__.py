"""POST stage 3: transfer a small-model soft prompt into the large model on public data only."""

from .cache import TransferCache, build_transfer_cache, frozen_logits, select_support
from .config import TransferConfig
from .trainer import (TransferTrainer, direct_transfer, direct_transfer_obstacle, require_shared_vocabulary,
                      suggest_alpha, tokenizer_mismatch)

__all__ = [
    "TransferCache",
    "TransferConfig",
    "TransferTrainer",
    "build_transfer_cache",
    "direct_transfer",
    "direct_transfer_obstacle",
    "frozen_logits",
    "require_shared_vocabulary",
    "select_support",
    "suggest_alpha",
    "tokenizer_mismatch",
]
