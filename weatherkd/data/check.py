"""`weatherkd shards inspect` and `weatherkd shards leakage`."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from weatherkd.data.samples import CorruptSample, decode_member, decode_sample
from weatherkd.data.shards import ShardSet, open_set
from weatherkd.io import sha256_file
from weatherkd.logs import progress


def iter_tar(path: Path):
    """Raw samples of one tar in order, grouped by key: WebDataset's own reader, as training reads it."""
    return wds.tarfile_to_samples()([{"url": str(path)}])


def inspect(path) -> tuple[dict, list[str]]:
    """Counts per split and weather, plus a list of problems (checksum mismatch, undecodable samples)."""
    shard_set = open_set(path)
    problems: list[str] = []
    counts: dict[str, Counter] = {}
    listed = {s["file"] for s in shard_set.manifest["shards"]}
    for stray in sorted(p.name for p in shard_set.dir.glob("*.tar") if p.name not in listed):
        problems.append(f"{stray}: tar not listed in the manifest")
    for s in progress(shard_set.manifest["shards"], desc="inspect", unit="shard"):
        file = shard_set.dir / s["file"]
        if sha256_file(file) != s["sha256"]:
            problems.append(f"{s['file']}: sha256 does not match the manifest")
        n = 0
        try:
            for raw in iter_tar(file):
                n += 1
                try:
                    sample = decode_sample(raw)
                except CorruptSample as e:
                    problems.append(f"{s['file']}: sample '{raw['__key__']}' does not decode ({e.__cause__ or e})")
                    continue
                name = shard_set.weathers[sample["weather"]] if "weather" in sample else s["group"]
                counts.setdefault(s["split"], Counter())[name] += 1
        except tarfile.TarError as e:
            problems.append(f"{s['file']}: unreadable tar after {n} samples ({e})")
        if n != s["count"]:
            problems.append(f"{s['file']}: holds {n} samples, manifest says {s['count']}")
    report = {
        "dir": str(shard_set.dir),
        "weathers": shard_set.weathers,
        "splits": {split: dict(sorted(c.items())) for split, c in counts.items()},
        "shards": len(shard_set.manifest["shards"]),
        "ok": not problems,
    }
    return report, problems


# ---------------------------------------------------------------------------
# Leakage: perceptual hashes of the clean images of two sets.
# ---------------------------------------------------------------------------


def _hashes(shard_set: ShardSet) -> tuple[np.ndarray, list[str]]:
    """64-bit DCT perceptual hashes (imagehash.phash) of each distinct target (inputs if no targets)."""
    import imagehash

    seen: dict[bytes, str] = {}
    bits, keys = [], []
    for s in shard_set.manifest["shards"]:
        field = f"{'target' if shard_set.has_target(s['split']) else 'input'}.{shard_set.encoding}"
        for raw in iter_tar(shard_set.dir / s["file"]):
            data = raw.get(field)
            if data is None:
                continue
            digest = data[:64] + len(data).to_bytes(8, "little")  # cheap exact-duplicate filter
            if digest in seen:
                continue
            seen[digest] = raw["__key__"]
            h = imagehash.phash(Image.fromarray(decode_member(field, data)))
            bits.append(h.hash.flatten())
            keys.append(f"{s['file']}:{raw['__key__']}")
    return np.array(bits, dtype=bool).reshape(len(bits), -1), keys


def leakage(train_dir, test_dir, max_distance: int = 8, chunk: int = 512) -> list[dict]:
    """Pairs of near-duplicate clean images across two sets (Hamming distance of pHash <= max_distance)."""
    a_bits, a_keys = _hashes(open_set(train_dir))
    b_bits, b_keys = _hashes(open_set(test_dir))
    pairs = []
    for start in range(0, len(a_bits), chunk):
        block = a_bits[start:start + chunk]
        dist = (block[:, None, :] != b_bits[None, :, :]).sum(-1)
        for i, j in zip(*np.nonzero(dist <= max_distance)):
            pairs.append({"train": a_keys[start + i], "test": b_keys[j], "distance": int(dist[i, j])})
    return pairs
