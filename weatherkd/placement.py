"""One way to put a process on its device: the engine's Accelerator, and every other process
(jobs, commands, benchmarks) through the same accelerate state.

Under ``accelerate launch``/torchrun, rank ``r`` with local rank ``l`` runs on ``cuda:l`` (or the
CPU, meeting the other ranks over gloo); alone, on ``cuda:0`` or the CPU. A SLURM array task is
alone in this sense: it sees the GPUs SLURM gave it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list

from weatherkd import logs
from weatherkd.errors import UserError
from weatherkd.precision import refuse_unrunnable


def make_accelerator(mixed_precision: str | None = "no", grad_accum: int = 1, log_with=None,
                     project_dir: str | None = None) -> Accelerator:
    """An Accelerator that joins the launcher's process group on GPU or CPU alike."""
    no_gpu = not torch.cuda.is_available()
    launched = logs.world_size() > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # Without a GPU, ranks must meet over gloo. Under DDP, cpu=True does that; without it each rank
    # silently believes it is rank 0 of 1. Under DeepSpeed, cpu=True would quietly drop the
    # DeepSpeed plugin (plain multi-CPU data parallel instead of ZeRO), so it stays False and the
    # gloo backend is asked for explicitly; DeepSpeed then runs on its CPU accelerator.
    cpu = no_gpu and not deepspeed
    refuse_unrunnable(mixed_precision, deepspeed, no_gpu)
    if deepspeed:  # the same trap through the environment (accelerate launch --cpu sets it)
        os.environ.pop("ACCELERATE_USE_CPU", None)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if no_gpu and launched else []
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                      log_with=log_with, project_dir=project_dir, kwargs_handlers=handlers)
    if deepspeed and acc.state.deepspeed_plugin is None:
        raise RuntimeError("launched with a DeepSpeed config, but accelerate set DeepSpeed aside")
    return acc


def main_decides(acc: Accelerator, decide, refusal: type[Exception]):
    """``decide()`` on the main process only, its answer on every rank. A UserError or OSError it
    raises reaches every rank too, as a ``refusal`` with the same message: a decision that stops
    rank 0 must stop every rank, at once, before any of them writes anything."""
    answer = [None, None]
    if acc.is_main_process:
        try:
            answer = [decide(), None]
        except (UserError, OSError) as e:
            answer = [None, str(e)]
    answer = broadcast_object_list(answer)  # as it is, in one process
    value, refused = answer
    if refused is not None:
        raise refusal(refused)
    return value


@dataclass(frozen=True)
class Placement:
    """Where this process runs and which part of the work is its own."""

    device: torch.device
    rank: int
    world_size: int
    local_rank: int

    def record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "rank": self.rank, "world_size": self.world_size,
                "local_rank": self.local_rank, "device": str(self.device)}


def place(device: str | None = None) -> Placement:
    """This process's device, rank and world size, as the engine's Accelerator would set them.
    ``device`` overrides the device alone (a benchmark's ``--device``)."""
    # No precision of its own: a process that places itself and then trains (a benchmark) keeps
    # the one its engine asks for, which accelerate lets be set once per process.
    acc = make_accelerator(mixed_precision=None)
    state = acc.state
    return Placement(torch.device(device) if device else acc.device, state.process_index, state.num_processes,
                     state.local_process_index)


def leave_process_group(together: bool) -> None:
    """Leave the launcher's process group, if this process joined one, before the interpreter exits.

    Left to interpreter teardown, gloo's threads can outlive the group and abort a rank whose work
    is done ("terminate called without an active exception", SIGABRT: a launch that succeeded
    exits 1). ``together``: every rank got here, so they first meet, and rank 0, which hosts the
    store, does not go away under the others. After an error only some ranks may get here, so
    they leave without waiting.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if together:
        try:
            dist.barrier()
        except RuntimeError:  # a peer left on an error of its own: nothing left to wait for
            pass
    dist.destroy_process_group()
