"""`weatherkd shards synth`: degrade clean photos into a paired train/test shard set.

The embedded default (``--source builtin``) is the real colour photographs that
ship inside scikit-image's wheel, so a fresh machine has real data offline.
Photos are split before anything is cropped: no photo feeds both splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from weatherkd.config import CANONICAL_WEATHERS
from weatherkd.data import weather as weather_models
from weatherkd.data.samples import IMAGE_EXTS, BadImage, encode_sample, read_image_file, to_uint8
from weatherkd.data.shards import ShardSetError, ShardSetWriter
from weatherkd.logs import get_logger, progress

log = get_logger(__name__)

# Colour photographs bundled in skimage/data (no download needed).
# The stereo pair contributes only its left view: the right one is a near-duplicate, which would
# leak across splits.
BUILTIN_PHOTOS = {
    "astronaut": lambda d: d.astronaut(),
    "chelsea": lambda d: d.chelsea(),
    "coffee": lambda d: d.coffee(),
    "motorcycle": lambda d: d.stereo_motorcycle()[0],
    "rocket": lambda d: d.rocket(),
    "hubble_deep_field": lambda d: d.hubble_deep_field(),
    "immunohistochemistry": lambda d: d.immunohistochemistry(),
    "retina": lambda d: d.retina(),
}


# Builtin photos held out for testing, in order: natural outdoor/indoor scenes like the papers' test sets.
BUILTIN_TEST_ORDER = ["coffee", "chelsea", "rocket"]


@dataclass
class SynthSpec:
    weathers: list[str] = field(default_factory=lambda: list(CANONICAL_WEATHERS))
    train: int = 800  # crops per weather
    # Training severities, drawn uniformly (weather.degrade): light showers as well as storms, so a
    # model learns how much to remove, not that there is always a lot.
    severity: list[float] = field(default_factory=lambda: [0.2, 1.0])
    # Training crops left clean (input = target) in every weather's group: what a model sees when
    # there is nothing to remove, and must return unchanged.
    clean_fraction: float = 0.15
    # Training crops made greyscale before they are degraded (clean ones too). Haze washes colour
    # out, so a model that never saw a grey photo reads "no colour" as haze and stretches the
    # contrast of every greyscale photo it is given (a scratch student: 71 dB clean-in on a colour
    # test photo, 35 dB on the same photo in grey). Drawn from its own random stream, so 0 gives
    # the samples a set without it had.
    grey_fraction: float = 0.2
    # Crops turned by a random multiple of 90 degrees before they are degraded. Weather keeps its
    # own direction (rain falls near-vertically), so content lines of every direction appear under
    # it. Measured on a scratch student, it did not stop a brick wall's mortar from being taken
    # for streaks (README, "What changed").
    rotate: bool = True
    # Training crops given thin straight structures before they are degraded (clean ones too):
    # poles, wires, railings, mortar, drawn opaque and sharp into input and target alike. The
    # embedded photos hold almost none, so every thin bright line a model saw was a rain streak,
    # and the teachers darkened the cameraman's tripod, a brick wall's mortar and a page's strokes.
    # With 0.3 a 1000-step teacher leaves them alone (brick, clean in: 31.9 -> 44-65 dB), but the
    # demo's recipe then removes almost nothing, and a 2000-step one takes the lines again
    # (README, "Thin structures"); so it is offered, not the default. Its own random stream: 0
    # gives the samples a set without it had.
    structure_fraction: float = 0.0
    # Test samples per weather: views of the held-out photos (each photo, mirrored every other
    # round), each with its own degradation at full severity. 30 per weather keeps the standard
    # error of a paired PSNR difference between two models near or under 0.1 dB.
    test: int = 30
    test_photos: int = 2
    size: int = 96  # training crop side
    test_size: int = 192  # longest side of a test photo
    seed: int = 0
    shard_size: int = 128
    encoding: str = "png"  # samples.ENCODINGS
    params: weather_models.WeatherParams = field(default_factory=weather_models.WeatherParams)


def load_photos(source: str, skip_bad: bool = False, bad: list | None = None) -> list[tuple[str, np.ndarray]]:
    """(name, float32 H×W×3 in [0, 1]) for every photo in the source. An unreadable file stops
    with its name, or with ``skip_bad`` is skipped and its error appended to ``bad``."""
    if source == "builtin":
        import skimage.data

        photos = []
        for name, read in BUILTIN_PHOTOS.items():
            photos.append((name, read(skimage.data)[..., :3].astype(np.float32) / 255.0))
        return photos
    root = Path(source)
    if not root.is_dir():
        raise ShardSetError(f"--source must be 'builtin' or a folder of images; {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if not files:
        raise ShardSetError(f"no images ({', '.join(IMAGE_EXTS)}) found under {root}")
    photos = []
    for p in files:
        try:
            photos.append((str(p.relative_to(root)), read_image_file(p).astype(np.float32) / 255.0))
        except BadImage as e:
            if not skip_bad:
                raise BadImage(f"{e}; pass --skip-bad to skip and count such files") from None
            log.warning("skipping %s", e)
            if bad is not None:
                bad.append(str(e))
    if not photos:
        raise ShardSetError(f"none of the {len(files)} images under {root} could be read")
    return photos


def _resize(img: np.ndarray, scale: float) -> np.ndarray:
    h, w = img.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(to_uint8(img)).resize(size, Image.BICUBIC), np.float32) / 255.0


def _random_crop(rng: np.random.Generator, img: np.ndarray, size: int) -> tuple[np.ndarray, list[int]]:
    # A random zoom first, so crops cover scales from detail to most of the photo.
    h, w = img.shape[:2]
    lo = size / min(h, w)
    scale = float(rng.uniform(max(lo, 0.25), max(lo, 0.75)))
    img = _resize(img, scale)
    h, w = img.shape[:2]
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return img[y:y + size, x:x + size], [y, x, round(scale, 4)]


def greyscale(img: np.ndarray) -> np.ndarray:
    """The photo's luma (BT.601) in all three channels, quantised as an 8-bit grey photo would be."""
    luma = np.round(img @ np.array([0.299, 0.587, 0.114], np.float32) * 255) / 255
    return np.repeat(luma[..., None], 3, -1).astype(np.float32)


