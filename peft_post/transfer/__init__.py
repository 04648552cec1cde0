"""POST stage 3: transfer a small-model soft prompt into the large model on public data only."""

from .cache import (TransferCache, build_transfer_cache, frozen_logits, open_transfer_cache, projected_cache_bytes,
                    resolve_cache_dtype, select_support, transfer_cache_digest)
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
    "open_transfer_cache",
    "projected_cache_bytes",
    "require_shared_vocabulary",
    "resolve_cache_dtype",
    "select_support",
    "suggest_alpha",
    "tokenizer_mismatch",
    "transfer_cache_digest",
]
