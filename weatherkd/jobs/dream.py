"""`weatherkd dream`: data-free distillation inputs by inverting the teacher (Dreaming to Prune).

Each batch starts from noise or a smooth random field and is optimised (Adam, pixels in [0, 1])
so that the teacher's internal feature statistics match those recorded from it:
- the statistics: the per-layer statistics recorded at the teacher's export
  (``feature_stats.safetensors``, per weather where recorded; the transformer teacher has them), or
  else the running mean/variance of its BatchNorm layers;
- diversity: an orthogonality penalty on deep features across the batch;
- weather: sample ``k`` dreams weather ``k % W``; it matches that weather's statistics and, when
  the teacher carries its weather classifier, is pushed to be classified as it;
- image priors: total variation and L2, with random jitter and flips every iteration.

Output is a distillation set: ``input.png`` (the dreamed image), ``teacher.png`` (the teacher's
restoration: the only target there is) and ``prov.json``. Sharding, SLURM array slices, atomic
writes and resume: the job runner, ``weatherkd.jobs.runner``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from weatherkd import models
from weatherkd.jobs.runner import ShardedJob, SliceConfig, sample_seed, teacher_hash
from weatherkd.data.samples import encode_sample, to_uint8
from weatherkd.config import RunConfig
from weatherkd.errors import UserError
from weatherkd.logs import get_logger
from weatherkd.losses import inversion as I
from weatherkd.models import feature_stats

log = get_logger(__name__)


@dataclass
class PriorConfig:
    w_tv: float = 1.0
    w_l2: float = 0.0
    jitter: int = 4  # pixels: the batch is rolled by up to this much each iteration
    flip: bool = True  # and flipped left-right half of the time


@dataclass
class Config(RunConfig):
    out_dir: str = "shards/dream"
    teacher: str = ""  # exported teacher directory
    samples: int = 256  # images to dream in all
    weathers: list[str] = field(default_factory=list)  # default: every weather the teacher knows
    size: int = 64
    batch_size: int = 16  # the orthogonality term works across a batch
    shard_size: int = 64
    iterations: int = 200
    lr: float = 0.02
    init: Literal["noise", "smooth"] = "smooth"  # smooth: upsampled coarse noise, closer to a photo
    stats: Literal["auto", "recorded", "batchnorm"] = "auto"  # auto: recorded if exported, else BatchNorm
    layers: list[str] = field(default_factory=lambda: ["*"])  # globs over the layers that have statistics
    per_weather: bool = True  # match each weather's own statistics where the teacher recorded them
    w_stats: float = 1.0
    first_layer_weight: float = 10.0  # DeepInversion weights the first layer up: it fixes colours and contrast
    w_ortho: float = 1.0
    ortho_layer: str = ""  # deep features for the orthogonality term; "": the tapped layer with fewest positions
    w_weather: float = 0.1  # cross-entropy of the teacher's weather classifier to the dreamed weather
    priors: PriorConfig = field(default_factory=PriorConfig)
    slice: SliceConfig = field(default_factory=SliceConfig)


def load_targets(cfg: Config, teacher: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The statistics to match (feature_stats layout) and where they came from."""
    recorded = (Path(cfg.teacher) / feature_stats.STATS_FILE).is_file()
    if cfg.stats == "recorded" or (cfg.stats == "auto" and recorded):
        if not recorded:
            raise UserError(f"stats: recorded, but {cfg.teacher} has no {feature_stats.STATS_FILE}; the teacher "
                            "stage writes it at export (stats.batches > 0)")
        return feature_stats.load(cfg.teacher)[0], "recorded"
    stats = feature_stats.batchnorm_stats(teacher)
    if not stats and cfg.stats == "batchnorm":
        raise UserError(f"stats: batchnorm, but {cfg.teacher} has no BatchNorm layers; use stats: auto")
    if not stats:
        raise UserError(f"{cfg.teacher} has no BatchNorm layers and no recorded {feature_stats.STATS_FILE}: there "
                        "are no statistics to invert towards. Re-export the teacher with `weatherkd teacher` "
                        "(it records them), or dream from a BatchNorm network.")
    norms, batchnorms = feature_stats.select_layers(teacher), feature_stats.layers_in(stats)
    if cfg.stats == "auto" and len(batchnorms) < len(norms):
        # A transformer teacher with BatchNorm in its decoder only: its BN statistics say nothing
        # about the encoder, and dreams matched to them alone would not be what it was trained on.
        raise UserError(f"{cfg.teacher} has BatchNorm in {len(batchnorms)} of its {len(norms)} normalisation layers "
                        f"and no recorded {feature_stats.STATS_FILE}; re-export it with `weatherkd teacher` "
                        "(stats.batches > 0), or set stats: batchnorm to invert towards those layers alone")
    return stats, "batchnorm"


