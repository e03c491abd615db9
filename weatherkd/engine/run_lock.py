"""One run per ``out_dir``: a lock held for the life of the run, naming its holder.

The lock is ``out_dir/RUN.lock``: an ``flock`` on the file plus a JSON record of the holder
(host, PID, SLURM job id, start time). On one host the ``flock`` is authoritative: it is released
when the holder dies, however it dies, so a record whose ``flock`` we obtain is a dead run's and
is taken over with a warning. A record from another host cannot be checked from here (and ``flock``
across hosts depends on the filesystem), so it is refused unless it is this same SLURM job, requeued.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from weatherkd.errors import UserError
from weatherkd.logs import get_logger

log = get_logger(__name__)
LOCK_FILE = "RUN.lock"


class RunLocked(UserError):
    """Another run holds this out_dir."""


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) if "started" in holder else "?"
    return f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}{job}, since {since}"


class RunLock:
    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunLocked(f"{self.path.parent} is in use by another run ({_describe(holder)}); "
                                "wait for it, stop it, or pick another out_dir") from None
            # The holder may have released and deleted the file between our open and our flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            self._take_over(_read(fd))
        except RunLocked:
            os.close(fd)
            raise
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        atexit.register(self.release)

    def _take_over(self, holder: dict) -> None:
        if not holder:
            return
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job:
            log.info("taking over %s from an earlier run of this SLURM job %s (a requeue)", self.path, job)
        elif holder.get("host") == socket.gethostname():
            log.warning("taking over %s: its holder (%s) is no longer running", self.path, _describe(holder))
        else:
            raise RunLocked(f"{self.path.parent} is locked by a run on another host ({_describe(holder)}); "
                            f"if that run is gone, delete {self.path}")

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # unlink while still holding the flock, so no one can take the record we leave behind
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 65536, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
