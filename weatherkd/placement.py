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
    if mixed_precision == "fp16" and cpu:
        # accelerate gives fp16 on the CPU neither autocast nor loss scaling: the trained model
        # would stay fp32 while the frozen helpers, cast to the compute dtype, were fp16.
        raise UserError("train.mixed_precision: fp16 needs a GPU or a DeepSpeed launch (accelerate has no fp16 "
                        "on the CPU); use bf16 or no")
    if mixed_precision == "fp16" and deepspeed and no_gpu and not cpu_runs_fp16():
        # DeepSpeed's CPU accelerator refuses fp16 there, with a traceback from inside its engine
        raise UserError("train.mixed_precision: fp16 under DeepSpeed on a CPU needs oneDNN's fp16 kernels "
                        "(AVX512-FP16 or AMX-FP16), which this CPU lacks; use bf16 or no")
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


def cpu_runs_fp16() -> bool:
    """Whether this CPU has the fp16 kernels DeepSpeed's CPU accelerator requires for fp16."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(acc: Accelerator):
    """Mixed precision for forward passes: ``acc.autocast()``, except under DeepSpeed. There
    accelerate leaves autocast off, because DeepSpeed casts the model itself to 16 bits, so fp32
    batches (and frozen helpers' inputs) would meet 16-bit weights and the first convolution would
    refuse them; torch's autocast casts at each op instead, as it does under DDP."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
    if acc.state.deepspeed_plugin is not None and dtype is not None:
        return torch.autocast(acc.device.type, dtype=dtype)
    return acc.autocast()


# Precision names as configs and flags spell them ("no" is accelerate's mixed_precision for fp32).
DTYPES = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_named(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on a GPU, fp32 on the CPU (where half precision is slower, not faster)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


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
