"""`weatherkd cache-teacher`: the teacher's outputs computed once, so distillation stops paying for them.

A sharded job on the runner synth and dream share (``stages.job``): output shard ``j`` is input
shard ``j`` of a paired set, every sample kept as it was (input, target, weather, meta) plus
``teacher.png``, the frozen teacher's output on the *whole* input at full resolution, and
``prov.json``. The training loader crops and flips input, target and teacher output together, and
``weatherkd distill`` (kd, dckd) uses the cached output instead of running the teacher. The
manifest records the teacher's hash; distilling from a set taught by another teacher is refused.

Why whole images: a crop of the cached output equals the teacher run on that crop wherever the
teacher's receptive field stays inside the crop; near the crop's edge the cached value is the
better one (the teacher saw real context there, not padding).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from weatherkd import models
from weatherkd.config import ConfigError, RunConfig
from weatherkd.data.check import iter_tar
from weatherkd.data.samples import decode_member, encode_image, image_member, sample_encoding, to_uint8
from weatherkd.data.shards import open_set
from weatherkd.errors import UserError
from weatherkd.logs import get_logger
from weatherkd.models.tiling import default_tiling, tiled
from weatherkd.jobs.runner import ShardedJob, SliceConfig, teacher_hash

log = get_logger(__name__)


@dataclass
class Config(RunConfig):
    out_dir: str = "shards/taught"
    teacher: str = ""  # exported teacher directory
    shards: str = ""  # the paired shard set whose split is taught
    split: str = "train"
    batch_size: int = 16  # images of one size per teacher forward
    slice: SliceConfig = field(default_factory=SliceConfig)

    def check(self) -> None:
        if not self.teacher or not self.shards:
            raise ConfigError("teacher and shards must both be set (an exported teacher, a paired shard set)")


class TeacherCache(ShardedJob):
    stage = "cache-teacher"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        source = open_set(cfg.shards, cfg.split)  # a missing set or split: one line, before anything loads
        self.source = source
        self.inputs = source.shards(cfg.split)
        self.weathers = source.weathers
        self.total = source.count(cfg.split)
        self.has_target = source.has_target(cfg.split)
        super().__init__(cfg.out_dir, 1, cfg.batch_size, cfg.slice,
                         {k: v for k, v in dataclasses.asdict(cfg).items() if k != "slice"})
        self.teacher = models.load(cfg.teacher).to(self.device).eval()
        self.teacher.requires_grad_(False)
        self.teacher_sha256 = teacher_hash(cfg.teacher)  # recorded in the manifest by the job runner
        self.prov = {"teacher": self.teacher_sha256[:16], "source": str(Path(cfg.shards).resolve())}
        self.skipped = 0

    @property
    def n_shards(self) -> int:
        return len(self.inputs)  # one output shard per input shard

    def samples(self, j: int):
        """Input shard ``j``'s samples, each with the teacher's output added; images of one size
        go through the teacher together."""
        raws, images = [], []
        for raw in iter_tar(self.source.dir / self.inputs[j]["file"]):
            try:
                name = image_member(raw, "input")
                images.append(decode_member(name, raw[name]))
                raws.append(raw)
            except Exception as e:  # a corrupt sample is skipped and counted, as the loaders do
                self.skipped += 1
                log.warning("skipped corrupt sample %s in %s: %s", raw.get("__key__"), self.inputs[j]["file"],
                            " ".join(str(e).split())[:120] or type(e).__name__, extra={"all_ranks": True})
        outputs: list[np.ndarray | None] = [None] * len(raws)
        by_size: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(img.shape, []).append(i)
        with torch.no_grad():
            for idx in by_size.values():
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start:start + self.batch_size]
                    x = torch.from_numpy(np.stack([images[i] for i in chunk])).to(self.device)
                    x = x.permute(0, 3, 1, 2).float().div_(255)
                    try:  # whole images, in the model's tiles where they are larger (bounded memory)
                        y = tiled(self.teacher, x, *default_tiling(self.teacher), max_batch=self.batch_size).clamp(0, 1)
                    except torch.OutOfMemoryError:
                        raise UserError(f"out of memory teaching {len(chunk)} images of {x.shape[-2]}x{x.shape[-1]}: "
                                        "lower batch_size") from None
                    for i, out in zip(chunk, y):
                        outputs[i] = to_uint8(out)
        for raw, out in zip(raws, outputs):
            sample = {k: v for k, v in raw.items() if k.split(".", 1)[0] not in ("teacher", "prov")}
            encoding = sample_encoding(raw)  # the cache keeps the set's encoding
            sample[f"teacher.{encoding}"] = encode_image(out, encoding)
            sample["prov.json"] = json.dumps({**self.prov, "key": raw["__key__"]}).encode()
            yield sample

    def run(self) -> dict | None:
        if not self.has_target:
            log.warning("%s/%s has no targets: the taught set distils from the teacher alone", self.cfg.shards,
                        self.cfg.split)
        return super().run()



def run(cfg: Config) -> int:
    if not Path(cfg.teacher).is_dir():
        raise UserError(f"teacher: {cfg.teacher} is not an exported model directory")
    job = TeacherCache(cfg)
    job.run()
    if job.skipped:
        log.warning("skipped %d corrupt samples", job.skipped, extra={"all_ranks": True})
    return 0
