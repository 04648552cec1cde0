"""Teacher-output cache: the teacher is frozen, so its outputs on a fixed distillation corpus are computed once.

Two kinds, both indexed by row of the prepared (tokenized, blocked) dataset:

- ``"hidden"``: the teacher's last hidden states (N, L, d). Exact: the KL term re-applies the teacher's own LM head
  (one d×V matmul per token, a fraction of the teacher forward) and the cosine term uses them directly.
- ``"topk"``: the k largest teacher logits and their token ids (N, L, k), plus the hidden states when the cosine
  term needs them. Smaller per token than hidden states only for k ≪ d, and approximate (the tail mass is dropped);
  see docs/distillation.md for the measured trade-off.

Causal LMs only: a masked-LM teacher sees a freshly masked input every step, so its outputs cannot be reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..io import atomic_write_bytes
from ..modeling import base_model_of, is_masked_lm, output_head, soft_cap_logits

CACHE_FILE = "teacher_cache.safetensors"
CACHE_KINDS = ("hidden", "topk")


def token_fingerprint(dataset) -> str:
    """sha256 of a prepared dataset's `input_ids`, row by row: ties a cache to the exact blocks it was built on."""
    digest = hashlib.sha256()
    for ids in dataset["input_ids"]:
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def hidden_and_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      need_logits: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Last hidden states (B, L, d), the input of the LM/MLM head, and the full logits (B, L, V)."""
    base = base_model_of(model)
    head = output_head(base)
    if head is None:
        out = base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[-1], out.logits
    hidden = getattr(base, base.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden, (apply_head(base, hidden) if need_logits else None)


def apply_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's LM/MLM head on last hidden states, with Gemma's final logit soft-capping."""
    base = base_model_of(model)
    head = output_head(base)
    if head is None:
        raise ValueError(f"No known LM head for {type(base).__name__}; cannot turn cached hidden states into logits.")
    return soft_cap_logits(head(hidden.to(head.weight.dtype) if hasattr(head, "weight") else hidden), base.config)


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class TeacherCache:
    """Frozen teacher outputs for every row of a prepared distillation dataset (see the module docstring)."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict):
        if meta.get("kind") not in CACHE_KINDS:
            raise ValueError(f"Cache kind must be one of {CACHE_KINDS}, got {meta.get('kind')!r}.")
        self.tensors = tensors
        self.meta = meta

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def __len__(self) -> int:
        return int(self.meta["num_rows"])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def has_hidden(self) -> bool:
        return "hidden" in self.tensors

    @classmethod
    @torch.no_grad()
    def build(cls, teacher, dataset, *, kind: str = "hidden", top_k: int = 64, store_hidden: bool = True,
              batch_size: int = 16, dtype: torch.dtype = torch.float32, pad_token_id: int = 0,
              disable_progress: bool = False) -> "TeacherCache":
        """Run the (frozen) teacher once over ``dataset`` (rows of ``input_ids``, e.g. from
        `prepare_distillation_dataset`) and keep what the distillation loss needs."""
        if kind not in CACHE_KINDS:
            raise ValueError(f"`kind` must be one of {CACHE_KINDS}, got {kind!r}.")
        if is_masked_lm(teacher):
            raise ValueError("A teacher cache needs a causal LM: a masked LM's input is re-masked every step.")
        if kind == "topk" and top_k < 1:
            raise ValueError(f"`top_k` must be >= 1, got {top_k}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if "input_ids" not in dataset.column_names or len(dataset) == 0:
            raise ValueError("Build the cache on a non-empty tokenized dataset with `input_ids` "
                             "(see `prepare_distillation_dataset`).")
        base = base_model_of(teacher)
        was_training = base.training
        base.eval()
        device = base.get_input_embeddings().weight.device
        rows = dataset["input_ids"]
        length = max(len(r) for r in rows)
        n = len(rows)
        d = base.config.hidden_size
        tensors: dict[str, torch.Tensor] = {}
        if kind == "hidden" or store_hidden:
            tensors["hidden"] = torch.zeros((n, length, d), dtype=dtype)
        if kind == "topk":
            tensors["topk_values"] = torch.zeros((n, length, top_k), dtype=dtype)
            tensors["topk_indices"] = torch.zeros((n, length, top_k), dtype=torch.int32)
        try:
            for start in tqdm(range(0, n, batch_size), desc="teacher cache", disable=disable_progress, leave=False):
                chunk = rows[start:start + batch_size]
                ids, mask = pad_right(chunk, pad_token_id)
                hidden, logits = hidden_and_logits(base, ids.to(device), mask.to(device), need_logits=kind == "topk")
                stop = start + len(chunk)
                width = ids.shape[1]
                if "hidden" in tensors:
                    tensors["hidden"][start:stop, :width] = hidden.to("cpu", dtype)
                if kind == "topk":
                    values, indices = logits.float().topk(top_k, dim=-1)
                    tensors["topk_values"][start:stop, :width] = values.to("cpu", dtype)
                    tensors["topk_indices"][start:stop, :width] = indices.to("cpu", torch.int32)
        finally:
            base.train(was_training)
        meta = {"kind": kind, "num_rows": n, "max_length": length, "top_k": top_k if kind == "topk" else None,
                "dtype": str(dtype).replace("torch.", ""), "fingerprint": token_fingerprint(dataset),
                "teacher": getattr(base.config, "_name_or_path", "") or None, "hidden_size": d,
                "vocab_size": base.get_output_embeddings().weight.shape[0]}
        return cls(tensors, meta)

    def batch(self, index: torch.Tensor, length: int, device=None) -> dict[str, torch.Tensor]:
        """Cached outputs for dataset rows ``index``, cut to ``length`` positions (the batch's padded width)."""
        if length > self.meta["max_length"]:
            raise ValueError(f"Batch width {length} exceeds the cached width {self.meta['max_length']}: the batch "
                             "is not from the dataset this cache was built on.")
        index = index.cpu().long()
        return {k: v[index, :length].to(device) for k, v in self.tensors.items()}

    def check_matches(self, dataset, name: str = "dataset") -> None:
        """Raise unless this cache was built on exactly the token blocks of ``dataset``."""
        if len(dataset) != len(self) or token_fingerprint(dataset) != self.fingerprint:
            raise ValueError(
                f"The teacher cache ({len(self)} rows, fingerprint {self.fingerprint[:12]}) was not built on this "
                f"{name} ({len(dataset)} rows): rebuild it with TeacherCache.build(teacher, <prepared {name}>)."
            )

    def save(self, path: str) -> str:
        """Write ``<path>/teacher_cache.safetensors`` atomically (metadata in the safetensors header)."""
        from safetensors.torch import save

        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, CACHE_FILE)
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        atomic_write_bytes(file, save(tensors, metadata={"post_teacher_cache": json.dumps(self.meta)}))
        return file

    @classmethod
    def load(cls, path: str) -> "TeacherCache":
        from safetensors import safe_open

        file = path if path.endswith(".safetensors") else os.path.join(path, CACHE_FILE)
        with safe_open(file, framework="pt") as f:
            meta = json.loads(f.metadata()["post_teacher_cache"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(tensors, meta)
