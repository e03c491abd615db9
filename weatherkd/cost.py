"""What a model costs to run: parameters, FLOPs, latency, peak memory.

FLOPs come from ``torch.utils.flop_counter`` (a multiply-add counts as 2 FLOPs), so they cover
matmuls and convolutions, not element-wise ops. Latency and memory are measured on the current
device; compare them only within one run on one machine.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def flops(model: torch.nn.Module, size: int = 256, device="cpu") -> int:
    """Forward FLOPs for one ``size``×``size`` RGB image, in eval mode.

    PyTorch's fused eval-mode attention (``nn.MultiheadAttention``'s fast path, used by the CLIP
    tower) is invisible to the FLOP counter, so it is switched off while counting."""
    x = torch.rand(1, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return counter.get_total_flops()


@torch.no_grad()
def latency_ms(model: torch.nn.Module, size: int = 256, batch: int = 1, repeats: int = 20, warmup: int = 3,
               device="cpu") -> dict:
    """Median and spread of forward wall time, after warm-up, with the device synchronised per call."""
    return timed_ms(model, torch.rand(batch, 3, size, size, device=torch.device(device)), repeats, warmup)


def timed_ms(fn, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> dict:
    """Wall milliseconds of ``fn(x)`` (median, min, max), after ``warmup`` calls, with ``x``'s device
    synchronised after each call: a GPU's queued work is counted where it runs, not where it is queued."""
    for _ in range(warmup):
        fn(x)
    sync(x.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        sync(x.device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": repeats}


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _release_free_heap() -> None:
    """Hand freed heap back to the OS, so memory a forward reuses from the allocator's cache counts."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may then read low
        pass


@torch.no_grad()
def peak_memory_mb(model: torch.nn.Module, size: int = 256, batch: int = 1, device="cpu") -> dict:
    """Peak memory one forward adds on top of what was resident before it.

    CUDA: the caching allocator's peak. CPU: PyTorch keeps no CPU allocator statistics, so this
    resets the process's RSS high-water mark (Linux ``/proc/self/clear_refs``) and reads it back.
    """
    device = torch.device(device)
    x = torch.rand(batch, 3, size, size, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model(x)
        torch.cuda.synchronize(device)
        return {"kind": "cuda_allocated", "mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20}
    try:
        _release_free_heap()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        before = _vm_kb("VmRSS")
        model(x)
        return {"kind": "cpu_rss_high_water", "mb": (_vm_kb("VmHWM") - before) / 1024}
    except OSError:
        return {"kind": "unavailable", "mb": None}


def summary(model: torch.nn.Module, size: int = 256, latency_size: int | None = None, repeats: int = 20,
            device="cpu") -> dict:
    """The cost columns of `weatherkd report`."""
    model = model.to(device).eval()
    lat = latency_ms(model, latency_size or size, repeats=repeats, device=device)
    return {"params": params(model), "gflops": flops(model, size, device) / 1e9, "flops_size": size,
            "latency_ms": lat["median"], "latency_size": latency_size or size, "device": str(device)}


def matmul_peak_flops(device="cpu", dtype=torch.float32, n: int | None = None, repeats: int = 10) -> float:
    """This machine's achievable dense-matmul FLOP/s, measured now: the denominator of MFU.

    Several matmuls per timing on GPU, big enough that launch overhead does not count.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    per_timing = 10 if device.type == "cuda" else 1
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_timing):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / per_timing)
    return 2 * n**3 / best
