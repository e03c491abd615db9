"""Shard sets on disk: atomic writing, the manifest, and reading it back.

A shard set is a directory of ``{split}-{weather|mixed}-%06d.tar`` files and a
``manifest.json`` written last. A set without a manifest is incomplete (its
writer was killed) and loaders refuse it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from weatherkd import __version__
from weatherkd.data.samples import image_member, sample_encoding
from weatherkd.errors import UserError
from weatherkd.io import atomic_write_json, sha256_file

MANIFEST = "manifest.json"
FORMAT = "weatherkd-shards/1"
SHARD_RE = re.compile(r"^(?P<split>[a-z0-9_]+)-(?P<group>[a-z0-9_]+)-(?P<index>\d{6})\.tar$")


class ShardSetError(UserError):
    """A shard set is missing, incomplete or corrupt; the message names the file."""


def shard_name(split: str, group: str, index: int) -> str:
    return f"{split}-{group}-{index:06d}.tar"


class ShardSetWriter:
    """Writes samples into per-(split, group) tar sequences; each tar appears only when complete."""

    def __init__(self, out_dir, weathers: list[str], shard_size: int = 256, overwrite: bool = False, creator=None):
        self.dir = Path(out_dir)
        self.weathers = list(weathers)
        self.shard_size = shard_size
        self.creator = creator or {}
        self.shards: list[dict] = []
        self._open: dict[tuple[str, str], tuple[wds.TarWriter, Path, int, int]] = {}
        self._next_index: dict[tuple[str, str], int] = {}
        self._has_target: dict[str, bool] = {}
        self.encoding: str | None = None
        self._prepare_dir(overwrite)

    def _prepare_dir(self, overwrite: bool) -> None:
        manifest = self.dir / MANIFEST
        if manifest.exists() and not overwrite:
            raise ShardSetError(f"{self.dir} already holds a complete shard set; pass --overwrite to replace it")
        self.dir.mkdir(parents=True, exist_ok=True)
        # Drop the manifest first: from here on the set reads as incomplete until we finish.
        manifest.unlink(missing_ok=True)
        for stale in self.dir.iterdir():
            if SHARD_RE.match(stale.name) or stale.name.endswith(".tmp"):
                stale.unlink()

    def add(self, split: str, group: str, sample: dict) -> None:
        key = (split, group)
        has_target = image_member(sample, "target") is not None
        if self._has_target.setdefault(split, has_target) != has_target:
            raise ValueError(f"split '{split}' mixes samples with and without targets")
        encoding = sample_encoding(sample)
        if (self.encoding or encoding) != encoding:
            raise ValueError(f"a shard set has one encoding: sample '{sample['__key__']}' is {encoding}, "
                             f"the set {self.encoding}")
        self.encoding = encoding
        if key not in self._open:
            index = self._next_index.get(key, 0)
            tmp = self.dir / f".{shard_name(split, group, index)}.tmp"
            # USTAR with a fixed mtime: no PAX headers (half the tar-parsing cost when streaming),
            # and the same samples always give byte-identical tars.
            writer = wds.TarWriter(str(tmp), mtime=0, format=tarfile.USTAR_FORMAT)
            self._open[key] = (writer, tmp, index, 0)
        writer, tmp, index, count = self._open[key]
        writer.write(sample)
        count += 1
        self._open[key] = (writer, tmp, index, count)
        if count >= self.shard_size:
            self._finish(key)

    def _finish(self, key) -> None:
        writer, tmp, index, count = self._open.pop(key)
        writer.close()
        final = self.dir / shard_name(key[0], key[1], index)
        os.replace(tmp, final)
        self._next_index[key] = index + 1
        self.shards.append(
            {"file": final.name, "split": key[0], "group": key[1], "count": count,
             "sha256": sha256_file(final), "bytes": final.stat().st_size}
        )

    def close(self) -> dict:
        for key in list(self._open):
            self._finish(key)
        manifest = build_manifest(self.shards, self.weathers, self._has_target, self.creator, self.encoding)
        atomic_write_json(self.dir / MANIFEST, manifest)
        return manifest


def build_manifest(shards: list[dict], weathers: list[str], has_target: dict, creator: dict,
                   encoding: str | None = None) -> dict:
    shards = sorted(shards, key=lambda s: s["file"])
    splits: dict[str, dict[str, int]] = {}
    for s in shards:
        splits.setdefault(s["split"], {}).setdefault(s["group"], 0)
        splits[s["split"]][s["group"]] += s["count"]
    return {
        "format": FORMAT,
        "weathers": weathers,
        "splits": splits,
        "has_target": has_target,
        "encoding": encoding or "png",
        "shards": shards,
        "created_by": {"argv": sys.argv, **creator},
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class ShardSet:
    """A complete shard set, read from its manifest."""

    dir: Path
    manifest: dict

    @property
    def weathers(self) -> list[str]:
        return self.manifest["weathers"]

    def shards(self, split: str, weathers: list[str] | None = None) -> list[dict]:
        chosen = [s for s in self.manifest["shards"] if s["split"] == split]
        if weathers is not None:
            chosen = [s for s in chosen if s["group"] in weathers or s["group"] == "mixed"]
        return chosen

    def urls(self, split: str, weathers: list[str] | None = None) -> list[str]:
        return [str(self.dir / s["file"]) for s in self.shards(split, weathers)]

    def count(self, split: str, weathers: list[str] | None = None) -> int:
        return sum(s["count"] for s in self.shards(split, weathers))

    @property
    def encoding(self) -> str:
        """How its images are stored; sets written before the manifest said so are PNG."""
        return self.manifest.get("encoding", "png")

    def has_target(self, split: str) -> bool:
        return bool(self.manifest.get("has_target", {}).get(split, False))


def open_set(path, split: str | None = None) -> ShardSet:
    """Read a shard set's manifest; every listed shard must exist. Errors name the file."""
    path = Path(path)
    if not path.is_dir():
        raise ShardSetError(f"shard set not found: {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ShardSetError(
            f"{path} has no {MANIFEST}: it is not a shard set, or its writer was killed before finishing"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ShardSetError(f"{manifest_path} is not valid JSON: {e}") from e
    for s in manifest["shards"]:
        if not (path / s["file"]).is_file():
            raise ShardSetError(f"{path}: shard '{s['file']}' listed in the manifest is missing")
    shard_set = ShardSet(path, manifest)
    if split is not None and not shard_set.shards(split):
        have = ", ".join(manifest["splits"]) or "none"
        raise ShardSetError(f"{path} has no '{split}' split (it has: {have})")
    return shard_set
