"""DP-SGD for a soft prompt, one small function per step of the mechanism.

Per-example gradients come from giving every example its own copy of the prompt: a (B, n, d) leaf built from the
(n, d) parameter. One ordinary backward of the *summed* loss then leaves example i's gradient in row i of the leaf,
exactly, with no hooks. Opacus's grad-sample hooks must not be used on a PEFT prompt: PEFT looks the prompt up once
(batch 1) and repeats it, so Opacus sees a single "sample" holding the summed batch gradient and the clipping, hence
the guarantee, silently fails (see `tests/test_privacy.py`). Opacus supplies what it is good at: Poisson sampling,
`get_noise_multiplier`, the accountants, and its secure-mode noise.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Optional

import torch
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from ..config import validate_privacy_ledger
from ..losses import verbalizer_loss
from ..modeling import label_logits

# Opacus's clipping formula adds this to the norm so a zero gradient does not divide by zero.
CLIP_EPS = 1e-6
ACCOUNTANT_STATE_NAME = "dp_accountant.json"


def per_example_prompts(prompt: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A (B, n, d) leaf holding one independent copy of the (n, d) prompt per example."""
    return prompt.detach().unsqueeze(0).repeat(batch_size, 1, 1).requires_grad_(True)


def per_example_gradients(
    model,
    batch: dict,
    prompt: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-example gradients (B, n, d) of the verbalizer loss w.r.t. the prompt, and the (B,) losses.

    One forward and one backward: the loss is summed, so the gradient of example i lands only in its own copy.
    """
    copies = per_example_prompts(prompt, batch["input_ids"].shape[0])
    logits = label_logits(
        model, batch["input_ids"], batch["attention_mask"], batch["label_positions"], prompt=copies
    )
    losses = verbalizer_loss(logits, batch["labels"], index.to(logits.device), weight.to(logits.device), reduction="none")
    (grads,) = torch.autograd.grad(losses.sum(), copies)
    return grads, losses.detach()


def per_example_norms(grads: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example's whole gradient (all virtual tokens together)."""
    return grads.flatten(1).norm(2, dim=1)


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / (‖g‖ + 1e-6)), Opacus's formula: scales every gradient into the ball of radius C."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def clipped_sum(grads: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Σ_i clip_C(g_i) over the batch dimension; each term has norm ≤ C, so one example moves the sum by ≤ C."""
    factors = clip_factors(per_example_norms(grads), max_grad_norm)
    return torch.einsum("b,b...->...", factors.to(grads.dtype), grads)


def gaussian_noise(
    std: float, reference: torch.Tensor, generator: Optional[torch.Generator] = None, secure_mode: bool = False
) -> torch.Tensor:
    """N(0, std²) noise shaped like `reference`; under `secure_mode` Opacus's floating-point-attack-safe sampler."""
    from opacus.optimizers.optimizer import _generate_noise

    return _generate_noise(std=std, reference=reference, generator=generator, secure_mode=secure_mode)


def privatize(
    summed: torch.Tensor,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: Optional[torch.Generator] = None,
    secure_mode: bool = False,
) -> torch.Tensor:
    """(Σ clipped + N(0, σ²C²I)) / expected batch size: the noisy mean gradient released by one DP-SGD step.

    Dividing by the *expected* batch size (not the sampled one) keeps the batch size itself out of the output.
    """
    noise = gaussian_noise(noise_multiplier * max_grad_norm, summed, generator, secure_mode)
    return (summed + noise) / expected_batch_size


def sample_rate_for(batch_size: int, num_examples: int) -> float:
    """Poisson rate q = expected batch size / N."""
    if num_examples < 1:
        raise ValueError("The training set is empty; DP training needs at least one example.")
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"The expected batch size ({batch_size}) must be between 1 and the number of training examples "
            f"({num_examples}); lower `per_device_train_batch_size`."
        )
    return batch_size / num_examples


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson batches per epoch, as Opacus's sampler draws them: int(1 / q)."""
    return int(1 / sample_rate)


