"""`weatherkd shards ingest`: existing paired datasets -> shard sets.

- ``allweather``: the TransWeather/AllWeather layout. A list file holds input
  paths relative to the root; the target path is the input path with ``input``
  replaced by ``gt``.
- ``paired``: two parallel folders matched by file name.

Images of any size are stored as they are (re-encoded losslessly to PNG).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from weatherkd.config import CANONICAL_WEATHERS
from weatherkd.data.image_files import read_rgb8
from weatherkd.data.samples import IMAGE_EXTS, BadImage, encode_sample
from weatherkd.data.shards import ShardSetError, ShardSetWriter
from weatherkd.logs import get_logger, progress

log = get_logger(__name__)

# Path fragments that identify a weather in the public datasets' folder names.
WEATHER_HINTS = [
    ("raindrop", "raindrop"),
    ("snow", "snow"),
    ("test1", "rain_haze"),
    ("outdoor", "rain_haze"),
    ("rain_haze", "rain_haze"),
    ("haze", "rain_haze"),
    ("rain", "rain_haze"),
]


def infer_weather(path: str) -> str:
    low = path.lower()
    for hint, weather in WEATHER_HINTS:
        if hint in low:
            return weather
    raise ShardSetError(f"cannot infer the weather of '{path}'; pass --weather")


def _target_path(input_rel: str) -> str:
    # Only the path component named 'input' is replaced, not e.g. a file named 'input_01.png'.
    parts = Path(input_rel).parts
    if "input" not in parts:
        raise ShardSetError(f"allweather list entry '{input_rel}' has no 'input' folder in its path")
    i = len(parts) - 1 - parts[::-1].index("input")
    return str(Path(*parts[:i], "gt", *parts[i + 1:]))


def allweather_pairs(root: Path, list_file: Path) -> list[tuple[Path, Path]]:
    if not list_file.is_file():
        raise ShardSetError(f"list file not found: {list_file}")
    pairs = []
    for line in list_file.read_text().splitlines():
        rel = line.strip().lstrip("./")
        if not rel:
            continue
        pairs.append((root / rel, root / _target_path(rel)))
    return pairs


def paired_folder_pairs(input_root: Path, target_root: Path) -> list[tuple[Path, Path]]:
    if not target_root.is_dir():
        raise ShardSetError(f"target folder not found: {target_root} (set --target-root)")
    files = sorted(p for p in input_root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    return [(p, target_root / p.relative_to(input_root)) for p in files]


def _key(split: str, index: int, path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)
    return f"{split}_{index:07d}_{stem}"


def ingest(layout: str, root: str, out: str, split: str = "train", list_file: str | None = None,
           target_root: str | None = None, weather: str | None = None, skip_missing: bool = False,
           skip_bad: bool = False, shard_size: int = 256, overwrite: bool = False, encoding: str = "png") -> dict:
    """``skip_missing``/``skip_bad``: skip pairs with an absent / undecodable file, count them and
    list the bad files in the manifest, instead of stopping at the first one."""
    root_p = Path(root)
    if not root_p.is_dir():
        raise ShardSetError(f"dataset root not found: {root_p}")
    if layout == "allweather":
        if not list_file:
            raise ShardSetError("--layout allweather needs --list FILE")
        pairs = allweather_pairs(root_p, Path(list_file))
    elif layout == "paired":
        pairs = paired_folder_pairs(root_p, Path(target_root) if target_root else root_p.parent / "gt")
    else:
        raise ShardSetError(f"unknown layout '{layout}'")
    if not pairs:
        raise ShardSetError(f"no input images found for layout '{layout}' under {root_p}")

    weathers_of = [weather or infer_weather(str(inp.relative_to(root_p))) for inp, _ in pairs]
    weathers = [w for w in CANONICAL_WEATHERS if w in weathers_of] + sorted(set(weathers_of) - set(CANONICAL_WEATHERS))
    writer = ShardSetWriter(out, weathers, shard_size, overwrite,
                            creator={"layout": layout, "root": str(root_p.resolve()), "list": list_file})
    missing, bad = 0, []
    for i, ((inp, tgt), w) in enumerate(progress(list(zip(pairs, weathers_of)), desc="shards ingest", unit="pair")):
        absent = [p for p in (inp, tgt) if not p.is_file()]
        if absent:
            if not skip_missing:
                raise ShardSetError(f"missing file {absent[0]} (pair of {inp}); pass --skip-missing to skip and count")
            missing += 1
            continue
        try:
            input_img, target_img = read_rgb8(inp), read_rgb8(tgt)
        except BadImage as e:
            if not skip_bad:
                raise BadImage(f"{e}; pass --skip-bad to skip and count such pairs") from None
            log.warning("skipping a pair: %s", e)
            bad.append(str(e))
            continue
        if input_img.shape != target_img.shape:
            raise ShardSetError(f"{inp} is {input_img.shape[:2]} but its target {tgt} is {target_img.shape[:2]}")
        meta = {"source": layout, "weather": w, "params": None, "origin": str(inp.relative_to(root_p)), "seed": None}
        sample = encode_sample(_key(split, i, inp), np.ascontiguousarray(input_img), weathers.index(w), meta,
                               target=np.ascontiguousarray(target_img), encoding=encoding)
        writer.add(split, w, sample)
    writer.creator["skipped_missing"] = missing
    writer.creator["skipped_bad"] = bad
    manifest = writer.close()
    if missing:
        log.warning("skipped %d pairs with a missing partner file", missing)
    if bad:
        log.warning("skipped %d pairs with an unreadable image (listed in the manifest's created_by.skipped_bad)",
                    len(bad))
    return manifest
