"""`weatherkd prune`: adaptive structured pruning of a trained network into a student
initialisation (Dreaming to Prune, docs/references.md), with torch-pruning's dependency graph (DepGraph).

1. Sensitivity: each prunable channel group (found by DepGraph) is pruned alone by
   ``probe_ratio``; its sensitivity is the output change this causes on calibration inputs
   (dreamed tars keep this data-free) per FLOP it saves. Ranks split the groups between them.
2. Allocation: group ``g`` is pruned by ``min(max_ratio, λ · median(s) / s_g)``, so cheap,
   insensitive groups lose more; ``λ`` is bisected until FLOPs fall by ``flops_reduction``.
3. The pruned network is exported as arch ``pruned`` (``models/pruned.py``) and distilled by
   ``weatherkd distill init=<out_dir>/model`` like any other student.

``out_dir/prune.json`` reports FLOPs and params before and after, and every group's ratio.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import gather_object
from torch import nn

from weatherkd import cost, models
from weatherkd.data.stream import eval_loader, to_device
from weatherkd.placement import make_accelerator
from weatherkd.config import RunConfig
from weatherkd.errors import UserError
from weatherkd.io import atomic_write_json
from weatherkd.logs import get_logger, progress
from weatherkd.models import card, pruned
from weatherkd.models.registry import read_spec

log = get_logger(__name__)

@dataclass
class Config(RunConfig):
    out_dir: str = "runs/prune"
    network: str = ""  # exported network (model directory) to prune
    calib_shards: str = ""  # calibration inputs: a shard set (dreamed tars keep pruning data-free)
    calib_split: str = "train"
    calib_samples: int = 32
    calib_size: int = 64  # inputs are centre-cropped to this
    flops_reduction: float = 0.4  # fraction of FLOPs to remove (measured at flops_size)
    flops_size: int = 256
    probe_ratio: float = 0.5  # each group is pruned by this much alone to measure its sensitivity
    max_ratio: float = 0.8  # no group loses more than this fraction of its channels
    importance: Literal["l1", "l2"] = "l1"  # which channels go, within a group (weight magnitude)
    keep: list[str] = field(default_factory=list)  # globs of layers whose output channels stay (added to defaults)

    def check(self) -> None:
        if not 0 < self.flops_reduction < 1:
            raise UserError(f"flops_reduction must be in (0, 1), got {self.flops_reduction}")
        if not 0 < self.probe_ratio < 1 or not 0 < self.max_ratio < 1:
            raise UserError(f"probe_ratio ({self.probe_ratio}) and max_ratio ({self.max_ratio}) must be in (0, 1)")


class Pruner:
    """DepGraph pruning of one network; every call prunes a fresh copy of the original."""

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device | str = "cpu"):
        self.model, self.cfg, self.device = model.to(device).eval(), cfg, device
        # A model may name the part that is pruned (a bundle's trained net beside a frozen CLIP
        # tower, fed by ``net_inputs``) and the layers whose output channels must stay.
        self.target = getattr(model, "trained_part", None)
        net = getattr(model, self.target) if self.target else model
        self.keep = cfg.keep + list(getattr(net, "prune_keep", ()))
        self.probe_input = torch.rand(1, 3, 64, 64, device=device)
        self.groups = self._pruner(copy.deepcopy(model), {}).groups()
        if not self.groups:
            raise UserError(f"no prunable channel groups in {cfg.network} once {self.keep} are kept")

    def _pruner(self, model: nn.Module, ratios: dict[str, float]) -> "NamedPruner":
        import torch_pruning as tp

        net = getattr(model, self.target) if self.target else model
        args = model.net_inputs(self.probe_input) if self.target else self.probe_input
        named = dict(net.named_modules())
        ignored = [m for n, m in named.items() if any(fnmatch.fnmatch(n, p) for p in self.keep)
                   or (isinstance(m, (nn.Conv2d, nn.Linear)) and _out_channels(m) == 3)]  # image outputs stay
        importance = tp.importance.MagnitudeImportance(p=1 if self.cfg.importance == "l1" else 2)
        unwrapped = [(p, p.dim() - 1) for n, p in net.named_parameters(recurse=False)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch-pruning warns about every unwrapped parameter
            pruner = tp.pruner.MetaPruner(net, args, importance=importance, pruning_ratio=0.0,
                                          pruning_ratio_dict={named[n]: r for n, r in ratios.items()},
                                          ignored_layers=ignored, unwrapped_parameters=unwrapped)
        return NamedPruner(pruner, named)

    def prune(self, ratios: dict[str, float]) -> nn.Module:
        model = copy.deepcopy(self.model)
        self._pruner(model, ratios).pruner.step()
        return model

    def flops(self, model: nn.Module) -> int:
        return cost.flops(model, self.cfg.flops_size, self.device)


class NamedPruner:
    """torch-pruning's pruner for one set of ratios, and the names of the modules it prunes."""

    def __init__(self, pruner, named: dict[str, nn.Module]):
        self.pruner = pruner
        self.names = {m: n for n, m in named.items()}

    def groups(self) -> list[str]:
        """The prunable channel groups, each named by its root layer (the key of a ratio)."""
        p = self.pruner
        found = p.DG.get_all_groups(ignored_layers=p.ignored_layers, root_module_types=p.root_module_types)
        return [self.names[g[0].dep.target.module] for g in found]


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


