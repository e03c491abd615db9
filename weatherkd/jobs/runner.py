"""The job runner that sharded generation jobs (``weatherkd synth``, ``weatherkd dream``) share.

A job splits its samples into shards; task ``t`` of ``T`` writes the shards with ``j % T == t``,
where (t, T) comes from ``slice.index/count`` (the SLURM array template sets them), else
SLURM_ARRAY_TASK_*, else the process's rank and world size under ``accelerate launch``. Finished
shards are skipped on rerun. A job derives every random choice from (seed, k) (``sample_seed``), so
a killed job resumes to a byte-identical set on CPU (GPU kernels that add up in nondeterministic
order make a rewritten shard equivalent, not identical). Each task records where it ran in
``tasks/task-<t>-of-<T>.json``. Shard writing and the manifest: ``weatherkd.data.distill_tars``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from weatherkd.data import distill_tars
from weatherkd.errors import UserError
from weatherkd.data.shards import open_set
from weatherkd.io import atomic_write_json, sha256_file
from weatherkd import models
from weatherkd.models.registry import WEIGHTS
from weatherkd.logs import get_logger, progress
from weatherkd.placement import Placement, place

log = get_logger(__name__)


@dataclass
class SliceConfig:
    index: int = 0
    count: int = 0  # 0: from SLURM_ARRAY_TASK_* or the accelerate rank/world size


def task_slice(cfg: SliceConfig, placement: Placement) -> tuple[int, int]:
    if cfg.count > 0:
        index, count = cfg.index, cfg.count
    elif "SLURM_ARRAY_TASK_ID" in os.environ:
        lo = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - lo
        count = int(os.environ.get("SLURM_ARRAY_TASK_MAX", index)) - lo + 1
    else:
        index, count = placement.rank, placement.world_size
    if not 0 <= index < count:
        raise UserError(f"slice.index {index} is outside 0..{count - 1}")
    return index, count


def teacher_hash(teacher_dir) -> str:
    """What a set of cached teacher outputs is bound to: the teacher's weights file, verified."""
    recorded = (models.verify(teacher_dir).get("files") or {}).get(WEIGHTS)
    return recorded["sha256"] if recorded else sha256_file(Path(teacher_dir) / WEIGHTS)


def check_taught_by(shards, teacher) -> bool:
    """Whether ``shards`` holds cached outputs of ``teacher``: True when they were taught by it,
    False when it has none; a set taught (or dreamed, or synthesised) by another teacher is an error."""
    if not shards or not (Path(shards) / "manifest.json").is_file():
        return False  # no set (yet): the loader names what is missing when it opens it
    manifest = open_set(shards).manifest
    recorded = manifest.get("created_by", {}).get("teacher_sha256")
    if not recorded:
        return False
    if teacher and recorded != teacher_hash(teacher):
        raise UserError(f"{shards} holds the outputs of another teacher (sha256 {recorded[:12]}…), not of "
                        f"{teacher}: cache this teacher on the set again (weatherkd cache-teacher), or distil from the one that made it")
    return True


def sample_seed(seed: int, k: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "little") >> 1


class ShardedJob:
    """Subclasses set ``stage``, ``weathers`` and ``total``, and define ``generate(ks) -> samples``
    on ``self.device`` (or override ``samples(j)``, shard by shard). A job whose samples carry a
    teacher's outputs sets ``teacher_sha256``: the manifest records it, and distillation refuses
    the set for any other teacher. ``has_target``: its samples keep their clean targets."""

    stage = ""
    weathers: list[str]
    total: int
    teacher_sha256: str | None = None
    has_target: bool = False

    def __init__(self, out_dir: str, shard_size: int, batch_size: int, slice_cfg: SliceConfig, config: dict):
        self.out = Path(out_dir)
        self.shard_size, self.batch_size = shard_size, batch_size
        self.slice_cfg, self.config = slice_cfg, config
        self.placement = place()
        self.device = self.placement.device

    @property
    def n_shards(self) -> int:
        return -(-self.total // self.shard_size)

    def generate(self, ks: list[int]) -> list[dict]:
        raise NotImplementedError

    def samples(self, j: int):
        ks = range(j * self.shard_size, min((j + 1) * self.shard_size, self.total))
        for start in range(ks.start, ks.stop, self.batch_size):
            yield from self.generate(list(range(start, min(start + self.batch_size, ks.stop))))

    def _same_teacher_as_before(self) -> None:
        """A rerun keeps the shards already written, so they must come from the same teacher."""
        for task in sorted((self.out / "tasks").glob("task-*.json")) if (self.out / "tasks").is_dir() else []:
            before = json.loads(task.read_text()).get("teacher_sha256")
            if before != self.teacher_sha256:
                raise UserError(f"{self.out} holds shards made with another teacher ({(before or 'none')[:12]}, "
                                f"now {(self.teacher_sha256 or 'none')[:12]}); write to a new out_dir")

    def run(self) -> dict | None:
        index, count = task_slice(self.slice_cfg, self.placement)
        self.out.mkdir(parents=True, exist_ok=True)
        self._same_teacher_as_before()
        mine = [j for j in range(self.n_shards) if j % count == index]
        todo = [j for j in mine if not distill_tars.is_done(self.out, j)]
        log.info("%s task %d/%d: %d of its %d shards to write (%d samples in all, %d shards), on %s", self.stage,
                 index, count, len(todo), len(mine), self.total, self.n_shards, self.device)
        record = {**self.placement.record(), "task": index, "tasks": count, "shards": todo, "started": time.time(),
                  "teacher_sha256": self.teacher_sha256}
        atomic_write_json(self.out / "tasks" / f"task-{index}-of-{count}.json", record)
        for j in progress(todo, desc=f"{self.stage} {index}/{count}", unit="shard"):
            distill_tars.write_shard(self.out, j, self.samples(j))
        atomic_write_json(self.out / "tasks" / f"task-{index}-of-{count}.json", {**record, "finished": time.time()})
        creator = {"stage": self.stage, "config": self.config}
        if self.teacher_sha256:
            creator["teacher_sha256"] = self.teacher_sha256
        return distill_tars.merge(self.out, self.n_shards, self.weathers, creator, self.has_target)