def draw_structures(img: np.ndarray, rng: np.random.Generator, supersample: int = 4) -> np.ndarray:
    """Thin straight structures drawn into a crop: one to three of a single long line or a family
    of parallel, evenly spaced ones (a railing, mortar courses), 1-3 px wide, lighter or darker
    than the scene. Opaque and antialiased, unlike a rain streak, which is a translucent, blurred
    brightening. Two thirds lie within 30 degrees of vertical, where rain falls (half drawn there,
    half at any angle)."""
    h, w = img.shape[:2]
    out = img.astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        mask = Image.new("L", (w * supersample, h * supersample), 0)
        draw = ImageDraw.Draw(mask)
        angle = rng.uniform(-30, 30) if rng.random() < 0.5 else rng.uniform(-90, 90)  # degrees from vertical
        direction = np.array([np.sin(np.deg2rad(angle)), np.cos(np.deg2rad(angle))])
        across = np.array([direction[1], -direction[0]])
        width = rng.uniform(1.0, 3.0)
        if rng.random() < 0.5:
            spacing = rng.uniform(8.0, 24.0)
            offsets = np.arange(-max(h, w), max(h, w), spacing) + rng.uniform(0, spacing)
            length = 2.0 * max(h, w)
        else:
            offsets = rng.uniform(-0.4, 0.4, 1) * min(h, w)
            length = rng.uniform(0.3, 1.5) * max(h, w)
        centre = np.array([w, h]) / 2 + rng.uniform(-0.25, 0.25, 2) * np.array([w, h])
        for off in offsets:
            mid = centre + off * across
            ends = [mid - direction * length / 2, mid + direction * length / 2]
            draw.line([tuple(e * supersample) for e in ends], fill=255, width=max(1, round(width * supersample)))
        alpha = np.asarray(mask.resize((w, h), Image.BOX), np.float32)[..., None] / 255.0
        level = rng.uniform(0.65, 1.0) if rng.random() < 0.5 else rng.uniform(0.0, 0.35)
        colour = np.clip(level + rng.uniform(-0.08, 0.08, 3), 0, 1).astype(np.float32)
        out = (1 - alpha) * out + alpha * colour
    return out


