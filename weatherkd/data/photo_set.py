"""`weatherkd shards synth`: degrade clean photos into a paired train/test shard set.

The embedded default (``--source builtin``) is the set of real photographs shipped inside the package
(``weatherkd/data/photos/``; ``PHOTOS.md`` there gives each one's source, author and licence), so a
fresh machine has real data offline. Photos are split before anything is cropped: no photo feeds both
splits, and the photos reserved for `shards heldout` feed neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from weatherkd.config import CANONICAL_WEATHERS
from weatherkd.data import weather as weather_models
from weatherkd.data.image_files import read_rgb8
from weatherkd.data.samples import IMAGE_EXTS, BadImage, encode_sample, to_uint8
from weatherkd.data.shards import ShardSetError, ShardSetWriter
from weatherkd.logs import get_logger, progress

log = get_logger(__name__)

PHOTO_DIR = Path(__file__).parent / "photos"
PHOTO_RECORD = PHOTO_DIR / "photos.json"  # one entry per shipped photo: file, source, author, licence, resize

# Every shipped photo has one role, by name (a unit test checks that the roles are disjoint and
# cover the set):
# - test: natural outdoor scenes held out of training, in order (``test_photos=k`` takes the first k);
BUILTIN_TEST_PHOTOS = ("evening_glow", "china", "life", "picos_de_europa", "path", "aitzgorri")
# - held-out: read only by `shards heldout` (its default source, with scikit-image's greyscale
#   photos); `shards synth` never reads them, for training or testing;
HELDOUT_PHOTOS = ("flower", "friends", "kleiber", "wine")
# - train: every other shipped photo (``builtin_train_photos()``).


@lru_cache(maxsize=None)
def builtin_catalogue() -> dict[str, dict]:
    """The shipped photos' records (``photos/photos.json``), by name."""
    return {r["name"]: r for r in json.loads(PHOTO_RECORD.read_text())}


def builtin_train_photos() -> tuple[str, ...]:
    reserved = set(BUILTIN_TEST_PHOTOS) | set(HELDOUT_PHOTOS)
    return tuple(n for n in builtin_catalogue() if n not in reserved)


def read_builtin(names) -> list[tuple[str, np.ndarray]]:
    """(name, float32 H×W×3 in [0, 1]) for the named shipped photos, decoding only those."""
    return [(n, _to_float(img)) for n, img in _decode_builtin(names)]


def _decode_builtin(names) -> list[tuple[str, np.ndarray]]:
    catalogue = builtin_catalogue()
    return [(n, read_rgb8(PHOTO_DIR / catalogue[n]["file"])) for n in names]


def _to_float(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) / 255.0


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
    # for streaks (docs/results/2026-12-03-demo-three-seeds.md).
    rotate: bool = True
    # Training crops given thin straight structures before they are degraded (clean ones too):
    # poles, wires, railings, mortar, drawn opaque and sharp into input and target alike. The
    # embedded photos hold almost none, so every thin bright line a model saw was a rain streak,
    # and the teachers darkened the cameraman's tripod, a brick wall's mortar and a page's strokes.
    # With 0.3 a 1000-step teacher leaves them alone (brick, clean in: 31.9 -> 44-65 dB), but the
    # demo's recipe then removes almost nothing, and a 2000-step one takes the lines again
    # (docs/results/2026-12-03-thin-structures.md); so it is offered, not the default. Its own random stream: 0
    # gives the samples a set without it had.
    structure_fraction: float = 0.0
    # Training crops given fine surface texture before they are degraded (clean ones too): gravel,
    # grass, bark, multiplied into the scene. The embedded photos at the crops' scale hold little
    # such texture, so dense fine detail meant weather, and the models darkened clean held-out
    # textures by up to 28 levels of 255. With 0.3 the scratch student lost 0.47 dB on the test
    # split and gained 1.12 dB held out (three seeds), and in a whole demo every model's worst
    # held-out weather rose (docs/results/2026-12-07-teacher-recipe-and-texture-damage.md). Its own random
    # stream: 0 gives the samples a set without it had.
    texture_fraction: float = 0.3
    # Test samples per weather: views of the held-out test photos (each photo, mirrored every other
    # round), each with its own degradation at full severity. 48 per weather (eight views of each
    # of the six builtin test photos; 144 test images at most 192 px): between two classical
    # filters (median, Gaussian, identity) the standard error of a paired mean PSNR difference over
    # the 144 is 0.03-0.08 dB, per weather 0.03-0.14 dB.
    test: int = 48
    # Photos held out for testing: None takes the six named ones (BUILTIN_TEST_PHOTOS) of the
    # builtin set, and two of a folder's, drawn by the seed.
    test_photos: int | None = None
    size: int = 96  # training crop side
    # The photo's scale before a training crop is cut, drawn uniformly from this range (never so
    # small that the crop would not fit). Test images are whole photos at ``test_size``, a smaller
    # scale; reaching down to it trades test PSNR for safety held out, like the keep loss
    # (docs/results/2026-12-07-removal-and-damage.md), so the default stops at 0.25.
    zoom: list[float] = field(default_factory=lambda: [0.25, 0.75])
    test_size: int = 192  # longest side of a test photo
    seed: int = 0
    shard_size: int = 128
    encoding: str = "png"  # samples.ENCODINGS
    params: weather_models.WeatherParams = field(default_factory=weather_models.WeatherParams)