class Dreamer(ShardedJob):
    stage = "dream"

    def __init__(self, cfg: Config):
        super().__init__(cfg.out_dir, cfg.shard_size, cfg.batch_size, cfg.slice,
                         {k: v for k, v in dataclasses.asdict(cfg).items() if k != "slice"})
        self.cfg = cfg
        if not cfg.teacher:
            raise UserError("teacher is not set: give an exported teacher directory")
        self.teacher = models.load(cfg.teacher).to(self.device).eval().requires_grad_(False)
        targets, source = load_targets(cfg, self.teacher)
        self.targets = {k: v.to(self.device) for k, v in targets.items()}
        known = models.registry.read_spec(cfg.teacher).get("weathers") or getattr(self.teacher, "weathers", [])
        self.weathers = cfg.weathers or list(known)
        if not self.weathers:
            raise UserError(f"{cfg.teacher} does not say which weathers it knows; set weathers: [...]")
        self.total = cfg.samples
        self.layers = [n for n in feature_stats.layers_in(self.targets)
                       if any(fnmatch.fnmatch(n, p) for p in cfg.layers)]
        if not self.layers:
            raise UserError(f"layers {cfg.layers} match none of the teacher's {len(feature_stats.layers_in(self.targets))} "
                            f"layers with statistics (e.g. {feature_stats.layers_in(self.targets)[:3]})")
        classes = getattr(self.teacher, "weathers", [])  # what the teacher's own weather classifier knows
        self.classifier = [classes.index(w) if w in classes else None for w in self.weathers]
        if cfg.w_weather and not any(c is not None for c in self.classifier):
            log.warning("the teacher has no weather classifier for %s: weather comes from statistics alone",
                        self.weathers)
        extra = [cfg.ortho_layer] if cfg.ortho_layer and cfg.ortho_layer not in self.layers else []
        self.taps = feature_stats.Taps(self.teacher, self.layers + extra)
        self.order, self.ortho_layer = self._probe()
        # DeepInversion weights the first layer up. For the CLIP-guided teacher that is the
        # restoration net's first layer, not the frozen CLIP tower's (which runs first).
        target = getattr(self.teacher, "trained_part", None)  # the trained part of a bundle with a frozen tower
        net_layers = [n for n in self.order if n.startswith(f"{target}.")] if target else []
        self.first_layer = (net_layers or self.order)[0]
        self.teacher_sha256 = teacher_hash(cfg.teacher)  # its teacher.png are this teacher's
        self.prov = {"teacher": self.teacher_sha256[:16], "stats": source,
                     "iterations": cfg.iterations, "size": cfg.size, "init": cfg.init, "w_ortho": cfg.w_ortho}
        log.info("dream: %d layers with %s statistics, deep features at %s, weathers %s", len(self.layers), source,
                 self.ortho_layer, self.weathers)

    def _probe(self) -> tuple[list[str], str]:
        """The tapped layers in execution order, and the deep layer the orthogonality term reads."""
        with torch.no_grad():
            self.forward(torch.full((2, 3, self.cfg.size, self.cfg.size), 0.5, device=self.device))
        order = [n for n in self.taps.order if n in self.layers]
        if not order:
            raise UserError(f"none of the layers {self.layers[:3]}... runs in the teacher's forward; check `layers`")
        if self.cfg.ortho_layer:
            if self.cfg.ortho_layer not in self.taps.features:
                raise UserError(f"ortho_layer '{self.cfg.ortho_layer}' does not run in the teacher's forward")
            return order, self.cfg.ortho_layer
        positions = {n: self.taps.features[n][0].numel() // self.taps.features[n].shape[self.taps.dims[n]]
                     for n in order}
        fewest = min(positions.values())
        return order, [n for n in order if positions[n] == fewest][-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.taps.clear()
        if hasattr(self.teacher, "forward_with_weather"):  # through the CLIP tower too, with the weather logits
            return self.teacher.forward_with_weather(x)
        return self.teacher(x), None

    # -- one batch -----------------------------------------------------------------------

    def initial(self, ks: list[int]) -> torch.Tensor:
        cfg, images = self.cfg, []
        for k in ks:
            g = torch.Generator().manual_seed(sample_seed(cfg.seed, k))
            if cfg.init == "noise":
                images.append((0.5 + 0.2 * torch.randn(3, cfg.size, cfg.size, generator=g)).clamp(0, 1))
            else:  # a coarse random field, upsampled: smooth shading, like the low frequencies of a photo
                coarse = torch.rand(1, 3, max(2, cfg.size // 16), max(2, cfg.size // 16), generator=g)
                smooth = F.interpolate(coarse, size=(cfg.size, cfg.size), mode="bicubic", align_corners=False)[0]
                images.append((0.2 + 0.6 * smooth + 0.02 * torch.randn(3, cfg.size, cfg.size, generator=g)).clamp(0, 1))
        return torch.stack(images).to(self.device)

    def dream(self, ks: list[int]) -> tuple[torch.Tensor, list[float], dict[str, float]]:
        """Optimise the batch for samples ``ks``: (images, total loss per iteration, last terms)."""
        cfg, p = self.cfg, self.cfg.priors
        # Everything per batch that needs the host is settled here: the loop below never syncs.
        weather = torch.tensor([k % len(self.weathers) for k in ks], device=self.device)
        groups = self.batch_groups(weather)
        classes = self.classifier_targets(ks)
        x = self.initial(ks).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
        g = torch.Generator().manual_seed(sample_seed(cfg.seed, -1 - ks[0]))  # jitter and flips, reproducibly
        history, terms = [], {}
        for _ in range(cfg.iterations):
            view = x
            if p.jitter:
                dy, dx = torch.randint(-p.jitter, p.jitter + 1, (2,), generator=g).tolist()
                view = torch.roll(view, shifts=(dy, dx), dims=(2, 3))
            if p.flip and torch.rand((), generator=g) < 0.5:
                view = view.flip(3)
            _, logits = self.forward(view)
            terms = {"stats": cfg.w_stats * self.stats_loss(groups), "tv": p.w_tv * I.total_variation(x),
                     "l2": p.w_l2 * I.l2_prior(x)}
            if cfg.w_ortho:
                terms["ortho"] = cfg.w_ortho * I.orthogonality(self.taps.features[self.ortho_layer])
            if cfg.w_weather and logits is not None and classes is not None:
                terms["weather"] = cfg.w_weather * F.cross_entropy(logits.float(), classes, ignore_index=-100)
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            history.append(loss.detach())
        history = torch.stack(history).tolist() if history else []
        return x.detach(), history, {k: float(v.detach()) for k, v in terms.items()}

    def stat_groups(self, weather: torch.Tensor) -> list[tuple[str, torch.Tensor | None]]:
        """(statistics group, the batch rows matched to it; None: all): each weather's rows to its own
        statistics where the teacher recorded them, every other row together to the overall ones."""
        if not self.cfg.per_weather:
            return [(feature_stats.ALL, None)]
        weather = weather.cpu()
        groups, rest = [], torch.zeros_like(weather, dtype=torch.bool)
        for w in weather.unique().tolist():
            if f"{self.weathers[w]}/{self.order[0]}/mean" in self.targets:
                groups.append((self.weathers[w], weather == w))
            else:
                rest |= weather == w
        if rest.all():
            return [(feature_stats.ALL, None)]
        return groups + ([(feature_stats.ALL, rest)] if rest.any() else [])

    def batch_groups(self, weather: torch.Tensor) -> list[tuple[str, torch.Tensor | None, float]]:
        """``stat_groups`` as (group, row indices on the device, share of the batch): indexing with
        them inside the loop needs no host sync, unlike a boolean mask."""
        return [(group, None if rows is None else rows.nonzero().squeeze(1).to(self.device),
                 1.0 if rows is None else float(rows.float().mean())) for group, rows in self.stat_groups(weather)]

    def stats_loss(self, groups: list[tuple[str, torch.Tensor | None, float]]) -> torch.Tensor:
        total = 0.0
        for name in self.order:
            feats, dim = self.taps.features[name], self.taps.dims[name]
            scale = self.cfg.first_layer_weight if name == self.first_layer else 1.0
            for group, rows, share in groups:
                f = feats if rows is None else feats.index_select(0, rows)
                mean, var = self.targets[f"{group}/{name}/mean"], self.targets[f"{group}/{name}/var"]
                total = total + scale * share * I.statistics(f, mean, var, dim)
        return total / len(self.order)

    def classifier_targets(self, ks: list[int]) -> torch.Tensor | None:
        """The teacher's class index of each sample's weather (-100: one it cannot classify)."""
        targets = [self.classifier[k % len(self.weathers)] for k in ks]
        if all(t is None for t in targets):
            return None
        return torch.tensor([-100 if t is None else t for t in targets], device=self.device)

    def generate(self, ks: list[int]) -> list[dict]:
        x, history, terms = self.dream(ks)
        with torch.no_grad():
            restored = self.teacher(x).clamp(0, 1)
        samples = []
        for i, k in enumerate(ks):
            w = k % len(self.weathers)
            prov = {**self.prov, "seed": sample_seed(self.cfg.seed, k), "weather": self.weathers[w],
                    "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None,
                    "terms": terms}
            samples.append(encode_sample(f"dream_{k:08d}", to_uint8(x[i]), w, {"source": "dream"},
                                         teacher=to_uint8(restored[i]), prov=prov))
        return samples




def run(cfg: Config) -> int:
    Dreamer(cfg).run()
    return 0
