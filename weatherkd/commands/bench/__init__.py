"""`weatherkd bench <what>`: benchmarks that print one JSON object on stdout.

Figures are compared within one run (ratios), because the machines are shared and noisy.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import sys
import time

from weatherkd import stages

# name -> module with ``run(argv) -> dict``; each imported only when it runs.
BENCHES = {"loader": "loader", "kd-overhead": "kd_overhead", "model": "model", "step": "step", "synth": "synth",
           "export": "export"}
assert list(BENCHES) == stages.BENCH_NAMES  # the registry lists them for the command line


def bench(name: str):
    """The function that runs benchmark ``name``: ``(argv) -> dict``."""
    return importlib.import_module(f"weatherkd.commands.bench.{BENCHES[name]}").run


def timed_steps(engine, batches, steps: int, window) -> float:
    """Wall seconds of ``steps`` real engine steps, the device synchronised around them; the steps'
    data and step times add up in ``window``."""
    from weatherkd import cost

    cost.sync(engine.acc.device)
    start = time.perf_counter()
    for _ in range(steps):
        window.add(engine.train_step(batches))
    cost.sync(engine.acc.device)
    return time.perf_counter() - start


def run_cli(args) -> int:
    with _stdout_to_stderr():
        result = bench(args.what)(args.rest)
    print(json.dumps(result, indent=2))
    return 0


@contextlib.contextmanager
def _stdout_to_stderr():
    """Keep stdout pure JSON: libraries (DeepSpeed's logger, for one) print there while a bench runs.

    Works at the file-descriptor level, so handlers that captured ``sys.stdout`` earlier and native
    code are redirected too.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        _flush_c_stdio()  # native code's buffered output must land on stderr, before the JSON
        os.dup2(saved, 1)
        os.close(saved)


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