def resolve_delta(target_delta: Optional[float], num_examples: int) -> float:
    """δ, defaulting to 1/N; warns when δ ≥ 1/N (such a δ permits leaking about one whole example)."""
    delta = 1.0 / num_examples if target_delta is None else float(target_delta)
    if delta >= 1.0 / num_examples:
        warnings.warn(
            f"δ = {delta:.3g} is >= 1/N = {1.0 / num_examples:.3g} (N = {num_examples} training examples): the "
            "paper's convention, but an (ε, δ) guarantee with δ this large allows fully leaking about one example "
            "with probability δ·N. Pass DPConfig(target_delta=...) well below 1/N for a stronger guarantee."
        )
    return delta


def resolve_noise_multiplier(
    target_epsilon: Optional[float],
    noise_multiplier: Optional[float],
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    epsilon_tolerance: float = 0.01,
) -> float:
    """σ as given, or the smallest σ (to `epsilon_tolerance`) whose ε after `steps` steps is ≤ `target_epsilon`."""
    if noise_multiplier is not None:
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier=0: no noise is added and the training has no privacy (ε = ∞).")
        return float(noise_multiplier)
    if steps < 1:
        raise ValueError(f"Cannot calibrate noise for {steps} training steps; set max_steps or num_train_epochs > 0.")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=epsilon_tolerance,
        )
    )


def make_accountant(name: str) -> IAccountant:
    return create_accountant(mechanism=name)


def accountant_steps(accountant: IAccountant) -> int:
    return int(sum(steps for _, _, steps in accountant.history))


def accountant_epsilon(accountant: IAccountant, delta: float) -> float:
    """ε spent so far (0 before any step, ∞ if any step had no noise)."""
    if accountant_steps(accountant) == 0:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in accountant.history):
        return math.inf
    return float(accountant.get_epsilon(delta=delta))


def accountant_state(accountant: IAccountant) -> dict:
    """A JSON-ready copy of the accountant's history: everything needed to recompute ε."""
    return {"mechanism": accountant.mechanism(), "history": [list(map(float, h[:2])) + [int(h[2])] for h in accountant.history]}


def load_accountant_state(accountant: IAccountant, state: dict) -> None:
    if not isinstance(state, dict) or state.get("mechanism") != accountant.mechanism():
        found = state.get("mechanism") if isinstance(state, dict) else state
        raise ValueError(
            f"The saved accountant state is for {found!r}, this run uses {accountant.mechanism()!r}; resume with the "
            "same DPConfig.accountant."
        )
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]


def privacy_ledger(
    accountant: IAccountant, delta: float, noise_multiplier: float, max_grad_norm: float, sample_rate: float, **extra
) -> dict:
    """The ledger stored with the prompt: the (ε, δ) guarantee and every input that determines it."""
    ledger = {
        "epsilon": accountant_epsilon(accountant, delta),
        "delta": float(delta),
        "accountant": accountant.mechanism(),
        "noise_multiplier": float(noise_multiplier),
        "max_grad_norm": float(max_grad_norm),
        "sample_rate": float(sample_rate),
        "steps": accountant_steps(accountant),
        **extra,
    }
    if ledger["steps"] > 0:
        validate_privacy_ledger(ledger)
    return ledger


class EmptyBatchCollator:
    """Wraps a collator so an empty Poisson batch becomes a batch of zero rows instead of an error."""

    def __init__(self, collate_fn: Callable, with_labels: bool = True):
        self.collate_fn = collate_fn
        self.with_labels = with_labels

    def __call__(self, rows: list) -> dict:
        if rows:
            return self.collate_fn(rows)
        empty = {
            "input_ids": torch.zeros(0, 1, dtype=torch.long),
            "attention_mask": torch.zeros(0, 1, dtype=torch.long),
            "label_positions": torch.zeros(0, dtype=torch.long),
        }
        if self.with_labels:
            empty["labels"] = torch.zeros(0, dtype=torch.long)
        return empty


def poisson_dataloader(
    dataset,
    sample_rate: float,
    collate_fn: Callable,
    steps: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    **loader_kwargs,
) -> DataLoader:
    """Batches drawn by Opacus's Poisson sampler (each example independently with rate q); empty batches allowed."""
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset), sample_rate=sample_rate, generator=generator, steps=steps
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=EmptyBatchCollator(collate_fn), **loader_kwargs)


def chunks(batch: dict, size: Optional[int]) -> Iterable[dict]:
    """Split a batch into row chunks of at most `size` (all of it when None)."""
    n = batch["input_ids"].shape[0]
    if size is None or n <= size:
        yield batch
        return
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in batch.items()}