@torch.no_grad()
def distortion(model: nn.Module, reference: torch.Tensor, inputs: torch.Tensor) -> float:
    """Mean absolute change of the output against the unpruned network's, on the calibration inputs."""
    return float((model(inputs).clamp(0, 1) - reference).abs().mean())


def calibration_inputs(cfg: Config) -> torch.Tensor:
    if not cfg.calib_shards or not Path(cfg.calib_shards).exists():
        raise UserError(f"calib_shards: no such shard set '{cfg.calib_shards}' (dreamed tars work: "
                        "`weatherkd dream` makes them without data)")
    images = []
    for batch in eval_loader(cfg.calib_shards, cfg.calib_split, None, 0, 1, 0, cfg.calib_samples):
        x = to_device(batch, "cpu")["input"]
        h, w = x.shape[-2:]
        if min(h, w) < cfg.calib_size:
            raise UserError(f"calib_size {cfg.calib_size} is larger than a {h}×{w} calibration image")
        top, left = (h - cfg.calib_size) // 2, (w - cfg.calib_size) // 2
        images.append(x[..., top:top + cfg.calib_size, left:left + cfg.calib_size])
    return torch.cat(images)


def allocate(sensitivity: dict[str, float], evaluate, target: float, max_ratio: float,
             steps: int = 30) -> tuple[dict[str, float], float, Any]:
    """Per-group ratios ``min(max_ratio, λ · median(s) / s_g)`` for the smallest ``λ`` whose FLOPs
    reduction reaches ``target``, by bisection (the reduction grows with λ).

    ``evaluate(ratios) -> (reduction, result)`` prunes and measures; the ``result`` returned is
    the one whose reduction was measured at the returned ratios, so what the caller keeps is
    exactly what met the target (re-pruning could round a channel count the other way).
    """
    measurable = [s for s in sensitivity.values() if s > 0]
    mid = statistics.median(measurable) if measurable else 1.0
    floor = mid * 1e-3  # a group whose pruning changed nothing measurable is still not free

    def ratios(lam: float) -> dict[str, float]:
        return {g: min(max_ratio, lam * mid / max(s, floor)) for g, s in sensitivity.items()}

    most, _ = evaluate(ratios(1e9))
    if most < target:
        raise UserError(f"even pruning every group by max_ratio={max_ratio} removes only {most:.1%} of the "
                        f"FLOPs (the rest is in layers that stay whole, e.g. a frozen CLIP tower), short of "
                        f"flops_reduction={target:.0%}: raise max_ratio, keep fewer layers or lower the target")
    lo, hi = 0.0, 1.0
    reached, best = evaluate(ratios(hi))
    while reached < target:
        lo, hi = hi, hi * 2
        reached, best = evaluate(ratios(hi))
    for _ in range(steps):
        lam = (lo + hi) / 2
        reduction, result = evaluate(ratios(lam))
        if reduction >= target:
            hi, best = lam, result
        else:
            lo = lam
    return ratios(hi), hi, best


