"""Worker of tests/test_transfer_cache_scale.py: two gloo processes share one on-disk transfer cache.

``python tests/_cache_mp_worker.py OUT`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Both ranks build the
same seeded config-only models and batches (no tokenizer, no files needed), call `shared_transfer_cache` on one
path, and save to ``OUT/rank-<rank>.pt`` how many forwards each ran, whether it built, and the cache's tensors. A
second round makes rank 0's build fail, to check that rank 1 gets an error instead of waiting forever.
"""

from __future__ import annotations

import os
import sys

import torch
import transformers as tf
from peft import PromptTuningConfig, get_peft_model

from peft_post.testing import tiny_config
from peft_post.transfer import build_transfer_cache
from peft_post.transfer.cache import shared_transfer_cache

VOCAB, N, LENGTH = 300, 10, 7


def models():
    torch.manual_seed(0)
    source = get_peft_model(tf.AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB)).eval(),
                            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    torch.manual_seed(1)
    target = tf.AutoModelForCausalLM.from_config(tiny_config("gpt2", VOCAB)).eval()
    return source, target


def batches(batch_size=4):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (N, LENGTH), generator=g)
    return [{"input_ids": ids[i:i + batch_size], "attention_mask": torch.ones_like(ids[i:i + batch_size]),
             "label_positions": torch.full((len(ids[i:i + batch_size]),), LENGTH - 1),
             "example_index": torch.arange(i, min(i + batch_size, N))} for i in range(0, N, batch_size)]


def main(out):
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    source, target = models()
    forwards = []
    target.get_input_embeddings().register_forward_hook(lambda *a: forwards.append(1))
    path = os.path.join(out, "cache", "shared.safetensors")

    def build():
        return build_transfer_cache(source, target, batches(), N, [5, 6], top_k=3, dtype=torch.bfloat16, path=path,
                                    digest="d1")

    cache, built = shared_transfer_cache(path, "d1", build)
    result = {"built": built, "forwards": len(forwards), "path": cache.path,
              "tensors": {k: v.clone() for k, v in cache.tensors().items()}}

    def fail():
        raise OSError("disk full (simulated)")

    try:
        shared_transfer_cache(os.path.join(out, "cache", "other.safetensors"), "d2", fail)
        result["failure"] = None
    except (OSError, RuntimeError) as err:
        result["failure"] = f"{type(err).__name__}: {err}"
    torch.save(result, os.path.join(out, f"rank-{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