def load_photos(source: str, skip_bad: bool = False, bad: list | None = None) -> list[tuple[str, np.ndarray]]:
    """(name, float32 H×W×3 in [0, 1]) for every photo in the source (for ``builtin``, the shipped
    train and test photos, not the held-out ones). An unreadable file stops with its name, or with
    ``skip_bad`` is skipped and its error appended to ``bad``."""
    return [(n, _to_float(img)) for n, img in _decode(source, skip_bad, bad)]


def _decode(source: str, skip_bad: bool = False, bad: list | None = None) -> list[tuple[str, np.ndarray]]:
    """``load_photos`` in uint8, as decoded."""
    if source == "builtin":
        return _decode_builtin([*builtin_train_photos(), *BUILTIN_TEST_PHOTOS])
    root = Path(source)
    if not root.is_dir():
        raise ShardSetError(f"--source must be 'builtin' or a folder of images; {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if not files:
        raise ShardSetError(f"no images ({', '.join(IMAGE_EXTS)}) found under {root}")
    photos = []
    for p in files:
        try:
            photos.append((str(p.relative_to(root)), read_rgb8(p)))
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


def _random_crop(rng: np.random.Generator, img: Image.Image, size: int,
                 zoom: tuple[float, float]) -> tuple[np.ndarray, list[int]]:
    # A random zoom first, so crops cover scales from detail to most of the photo. Only the crop's
    # window is resampled (PIL's box): the same pixels, up to rounding, as resizing the whole photo
    # and cropping it, at a fraction of the cost on a 1024 px photo.
    w, h = img.size
    lo = size / min(h, w)
    scale = float(rng.uniform(max(lo, zoom[0]), max(lo, zoom[1])))
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    y, x = int(rng.integers(0, sh - size + 1)), int(rng.integers(0, sw - size + 1))
    fx, fy = w / sw, h / sh
    crop = img.resize((size, size), Image.BICUBIC, box=(x * fx, y * fy, (x + size) * fx, (y + size) * fy))
    return np.asarray(crop, np.float32) / 255.0, [y, x, round(scale, 4)]


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


def add_texture(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fine surface texture multiplied into a crop: Gaussian noise blurred to a grain of 0.6-1.5 px,
    scaling each pixel by 1 ± 5-25% (one standard deviation), the same in every channel. Unlike
    snow or rain it darkens as often as it brightens, except in near-white areas, where clipping
    at 1 keeps only its darker half."""
    grain = ndimage.gaussian_filter(rng.standard_normal(img.shape[:2]), rng.uniform(0.6, 1.5))
    if not grain.std() > 0:  # a crop of one pixel has no grain to scale
        return img.astype(np.float32)
    grain *= rng.uniform(0.05, 0.25) / (grain.std() + 1e-6)
    return np.clip(img * (1 + grain[..., None]), 0, 1).astype(np.float32)


def _test_image(img: np.ndarray, longest: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = min(1.0, longest / max(h, w))
    img = _resize(img, scale) if scale < 1 else img
    h, w = img.shape[:2]
    return img[: h - h % 8, : w - w % 8]  # multiples of 8 keep every model's down/upsampling exact


def build(out: str, source: str, spec: SynthSpec, overwrite: bool = False, creator: dict | None = None,
          skip_bad: bool = False) -> dict:
    lo, hi = spec.severity
    if not 0 < spec.zoom[0] <= spec.zoom[1]:
        raise ShardSetError(f"--zoom needs 0 < low <= high (got {spec.zoom[0]} {spec.zoom[1]})")
    shares = (spec.grey_fraction, spec.structure_fraction, spec.texture_fraction)
    if not (0 < lo <= hi) or not 0 <= spec.clean_fraction < 1 or not all(0 <= f <= 1 for f in shares):
        raise ShardSetError(f"severity needs 0 < low <= high (got {lo} {hi}), clean fraction 0 <= f < 1 "
                            f"(got {spec.clean_fraction}), grey, structure and texture fractions 0 <= f <= 1 "
                            f"(got {spec.grey_fraction}, {spec.structure_fraction} and {spec.texture_fraction})")
    for w in spec.weathers:
        if w not in weather_models.MODELS:
            raise ShardSetError(f"unknown weather '{w}'; known: {', '.join(weather_models.MODELS)}")
    bad: list[str] = []
    photos = _decode(source, skip_bad, bad)  # uint8: training crops are resampled from it as it is
    builtin = source == "builtin"
    n_test = spec.test_photos if spec.test_photos is not None else len(BUILTIN_TEST_PHOTOS) if builtin else 2
    if builtin and n_test > len(BUILTIN_TEST_PHOTOS):
        raise ShardSetError(f"the builtin set holds out at most {len(BUILTIN_TEST_PHOTOS)} test photos, "
                            f"not {n_test}")
    if not 0 < n_test < len(photos):
        raise ShardSetError(f"{len(photos)} photos cannot hold out {n_test} for testing")
    order = np.random.default_rng(spec.seed).permutation(len(photos))
    if builtin:  # hold out the named natural outdoor scenes, like the papers' test sets
        names = [n for n, _ in photos]
        held = [names.index(n) for n in BUILTIN_TEST_PHOTOS[:n_test]]
        order = np.array(held + [i for i in order if i not in held])
    test_photos = [photos[i] for i in order[:n_test]]
    train_photos = [photos[i] for i in order[n_test:]]
    log.info("train photos: %s; held-out test photos: %s",
             [n for n, _ in train_photos], [n for n, _ in test_photos])

    writer = ShardSetWriter(out, spec.weathers, spec.shard_size, overwrite,
                            creator={"source": source, "spec": _spec_dict(spec),
                                     "train_photos": [n for n, _ in train_photos],
                                     "test_photos": [n for n, _ in test_photos], "skipped_bad": bad})
    total = spec.train * len(spec.weathers) + spec.test * len(spec.weathers)
    bar = progress(total=total, desc="shards synth", unit="img")
    source_tag = "builtin-photos" if builtin else "folder"
    train_images = [(name, Image.fromarray(photo)) for name, photo in train_photos]
    for i in range(spec.train):
        rng = np.random.default_rng([spec.seed, 0, i])
        name, photo = train_images[int(rng.integers(len(train_images)))]
        clean, crop = _random_crop(rng, photo, spec.size, spec.zoom)
        if np.random.default_rng([spec.seed, 3, i]).random() < spec.structure_fraction:
            clean, crop = draw_structures(clean, np.random.default_rng([spec.seed, 4, i])), [*crop, "structures"]
        grain = np.random.default_rng([spec.seed, 6, i])
        if grain.random() < spec.texture_fraction:
            clean, crop = add_texture(clean, grain), [*crop, "texture"]
        look = np.random.default_rng([spec.seed, 2, i])
        if look.random() < spec.grey_fraction:
            clean, crop = greyscale(clean), [*crop, "grey"]
        if spec.rotate and (k := int(look.integers(4))):
            clean, crop = np.ascontiguousarray(np.rot90(clean, k)), [*crop, f"rot{90 * k}"]
        for wi, w in enumerate(spec.weathers):
            _add(writer, "train", i, w, wi, clean, name, crop, rng, spec, source_tag)
            bar.update()
    test_images = [(name, _test_image(_to_float(photo), spec.test_size)) for name, photo in test_photos]
    for i in range(spec.test):
        name, clean = test_images[i % len(test_images)]
        if (i // len(test_photos)) % 2:
            clean = np.ascontiguousarray(clean[:, ::-1])
        for wi, w in enumerate(spec.weathers):
            rng = np.random.default_rng([spec.seed, 1, i, wi])
            _add(writer, "test", i, w, wi, clean, name, None, rng, spec, source_tag, severity=1.0)
            bar.update()
    bar.close()
    return writer.close()


def _add(writer, split, i, w, wi, clean, name, crop, rng, spec, source_tag, severity: float | None = None):
    if severity is None:  # a training crop: clean now and then, else a severity from the range
        severity = 0.0 if rng.random() < spec.clean_fraction else float(rng.uniform(*spec.severity))
    if severity == 0.0:
        degraded, params = clean, {"severity": 0.0}
    else:
        degraded, params = weather_models.degrade(clean, w, rng, spec.params, severity)
    meta = {"source": source_tag, "weather": w, "params": params, "origin": name, "crop": crop, "seed": spec.seed}
    sample = encode_sample(f"{split}_{w}_{i:06d}", to_uint8(degraded), wi, meta, target=to_uint8(clean),
                           encoding=spec.encoding)
    writer.add(split, w, sample)


def _spec_dict(spec: SynthSpec) -> dict:
    from dataclasses import asdict

    return asdict(spec)
