"""Preemption: a signal or a stop file asks every rank to checkpoint at the next step boundary.

SLURM sends the pre-termination signal to the batch shell (``--signal=B:USR2@120``);
its trap touches the stop file, because torchrun forwards only INT/TERM/HUP/QUIT to
workers. SIGTERM reaches the workers directly. Either way each rank sets a local
flag, the flags are all-reduced at the step boundary, and all ranks save together.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from weatherkd.errors import EXIT_PREEMPTED, Preempted  # noqa: F401  (the engine's names for them)

STOP_FILE = "STOP"
# A second stop file a launcher can name without knowing out_dir (the SLURM templates use it).
STOP_FILE_ENV = "WEATHERKD_STOP_FILE"


class Preemption:
    def __init__(self, out_dir, signals=(signal.SIGTERM, signal.SIGUSR2)):
        self.stop_files = [Path(out_dir) / STOP_FILE]
        if os.environ.get(STOP_FILE_ENV):
            self.stop_files.append(Path(os.environ[STOP_FILE_ENV]))
        self.local = False
        self.signal_name: str | None = None
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.local = True
        self.signal_name = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """True on every rank if any rank got a signal or sees the stop file (one tiny all-reduce)."""
        local = self.local or any(f.exists() for f in self.stop_files)
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def clear(self) -> None:
        """Remove the stop files so the requeued run does not stop at once."""
        for f in self.stop_files:
            f.unlink(missing_ok=True)
