"""Non-finite training steps: skipped on the device, counted, and a run that has too many stops.

A step whose loss terms or gradient norm are not finite, on any rank, is skipped by every rank:
the flag is all-reduced on the device and handed to the fused optimizer, which leaves weights,
moments and its step count alone when it is set (as it does for torch's GradScaler). The host never
waits for it inside the step. It reads the counts only where it syncs anyway (the preemption
check, every checkpoint, the export), so every rank sees them at the same step, and a run with
more than ``train.max_nonfinite_steps`` skipped steps stops there, before anything is written.

Where a loss scaler runs (fp16: DeepSpeed's or accelerate's), overflowing gradients are its
business: it skips the step and lowers the scale, and only a non-finite loss counts here. Under
DeepSpeed the engine steps inside ``backward`` and skips non-finite gradients itself (ZeRO's
overflow check); a non-finite loss whose gradients are finite is then counted but not skipped.
"""

from __future__ import annotations

import torch

from weatherkd.errors import UserError

GRAD_NORM = "grad_norm"


class NonFiniteTraining(UserError):
    """Training went non-finite more often than ``train.max_nonfinite_steps`` allows."""


class NonFiniteGuard:
    def __init__(self, device: torch.device, allowed: int, num_processes: int):
        self.device, self.allowed, self.num_processes = device, allowed, num_processes
        self.bad: dict[str, torch.Tensor] = {}  # per loss term (and the gradient norm): this rank's bad steps
        self.skipped = torch.zeros((), device=device)  # steps skipped (or, under DeepSpeed, counted)
        self.first = torch.full((), -1.0, device=device)  # the first of them

    def observe(self, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor | None, step: int) -> torch.Tensor:
        """Record one optimizer step (``step`` counts from 1); return 1.0 on every rank if any rank
        saw a non-finite loss term or gradient norm, else 0.0, on the device."""
        flags = {name: ~torch.isfinite(v.detach()).all() for name, v in losses.items()}
        if grad_norm is not None:
            flags[GRAD_NORM] = ~torch.isfinite(grad_norm.detach())
        for name, flag in flags.items():
            self.bad[name] = self.bad.get(name, torch.zeros((), device=self.device)) + flag
        found = torch.stack(list(flags.values())).any().float()
        if self.num_processes > 1:
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
        self.skipped += found
        # new_full fills on the device: a tensor made from the host's step would copy, and wait
        self.first = torch.where((found > 0) & (self.first < 0), self.first.new_full((), float(step)), self.first)
        return found

    def check(self, where: str) -> None:
        """On every rank, at the same step: stop if more steps went non-finite than allowed. A host sync."""
        skipped = int(self.skipped.item())
        if skipped <= self.allowed:
            return
        names = sorted(self.bad)
        counts = torch.stack([self.bad[n] for n in names]) if names else torch.zeros(0, device=self.device)
        if self.num_processes > 1 and names:
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        terms = [n for n, c in zip(names, counts.tolist()) if c > 0] or ["the weights"]
        raise NonFiniteTraining(
            f"step {int(self.first.item())}: training went non-finite ({', '.join(terms)}); {skipped} step(s) skipped, "
            f"more than train.max_nonfinite_steps={self.allowed}; stopped {where}, nothing written since the last "
            "checkpoint (lower train.lr, set train.grad_clip, or allow a few skipped steps)")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped.item(), "first": self.first.item()}

    def load_state_dict(self, state: dict) -> None:
        self.skipped.fill_(state["skipped"])
        self.first.fill_(state["first"])


def weights_finite(tensors, device: torch.device, num_processes: int) -> bool:
    """True on every rank when every rank's ``tensors`` (its weights, or its ZeRO-3 partitions of
    them) are finite. One all-reduce."""
    bad = torch.zeros((), device=device)
    for t in tensors:
        if t.is_floating_point() and t.numel():
            bad = bad + (~torch.isfinite(t.detach())).any().to(device)
    if num_processes > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bool(bad.item() == 0)


def held_weights(param: torch.Tensor, rank: int) -> torch.Tensor:
    """What this rank holds of a parameter: all of it, or under ZeRO-3 its partition
    (``ds_tensor``) without the padding that rounds the last partition up. DeepSpeed leaves that
    padding uninitialised, so checking it would stop a healthy run at random."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return param
    size = part.ds_numel
    return part.narrow(0, 0, max(0, min(size, param.ds_numel - rank * size)))
