"""Placing a process does not fix its precision: a benchmark that places itself (a cache-teacher job) and then
trains in bf16 in the same process must not be refused by accelerate (it was: `bench kd-overhead
train.mixed_precision=bf16` ended in a ValueError traceback)."""

import subprocess
import sys


def test_a_process_that_placed_itself_can_still_train_in_bf16():
    code = ("from weatherkd.placement import make_accelerator, place\n"
            "make_accelerator('bf16')\n"  # the bench's engines' precision, chosen first
            "p = place()\n"  # the cache-teacher job placing itself
            "acc = make_accelerator('bf16')\n"  # an engine in the same process
            "print(p.device, acc.mixed_precision)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "bf16"
