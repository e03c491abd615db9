"""`weatherkd shards heldout`: a test-only set that the training generator had no part in.

Two things differ from `shards synth`, on purpose:
- **Other photos.** By default (``builtin-other``), the greyscale photographs in scikit-image's
  wheel (the cameraman, coins, the moon, grass, gravel, brick, a page, text) and the shipped colour
  photos reserved for this set (``photo_set.HELDOUT_PHOTOS``), none of which `shards synth` reads,
  for training or testing. ``--source DIR`` takes a folder instead.
- **Another weather generator,** written apart from ``weather.py`` and sharing no code with it:
  weather is drawn with PIL (lines, discs, blurs, composites), not simulated from the papers'
  physical models, and it comes in levels from mild (a few drops, light snow, a drizzle) to
  moderate. A model that only learned ``weather.py``'s look, or that alters what is not degraded,
  loses to identity here.

Groups are named after the weathers the models know, so `weatherkd eval` and `weatherkd report`
score them per weather; each sample's ``meta.json`` gives its level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from weatherkd.config import CANONICAL_WEATHERS
from weatherkd.data.photo_set import HELDOUT_PHOTOS, load_photos, read_builtin
from weatherkd.data.samples import encode_sample, to_uint8
from weatherkd.data.shards import ShardSetError, ShardSetWriter

# Greyscale photographs in scikit-image's wheel; the embedded set ships none of them.
GREY_PHOTOS = ("camera", "coins", "moon", "grass", "gravel", "brick", "page", "text")
# Every photo of the default source: those, then the shipped colour photos kept out of `shards synth`.
OTHER_PHOTOS = (*GREY_PHOTOS, *HELDOUT_PHOTOS)

# How much weather, per level: (low, high) ranges drawn per sample. Counts are per 256x256 pixels.
LEVELS = {
    "mild": {"streaks": (40, 120), "haze": (0.02, 0.08), "drops": (2, 5), "flakes": (80, 250), "veil": (0.0, 0.04)},
    "moderate": {"streaks": (150, 400), "haze": (0.08, 0.2), "drops": (6, 14), "flakes": (300, 900),
                 "veil": (0.04, 0.12)},
}


@dataclass
class HeldoutSpec:
    levels: list[str] = field(default_factory=lambda: ["mild", "moderate"])
    views: int = 2  # degradations of every photo, per weather and level
    size: int = 192  # longest side
    seed: int = 0
    shard_size: int = 128


def other_photos() -> list[tuple[str, np.ndarray]]:
    import skimage.data

    photos = []
    for name in GREY_PHOTOS:
        grey = getattr(skimage.data, name)().astype(np.float32) / 255.0
        photos.append((name, np.repeat(grey[..., None], 3, -1)))
    return photos + read_builtin(HELDOUT_PHOTOS)


def _count(rng, bounds, h, w) -> int:
    return max(1, int(round(rng.uniform(*bounds) * h * w / 256**2)))


def rain(img: Image.Image, rng: np.random.Generator, level: dict) -> Image.Image:
    """Slanted thin bright lines, softened, over a flat grey veil."""
    w, h = img.size
    layer = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(layer)
    slant = rng.uniform(-0.4, 0.4)
    for _ in range(_count(rng, level["streaks"], h, w)):
        x, y, length = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(6, 18)
        draw.line([(x, y), (x + slant * length, y + length)], fill=int(rng.uniform(120, 230)), width=1)
    layer = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.6)), np.float32)[..., None] / 255.0
    out = np.asarray(img, np.float32) / 255.0
    out = out + (1 - out) * layer * 0.8  # screen-like: streaks lighten, never darken
    haze = rng.uniform(*level["haze"])
    out = (1 - haze) * out + haze * rng.uniform(0.7, 0.9)
    return Image.fromarray(to_uint8(out))


def drops(img: Image.Image, rng: np.random.Generator, level: dict) -> Image.Image:
    """Round drops, each showing a blurred, upside-down copy of what lies around it."""
    w, h = img.size
    out = img.copy()
    blurred = img.filter(ImageFilter.GaussianBlur(2.5))
    for _ in range(_count(rng, level["drops"], h, w)):
        r = int(rng.uniform(4, 13))
        cx, cy = int(rng.uniform(r, w - r)), int(rng.uniform(r, h - r))
        box = (max(0, cx - 2 * r), max(0, cy - 2 * r), min(w, cx + 2 * r), min(h, cy + 2 * r))
        view = blurred.crop(box).transpose(Image.Transpose.FLIP_TOP_BOTTOM).resize((2 * r, 2 * r))
        view = Image.eval(view, lambda v: min(255, int(v * 1.06 + 6)))
        mask = Image.new("L", (2 * r, 2 * r), 0)
        ImageDraw.Draw(mask).ellipse([1, 1, 2 * r - 2, 2 * r - 2], fill=255)
        out.paste(view, (cx - r, cy - r), mask.filter(ImageFilter.GaussianBlur(1.2)))
    return out


def flakes(img: Image.Image, rng: np.random.Generator, level: dict) -> Image.Image:
    """Small white discs of a few sizes, slightly soft, and a light brightening veil."""
    w, h = img.size
    layer = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(_count(rng, level["flakes"], h, w)):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.choice([0.6, 1.0, 1.6, 2.4], p=[0.5, 0.3, 0.15, 0.05])
        draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.uniform(150, 255)))
    alpha = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.5)), np.float32)[..., None] / 255.0
    out = np.asarray(img, np.float32) / 255.0
    out = (1 - alpha) * out + alpha * 0.95
    veil = rng.uniform(*level["veil"])
    return Image.fromarray(to_uint8((1 - veil) * out + veil))


GENERATORS = {"rain_haze": rain, "raindrop": drops, "snow": flakes}


def _fit(photo: np.ndarray, longest: int) -> Image.Image:
    img = Image.fromarray(to_uint8(photo))
    scale = min(1.0, longest / max(img.size))
    if scale < 1:
        img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))), Image.BICUBIC)
    return img.crop((0, 0, img.width - img.width % 8, img.height - img.height % 8))


def build(out: str, source: str, spec: HeldoutSpec, overwrite: bool = False) -> dict:
    unknown = [lv for lv in spec.levels if lv not in LEVELS]
    if unknown or not spec.levels or spec.views < 1:
        raise ShardSetError(f"--levels takes some of {', '.join(LEVELS)} (got {' '.join(spec.levels) or 'none'}), "
                            f"--views at least 1 (got {spec.views})")
    if source == "builtin":
        raise ShardSetError("--source builtin is the training set's photos; the held-out set takes "
                            "'builtin-other' (photos `shards synth` never reads) or a folder")
    photos = other_photos() if source == "builtin-other" else load_photos(source)
    weathers = list(CANONICAL_WEATHERS)
    writer = ShardSetWriter(out, weathers, spec.shard_size, overwrite,
                            creator={"source": source, "generator": "weatherkd.data.heldout",
                                     "photos": [n for n, _ in photos], "spec": spec.__dict__})
    for pi, (name, photo) in enumerate(photos):
        clean = _fit(photo, spec.size)
        for wi, weather in enumerate(weathers):
            for li, level in enumerate(spec.levels):
                for v in range(spec.views):
                    rng = np.random.default_rng([spec.seed, pi, wi, li, v])
                    degraded = GENERATORS[weather](clean, rng, LEVELS[level])
                    meta = {"source": source, "origin": name, "weather": weather, "level": level,
                            "generator": "heldout", "seed": spec.seed}
                    key = f"test_{weather}_{level}_{pi:03d}_{v:02d}"
                    writer.add("test", weather, encode_sample(key, np.asarray(degraded), wi, meta,
                                                              target=np.asarray(clean)))
    return writer.close()