def _test_image(img: np.ndarray, longest: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = min(1.0, longest / max(h, w))
    img = _resize(img, scale) if scale < 1 else img
    h, w = img.shape[:2]
    return img[: h - h % 8, : w - w % 8]  # multiples of 8 keep every model's down/upsampling exact


def build(out: str, source: str, spec: SynthSpec, overwrite: bool = False, creator: dict | None = None,
          skip_bad: bool = False) -> dict:
    lo, hi = spec.severity
    shares = (spec.grey_fraction, spec.structure_fraction)
    if not (0 < lo <= hi) or not 0 <= spec.clean_fraction < 1 or not all(0 <= f <= 1 for f in shares):
        raise ShardSetError(f"severity needs 0 < low <= high (got {lo} {hi}), clean fraction 0 <= f < 1 "
                            f"(got {spec.clean_fraction}), grey and structure fractions 0 <= f <= 1 (got "
                            f"{spec.grey_fraction} and {spec.structure_fraction})")
    for w in spec.weathers:
        if w not in weather_models.MODELS:
            raise ShardSetError(f"unknown weather '{w}'; known: {', '.join(weather_models.MODELS)}")
    bad: list[str] = []
    photos = load_photos(source, skip_bad, bad)
    if len(photos) <= spec.test_photos:
        raise ShardSetError(f"{len(photos)} photos cannot hold out {spec.test_photos} for testing")
    order = np.random.default_rng(spec.seed).permutation(len(photos))
    if source == "builtin":  # hold out natural scenes, not the microscopy/astronomy images
        names = [n for n, _ in photos]
        held = [names.index(n) for n in BUILTIN_TEST_ORDER[: spec.test_photos]]
        order = np.array(held + [i for i in order if i not in held])
    test_photos = [photos[i] for i in order[: spec.test_photos]]
    train_photos = [photos[i] for i in order[spec.test_photos:]]
    log.info("train photos: %s; held-out test photos: %s",
             [n for n, _ in train_photos], [n for n, _ in test_photos])

    writer = ShardSetWriter(out, spec.weathers, spec.shard_size, overwrite,
                            creator={"source": source, "spec": _spec_dict(spec),
                                     "train_photos": [n for n, _ in train_photos],
                                     "test_photos": [n for n, _ in test_photos], "skipped_bad": bad})
    total = spec.train * len(spec.weathers) + spec.test * len(spec.weathers)
    bar = progress(total=total, desc="shards synth", unit="img")
    for i in range(spec.train):
        rng = np.random.default_rng([spec.seed, 0, i])
        name, photo = train_photos[int(rng.integers(len(train_photos)))]
        clean, crop = _random_crop(rng, photo, spec.size)
        if np.random.default_rng([spec.seed, 3, i]).random() < spec.structure_fraction:
            clean, crop = draw_structures(clean, np.random.default_rng([spec.seed, 4, i])), [*crop, "structures"]
        look = np.random.default_rng([spec.seed, 2, i])
        if look.random() < spec.grey_fraction:
            clean, crop = greyscale(clean), [*crop, "grey"]
        if spec.rotate and (k := int(look.integers(4))):
            clean, crop = np.ascontiguousarray(np.rot90(clean, k)), [*crop, f"rot{90 * k}"]
        for wi, w in enumerate(spec.weathers):
            _add(writer, "train", i, w, wi, clean, name, crop, rng, spec)
            bar.update()
    for i in range(spec.test):
        name, photo = test_photos[i % len(test_photos)]
        clean = _test_image(photo, spec.test_size)
        if (i // len(test_photos)) % 2:
            clean = np.ascontiguousarray(clean[:, ::-1])
        for wi, w in enumerate(spec.weathers):
            rng = np.random.default_rng([spec.seed, 1, i, wi])
            _add(writer, "test", i, w, wi, clean, name, None, rng, spec, severity=1.0)
            bar.update()
    bar.close()
    return writer.close()


def _add(writer, split, i, w, wi, clean, name, crop, rng, spec, severity: float | None = None):
    if severity is None:  # a training crop: clean now and then, else a severity from the range
        severity = 0.0 if rng.random() < spec.clean_fraction else float(rng.uniform(*spec.severity))
    if severity == 0.0:
        degraded, params = clean, {"severity": 0.0}
    else:
        degraded, params = weather_models.degrade(clean, w, rng, spec.params, severity)
    meta = {"source": "builtin-skimage" if name in BUILTIN_PHOTOS else "folder", "weather": w,
            "params": params, "origin": name, "crop": crop, "seed": spec.seed}
    sample = encode_sample(f"{split}_{w}_{i:06d}", to_uint8(degraded), wi, meta, target=to_uint8(clean),
                           encoding=spec.encoding)
    writer.add(split, w, sample)


def _spec_dict(spec: SynthSpec) -> dict:
    from dataclasses import asdict

    return asdict(spec)
