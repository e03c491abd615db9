"""Per-layer feature statistics: the targets `weatherkd dream` inverts a teacher towards.

A BatchNorm layer carries them already (running mean and variance of its input). A transformer
teacher has none, so the teacher stage records them once, at export, on its training data: the
per-channel mean and variance of the input to every normalisation layer (where a BatchNorm would
sit), over all samples and per weather. They are stored next to the weights as
``feature_stats.safetensors``; tensor ``"{group}/{layer}/{mean|var}"`` with group ``all`` or a
weather name.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from weatherkd.errors import UserError
from weatherkd.io import atomic_path
from weatherkd.models import registry

STATS_FILE = "feature_stats.safetensors"
ALL = "all"
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_NORMS = (nn.LayerNorm, nn.GroupNorm, *_BN)


def channel_dim(module: nn.Module) -> int:
    """Where a layer's input keeps its channels: last for LayerNorm and Linear (token sequences,
    channels-last maps), dim 1 for convolutions, BatchNorm and GroupNorm."""
    return -1 if isinstance(module, (nn.LayerNorm, nn.Linear)) else 1


def channel_moments(x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance over every other dimension; channels are ``dim``."""
    x = x.float().movedim(dim, 0).flatten(1)  # (C, positions)
    return x.mean(1), x.var(1, unbiased=False)


def select_layers(model: nn.Module, patterns: Iterable[str] = ("*",)) -> list[str]:
    """Module names, in module order, that a glob in ``patterns`` matches: normalisation layers,
    plus any other module a pattern names exactly (e.g. ``net.head.2`` for a full-resolution conv)."""
    patterns = list(patterns)
    return [n for n, m in model.named_modules() if n and (n in patterns or (
        isinstance(m, _NORMS) and any(fnmatch.fnmatch(n, p) for p in patterns)))]


class Taps:
    """Captures the input of each named module on every forward (kept with its autograd graph).
    A module called more than once per forward keeps its last input."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise UserError(f"no such layers in the model: {', '.join(missing[:5])}")
        self.features: dict[str, torch.Tensor] = {}
        self.dims = {n: channel_dim(modules[n]) for n in names}
        self.order: list[str] = []  # execution order of the last forward
        self.handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Callable:
        def hook(module, args):
            if name not in self.features:
                self.order.append(name)
            self.features[name] = args[0]

        return hook

    def clear(self) -> None:
        self.features, self.order = {}, []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self) -> "Taps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def record(model: nn.Module, batches: Iterable[dict], weathers: list[str], layers: Iterable[str] = ("*",),
           all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Mean and variance of each matched layer's input over ``batches``, overall and per weather.

    Per channel, (count, Σx, Σx²) accumulate in float64, so the result is exact over every sample
    seen whatever the batch sizes; ``all_reduce`` sums them across ranks.
    """
    names = select_layers(model, layers)
    if not names:
        raise UserError(f"no layers match {list(layers)} (globs match normalisation layers; other modules by exact name)")
    modules = dict(model.named_modules())
    groups = [ALL, *weathers]
    sums = {(g, n): torch.zeros(1 + 2 * _channels(modules[n]), dtype=torch.float64) for g in groups for n in names}
    ran: set[str] = set()  # a matched layer the forward never calls (e.g. an unused head) has no statistics
    with Taps(model, names) as taps:
        for batch in batches:
            taps.clear()
            model(batch["input"])
            weather = batch["weather"].cpu()
            ran.update(taps.order)
            for n in taps.order:
                per_sample = _per_sample_sums(taps.features[n], taps.dims[n]).cpu()
                sums[(ALL, n)] += per_sample.sum(0)
                for i, w in enumerate(weathers):
                    sums[(w, n)] += per_sample[weather == i].sum(0)
    if all_reduce is not None:  # one collective for everything, in the same key order on every rank
        flat = all_reduce(torch.cat(list(sums.values())))
        sums = dict(zip(sums, flat.split([v.numel() for v in sums.values()])))
    out = {}
    for (g, n), packed in sums.items():
        count, c = packed[0], (packed.numel() - 1) // 2
        if count == 0 or n not in ran:
            continue  # a weather this data never showed, or a layer that never ran
        mean = packed[1:1 + c] / count
        out[f"{g}/{n}/mean"] = mean.float()
        out[f"{g}/{n}/var"] = (packed[1 + c:] / count - mean.pow(2)).clamp_min(0).float()
    return out


def _per_sample_sums(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, 1 + 2C): positions, Σx and Σx² per channel (dim ``dim``), for each sample."""
    x = x.double().movedim(dim, -1)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    count = torch.full((x.shape[0], 1), float(x.shape[1]), dtype=torch.float64, device=x.device)
    return torch.cat([count, x.sum(1), x.pow(2).sum(1)], 1)


def _channels(module: nn.Module) -> int:
    """Channels of the module's input."""
    for attr in ("num_features", "num_channels", "in_channels", "in_features"):
        if hasattr(module, attr):
            return getattr(module, attr)
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    raise UserError(f"cannot tell the input channels of a {type(module).__name__}; pick a conv, linear or norm layer")


def save(stats: dict[str, torch.Tensor], model_dir, meta: dict) -> Path:
    path = Path(model_dir) / STATS_FILE
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in meta.items()})
    registry.record_file(model_dir, STATS_FILE)
    return path


def load(model_dir) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(model_dir) / STATS_FILE
    if not path.is_file():
        raise UserError(f"{model_dir} has no {STATS_FILE}")
    registry.verify(model_dir)
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return load_file(str(path)), meta


def batchnorm_stats(model: nn.Module, patterns: Iterable[str] = ("*",)) -> dict[str, torch.Tensor]:
    """The running statistics of every matched BatchNorm layer, in the same layout as ``record``."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _BN) and m.track_running_stats and any(fnmatch.fnmatch(name, p) for p in patterns):
            out[f"{ALL}/{name}/mean"] = m.running_mean.detach().float().clone()
            out[f"{ALL}/{name}/var"] = m.running_var.detach().float().clone()
    return out


def layers_in(stats: dict[str, torch.Tensor], group: str = ALL) -> list[str]:
    return list(dict.fromkeys(k.split("/", 1)[1].rsplit("/", 1)[0] for k in stats if k.startswith(f"{group}/")))
