"""Named moments at which a fault-injection test hard-kills a whole run.

``WEATHERKD_FAILPOINT=NAME:STEP`` (e.g. ``checkpoint.state_written:4``): when rank 0 reaches
``NAME`` at optimizer step ``STEP``, it SIGKILLs the launcher and every process under it, itself
last, as a node that loses power would. Nothing gets to clean up. ``NAME:STEP:raise``: rank 0
raises there instead, as a bug would. Unset, a failpoint is one dictionary lookup. The points:
``train.step`` (after an optimizer step), ``checkpoint.state_written`` (every rank's state is on
disk, the manifest is not), ``checkpoint.renamed`` (the checkpoint has its final name, ``latest``
still names the previous one). ``train.loss:STEP:nan`` makes the last rank's loss NaN at
optimizer step ``STEP`` (counted from 1), for the non-finite guard's tests: a fault on a rank that
is not rank 0.
"""

from __future__ import annotations

import os
import signal

from weatherkd import logs

ENV = "WEATHERKD_FAILPOINT"


def reached(name: str, step: int) -> None:
    want = os.environ.get(ENV)
    if not want or logs.rank() != 0:
        return
    if want == f"{name}:{step}:raise":  # a bug instead: rank 0 raises, the others carry on
        raise RuntimeError(f"failpoint {name} at step {step}")
    if want != f"{name}:{step}":
        return
    import psutil

    me = psutil.Process()
    # Under a launcher (torchrun/accelerate), the parent is the agent that would restart or
    # clean up; it goes first, then every worker it started.
    root = me.parent() if "LOCAL_RANK" in os.environ else me
    victims = [p for p in [root, *root.children(recursive=True)] if p.pid != me.pid]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def poisoned(name: str, step: int) -> bool:
    """True on the last rank when ``WEATHERKD_FAILPOINT`` is ``NAME:STEP:nan``."""
    want = os.environ.get(ENV)
    if not want or want != f"{name}:{step}:nan":
        return False
    return logs.rank() == logs.world_size() - 1
