"""Preemption: a signal or a stop file asks every rank to checkpoint at the next step boundary.

SLURM sends the pre-termination signal to the batch shell (``--signal=B:USR2@120``);
its trap touches the stop file, because torchrun forwards only INT/TERM/HUP/QUIT to
workers. SIGTERM reaches the workers directly. Either way each rank sets a local
flag, the flags are all-reduced at the step boundary, and all ranks save together.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch

# The process exits with this after a preemption checkpoint: EX_TEMPFAIL, "try again later".
# SLURM templates requeue on it; any other non-zero code is a real failure.
EXIT_PREEMPTED = 75
STOP_FILE = "STOP"


class Preemption:
    def __init__(self, out_dir, signals=(signal.SIGTERM, signal.SIGUSR2)):
        self.stop_file = Path(out_dir) / STOP_FILE
        self.local = False
        self.signal_name: str | None = None
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.local = True
        self.signal_name = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """True on every rank if any rank got a signal or sees the stop file (one tiny all-reduce)."""
        local = self.local or self.stop_file.exists()
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def clear(self) -> None:
        """Remove the stop file so the requeued run does not stop at once."""
        self.stop_file.unlink(missing_ok=True)