def run(cfg: Config) -> int:
    if not cfg.network:
        raise UserError("network is not set: give an exported model directory to prune")
    acc = make_accelerator()
    torch.manual_seed(cfg.seed)
    spec = read_spec(cfg.network)
    original = models.load(cfg.network).to(acc.device)
    inputs = calibration_inputs(cfg).to(acc.device)
    pruner = Pruner(original, cfg, acc.device)
    with torch.no_grad():
        reference = original(inputs).clamp(0, 1)
    base_flops = pruner.flops(original)

    # 1. Sensitivity, the groups split across ranks.
    mine = pruner.groups[acc.process_index::acc.num_processes]
    measured = []
    for group in progress(mine, desc="sensitivity", unit="group"):
        probe = pruner.prune({group: cfg.probe_ratio})
        saved = 1 - pruner.flops(probe) / base_flops
        measured.append((group, distortion(probe, reference, inputs), saved))
    measured = gather_object(measured)  # every rank's groups (as it is, in one process)
    per_group = {g: {"distortion": d, "flops_saved": s} for g, d, s in measured}
    sensitivity = {g: v["distortion"] / max(v["flops_saved"], 1e-9) for g, v in per_group.items()}

    # 2. Ratios for the target, measured on each pruned network itself; the one kept is the one
    # measured (every rank computes the same; rank 0 writes).
    def evaluate(ratios: dict[str, float]) -> tuple[float, tuple[nn.Module, int]]:
        candidate = pruner.prune(ratios)
        flops = pruner.flops(candidate)
        return 1 - flops / base_flops, (candidate, flops)

    ratios, lam, (model, after_flops) = allocate(sensitivity, evaluate, cfg.flops_reduction, cfg.max_ratio)
    check = copy.deepcopy(model).train()  # it must still train, not just run (a copy: BN statistics stay)
    check(inputs[:2]).mean().backward()
    report = {
        "network": cfg.network, "flops_size": cfg.flops_size,
        "flops": {"before": base_flops, "after": after_flops, "reduction": 1 - after_flops / base_flops},
        "params": {"before": cost.params(original), "after": cost.params(model)},
        "target_reduction": cfg.flops_reduction, "lambda": lam,
        "distortion": distortion(model, reference, inputs), "calib_samples": int(inputs.shape[0]),
        "groups": {g: {**per_group[g], "sensitivity": sensitivity[g], "ratio": ratios[g]} for g in pruner.groups},
    }
    if acc.is_main_process:
        out = Path(cfg.out_dir)
        model.weatherkd_spec = {"arch": "pruned", "kwargs": pruned.describe(model, spec)}
        extra = {k: spec[k] for k in ("weathers", "random_init") if k in spec}
        models.save(model, out / "model", extra={**extra, "pruned_from": cfg.network,
                                                 "flops_reduction": report["flops"]["reduction"]})
        card.write_at_export(out / "model", "prune", dataclasses.asdict(cfg))
        atomic_write_json(out / "prune.json", report)
        log.info("pruned %s: GFLOPs@%d %.3f -> %.3f (-%.1f%%), params %.3fM -> %.3fM; exported %s", cfg.network,
                 cfg.flops_size, base_flops / 1e9, after_flops / 1e9, 100 * report["flops"]["reduction"],
                 report["params"]["before"] / 1e6, report["params"]["after"] / 1e6, out / "model")
    acc.wait_for_everyone()
    return 0
