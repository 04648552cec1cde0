"""`PLDAccountant`: an Opacus accountant whose ε comes from `dp_accounting`'s PLD analysis (`accountant.py`).

A module of its own because it subclasses Opacus's `IAccountant`, and importing Opacus takes over a second: the DP
trainer imports it when it is built, so `import peft_post` does not.
"""

from __future__ import annotations

from typing import Optional

from opacus.accountants import IAccountant

from .accountant import REPLACE_ONE, history_epsilon, neighbouring_relation


class PLDAccountant(IAccountant):
    """An Opacus accountant whose ε comes from `dp_accounting`'s PLD analysis, under replace-one adjacency by default.

    The history is Opacus's: a list of (noise_multiplier, sample_rate, steps), consecutive equal steps merged, so
    `state_dict` / `load_state_dict` (inherited) save and restore it, and any PLD implementation can recompute ε from it.
    """

    def __init__(self, adjacency: str = REPLACE_ONE):
        neighbouring_relation(adjacency)  # validates
        self.adjacency = adjacency
        self.history = []

    @classmethod
    def mechanism(cls) -> str:
        return "pld"

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, steps = self.history[-1]
            self.history[-1] = (sigma, q, steps + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def __len__(self) -> int:
        return int(sum(steps for _, _, steps in self.history))

    def get_epsilon(self, delta: float, adjacency: Optional[str] = None) -> float:
        return history_epsilon(self.history, delta, adjacency or self.adjacency)
