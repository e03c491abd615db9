"""Rank-aware logging and progress bars.

Every line carries the rank. Records from non-zero ranks are dropped unless the
caller asks for ``extra={"all_ranks": True}``, so library code can log freely
without N copies of every message on an N-GPU job.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm


# The one place rank and world size are read from the environment: logging needs them before
# accelerate's state exists (and failpoints, the CLI's exit, a launch's first decisions); everything
# after that asks accelerate (``placement.place``).
def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    return rank() == 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = rank()
        return record.rank == 0 or getattr(record, "all_ranks", False)


_CONFIGURED = False


def setup(level: str | int | None = None) -> None:
    """Configure the 'weatherkd' logger once per process."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    level = level or os.environ.get("WEATHERKD_LOG_LEVEL", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    handler.addFilter(_RankFilter())
    root = logging.getLogger("weatherkd")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    setup()
    return logging.getLogger(name if name.startswith("weatherkd") else f"weatherkd.{name}")


def progress(iterable=None, **kwargs):
    """tqdm on the main process only; a silent passthrough elsewhere."""
    kwargs.setdefault("disable", not is_main_process())
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kwargs)
