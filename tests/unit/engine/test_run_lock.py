"""The out_dir lock, in process: records from other hosts, SLURM requeues, release."""

import json
import os
import time

import pytest

from weatherkd.engine.run_lock import LOCK_FILE, RunLock, RunLocked


def test_lock_records_from_other_hosts_and_slurm_requeues(tmp_path, monkeypatch):
    record = {"host": "node-elsewhere", "pid": 4242, "slurm_job_id": "777", "started": time.time()}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunLocked, match="PID 4242 on node-elsewhere, SLURM job 777"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the same job, requeued onto another node
    lock = RunLock(tmp_path)
    lock.acquire()
    mine = json.loads((tmp_path / LOCK_FILE).read_text())
    assert mine["pid"] == os.getpid() and mine["slurm_job_id"] == "777"
    with pytest.raises(RunLocked, match=f"in use by another run \\(PID {os.getpid()}"):
        RunLock(tmp_path).acquire()  # held: even this process cannot take it twice
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
