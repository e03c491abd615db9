"""Distillation shard sets written shard by shard, so that independent tasks can share one set.

Sample ``k`` goes to shard ``j = k // shard_size``. Each shard is written to a temp file and
renamed, then its sidecar ``<shard>.json`` (count, sha256, bytes); a shard with its sidecar is
done. Whoever finds every sidecar present writes ``manifest.json``. Which task writes which shard
is the job runner's business (``weatherkd.jobs.runner``).
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Iterable

import webdataset as wds

from weatherkd.data.samples import sample_encoding
from weatherkd.data.shards import build_manifest, shard_name
from weatherkd.errors import UserError
from weatherkd.io import atomic_write_json, sha256_file
from weatherkd.logs import get_logger

log = get_logger(__name__)
SPLIT, GROUP = "train", "mixed"


def shard_path(out: Path, j: int) -> Path:
    return out / shard_name(SPLIT, GROUP, j)


def sidecar_path(out: Path, j: int) -> Path:
    return out / f"{shard_name(SPLIT, GROUP, j)}.json"


def is_done(out: Path, j: int) -> bool:
    return sidecar_path(out, j).is_file() and shard_path(out, j).is_file()


def write_shard(out: Path, j: int, samples: Iterable[dict]) -> None:
    final = shard_path(out, j)
    tmp = out / f".{final.name}.tmp"
    writer = wds.TarWriter(str(tmp), mtime=0, format=tarfile.USTAR_FORMAT)
    count, encoding = 0, "png"
    for sample in samples:
        writer.write(sample)
        encoding = sample_encoding(sample)
        count += 1
    writer.close()
    os.replace(tmp, final)
    atomic_write_json(sidecar_path(out, j), {"file": final.name, "split": SPLIT, "group": GROUP, "count": count,
                                             "sha256": sha256_file(final), "bytes": final.stat().st_size,
                                             "encoding": encoding})


def merge(out: Path, n_shards: int, weathers: list[str], creator: dict, has_target: bool = False) -> dict | None:
    """Write the manifest once every shard's sidecar exists (any task may be the last)."""
    if not all(sidecar_path(out, j).is_file() for j in range(n_shards)):
        return None
    shards = [json.loads(sidecar_path(out, j).read_text()) for j in range(n_shards)]
    encodings = {e for s in shards if (e := s.pop("encoding", "png")) and s["count"]}
    if len(encodings) > 1:
        raise UserError(f"{out}: its shards were written in different encodings ({', '.join(sorted(encodings))}); "
                        "write to a new out_dir")
    manifest = build_manifest(shards, weathers, {SPLIT: has_target}, creator, next(iter(encodings), "png"))
    manifest.pop("created", None)  # identical whichever task merges, and on every rerun
    manifest["created_by"].pop("argv", None)
    atomic_write_json(out / "manifest.json", manifest)
    log.info("all %d shards present, wrote %s", n_shards, out / "manifest.json")
    return manifest
