"""Imported only by the DataLoader forkserver (see ``stream._forkserver``), never by the trainer.

SLURM and torchrun signal a trainer's whole process group, which includes the forkserver. If the
forkserver died on that SIGTERM, the loader workers it forked would see their parent gone and exit,
and the trainer would crash before it could write its preemption checkpoint. The trainer decides
when to stop; the forkserver ends when the trainer does.
"""

import signal

for _sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
    signal.signal(_sig, signal.SIG_IGN)
