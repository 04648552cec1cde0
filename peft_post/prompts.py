"""Read, write and initialise soft-prompt tensors of PEFT prompt-tuning models."""

from __future__ import annotations

from typing import Optional

import torch

from .modeling import base_model_of, prompt_parameter


def get_prompt(model, adapter_name: Optional[str] = None) -> torch.Tensor:
    """A detached copy of the (n, d) prompt of a prompt-tuning `PeftModel`."""
    return prompt_parameter(model, adapter_name).detach().clone()


def set_prompt(model, prompt: torch.Tensor, adapter_name: Optional[str] = None) -> None:
    """Copy an (n, d) prompt into the adapter of `model`; its shape must match exactly."""
    param = prompt_parameter(model, adapter_name)
    if not isinstance(prompt, torch.Tensor) or tuple(prompt.shape) != tuple(param.shape):
        shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(
            f"Prompt of shape {shape} does not fit this adapter's {tuple(param.shape)} "
            "(num_virtual_tokens, hidden size); build the adapter with matching num_virtual_tokens and model."
        )
    with torch.no_grad():
        param.copy_(prompt.to(device=param.device, dtype=param.dtype))


def prompt_from_text(model, tokenizer, text: str, num_virtual_tokens: int) -> torch.Tensor:
    """The (n, d) prompt PEFT's TEXT init would build: the text's token embeddings, repeated or cut to n."""
    if not text:
        raise ValueError("`text` for a prompt initialisation must be non-empty.")
    if num_virtual_tokens < 1:
        raise ValueError(f"`num_virtual_tokens` must be >= 1, got {num_virtual_tokens}.")
    ids = tokenizer(text)["input_ids"]
    ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]
    embeddings = base_model_of(model).get_input_embeddings()
    with torch.no_grad():
        return embeddings(torch.tensor(ids, device=embeddings.weight.device)).float().clone()


def prompt_norms(prompt: torch.Tensor) -> torch.Tensor:
    """L2 norm of each virtual token, to compare with the norms of real word embeddings."""
    return prompt.detach().float().norm(dim=-1)
