"""Where a run stands and what its steps measured: the engine's small records."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Progress:
    """Where training stands: optimizer steps taken and micro-batches consumed (the data position)."""

    def __init__(self):
        self.step = 0
        self.micro = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro = state["step"], state["micro"]


@dataclass
class StepStats:
    """What one optimizer step measured: its losses (means over the micro-batches, still on the
    device), the samples it took, and its seconds waiting for data and in all."""
    losses: dict[str, torch.Tensor]
    samples: int
    data_s: float
    total_s: float


class Window:
    """Steps accumulated between two log lines."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.samples, self.data_s, self.total_s = 0, 0, 0.0, 0.0

    def add(self, stats: StepStats) -> None:
        self.steps += 1
        self.samples += stats.samples
        self.data_s += stats.data_s
        self.total_s += stats.total_s
        for k, v in stats.losses.items():
            self.sums[k] = self.sums.get(k, 0) + v
