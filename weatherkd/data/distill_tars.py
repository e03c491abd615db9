"""Writing a distillation shard set as independent, resumable slices: shared by `weatherkd synth`
and `weatherkd dream`.

Sample ``k`` of ``total`` goes to shard ``j = k // shard_size``. Task ``t`` of ``T`` writes the
shards with ``j % T == t``, where (t, T) comes from ``slice.index/count`` (the SLURM array
template sets them), else SLURM_ARRAY_TASK_*, else the accelerate rank and world size. Each shard
is written to a temp file and renamed, then its sidecar ``<shard>.json``; a shard with its sidecar
is skipped on rerun. A stage derives every random choice from (seed, k) (``sample_seed``), so a
killed job resumes to a byte-identical set on CPU (GPU kernels that add up in nondeterministic
order make a rewritten shard equivalent, not identical). Whoever finds every sidecar present writes
``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from weatherkd.data.shards import build_manifest, shard_name
from weatherkd.errors import UserError
from weatherkd.io import atomic_write_json, sha256_file
from weatherkd.logs import get_logger, progress

log = get_logger(__name__)
SPLIT, GROUP = "train", "mixed"


@dataclass
class SliceConfig:
    index: int = 0
    count: int = 0  # 0: from SLURM_ARRAY_TASK_* or the accelerate rank/world size


def task_slice(cfg: SliceConfig) -> tuple[int, int]:
    if cfg.count > 0:
        index, count = cfg.index, cfg.count
    elif "SLURM_ARRAY_TASK_ID" in os.environ:
        lo = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - lo
        count = int(os.environ.get("SLURM_ARRAY_TASK_MAX", index)) - lo + 1
    else:
        index, count = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= index < count:
        raise UserError(f"slice.index {index} is outside 0..{count - 1}")
    return index, count


def sample_seed(seed: int, k: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "little") >> 1


class ShardedJob:
    """Subclasses set ``stage``, ``weathers`` and ``total``, and define ``generate(ks) -> samples``."""

    stage = ""
    weathers: list[str]
    total: int

    def __init__(self, out_dir: str, shard_size: int, batch_size: int, slice_cfg: SliceConfig, config: dict):
        self.out = Path(out_dir)
        self.shard_size, self.batch_size = shard_size, batch_size
        self.slice_cfg, self.config = slice_cfg, config

    @property
    def n_shards(self) -> int:
        return -(-self.total // self.shard_size)

    def generate(self, ks: list[int]) -> list[dict]:
        raise NotImplementedError

    def sidecar(self, j: int) -> Path:
        return self.out / f"{shard_name(SPLIT, GROUP, j)}.json"

    def write_shard(self, j: int) -> None:
        final = self.out / shard_name(SPLIT, GROUP, j)
        tmp = self.out / f".{final.name}.tmp"
        ks = range(j * self.shard_size, min((j + 1) * self.shard_size, self.total))
        writer = wds.TarWriter(str(tmp), mtime=0, format=tarfile.USTAR_FORMAT)
        for start in range(ks.start, ks.stop, self.batch_size):
            for sample in self.generate(list(range(start, min(start + self.batch_size, ks.stop)))):
                writer.write(sample)
        writer.close()
        os.replace(tmp, final)
        atomic_write_json(self.sidecar(j), {"file": final.name, "split": SPLIT, "group": GROUP, "count": len(ks),
                                            "sha256": sha256_file(final), "bytes": final.stat().st_size})

    def run(self) -> dict | None:
        index, count = task_slice(self.slice_cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        mine = [j for j in range(self.n_shards) if j % count == index]
        todo = [j for j in mine if not (self.sidecar(j).is_file() and (self.out / shard_name(SPLIT, GROUP, j)).is_file())]
        log.info("%s task %d/%d: %d of its %d shards to write (%d samples in all, %d shards)", self.stage, index,
                 count, len(todo), len(mine), self.total, self.n_shards)
        for j in progress(todo, desc=f"{self.stage} {index}/{count}", unit="shard"):
            self.write_shard(j)
        return self.merge()

    def merge(self) -> dict | None:
        """Write the manifest once every shard's sidecar exists (any task may be the last)."""
        if not all(self.sidecar(j).is_file() for j in range(self.n_shards)):
            return None
        shards = [json.loads(self.sidecar(j).read_text()) for j in range(self.n_shards)]
        manifest = build_manifest(shards, self.weathers, {SPLIT: False}, {"stage": self.stage, "config": self.config})
        manifest.pop("created", None)  # identical whichever task merges, and on every rerun
        manifest["created_by"].pop("argv", None)
        atomic_write_json(self.out / "manifest.json", manifest)
        log.info("%s: all %d shards present, wrote %s", self.stage, self.n_shards, self.out / "manifest.json")
        return manifest
