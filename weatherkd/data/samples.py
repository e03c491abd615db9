"""Encoding and decoding shard samples by extension. Untrusted bytes are data: no pickle, ever."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from weatherkd.errors import UserError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # what a folder of photos may hold
# Every image member of a sample, in the shard schema (shards/README.md).
IMAGE_FIELDS = ("input", "target", "teacher")
# The lossless encodings a shard set's images may use; its manifest says which ("encoding"), and
# members decode by their extension, so sets of every encoding (and older sets) load. QOI decodes
# a 640x480 photo ~5x faster than PNG for ~1.2x its bytes: `weatherkd bench loader` measures both.
ENCODINGS = ("png", "qoi")


class CorruptSample(ValueError):
    """A sample whose members cannot be decoded; loaders skip and count these."""


def encode_image(img: np.ndarray, encoding: str = "png") -> bytes:
    """uint8 (or float [0, 1]) H×W×3 -> lossless ``encoding`` bytes."""
    if img.dtype != np.uint8:
        img = to_uint8(img)
    if encoding == "qoi":
        import qoi

        return qoi.encode(np.ascontiguousarray(img))
    if encoding != "png":
        raise ValueError(f"unknown sample encoding '{encoding}'; known: {', '.join(ENCODINGS)}")
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def image_member(sample: dict, field: str) -> str | None:
    """The name of ``field``'s image member in a raw sample ("input.png", "input.qoi", ...), or None."""
    for ext in (*ENCODINGS, *IMAGE_EXTS):
        if f"{field}.{ext}" in sample:
            return f"{field}.{ext}"
    return None


def sample_encoding(sample: dict) -> str:
    """The encoding of a raw sample's input image."""
    name = image_member(sample, "input")
    return name.rsplit(".", 1)[1] if name else "png"


def to_uint8(img) -> np.ndarray:
    """A float image in [0, 1] -> uint8 H×W×C, rounded to nearest: numpy H×W×C, or a torch C×H×W
    tensor on any device and in any dtype (a model's output)."""
    if not isinstance(img, np.ndarray):
        img = img.detach().float().permute(1, 2, 0).cpu().numpy()
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # forces a full decode, so truncated files fail here, not later
        return np.array(im if im.mode == "RGB" else im.convert("RGB"))


class BadImage(UserError):
    """An image file that cannot be read or fully decoded (missing, truncated, not an image)."""


def decode_member(ext: str, data: bytes):
    ext = ext.lower()
    if ext.endswith("qoi"):
        import qoi

        img = qoi.decode(data)
        return img if img.shape[2] == 3 else img[..., :3]
    if ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
        return decode_image(data)
    if ext.endswith("cls"):
        return int(data.decode().strip())
    if ext.endswith("json"):
        return json.loads(data)
    if ext.endswith("txt"):
        return data.decode()
    return data  # unknown members stay bytes; never unpickled


def decode_sample(raw: dict) -> dict:
    """Decode a raw WebDataset sample ``{"__key__", "input.png": bytes, ...}``.

    Returns ``{"__key__", "__url__", "input": uint8 array, "weather": int, ...}``
    with image members keyed by their base name. Raises CorruptSample.
    """
    out = {"__key__": raw.get("__key__", "?"), "__url__": raw.get("__url__", "?")}
    for name, data in raw.items():
        if name.startswith("__"):
            continue
        base = name.split(".", 1)[0]
        try:
            value = decode_member(name, data)
        except Exception as e:  # any decoder failure means the member is corrupt
            raise CorruptSample(f"{out['__url__']}: sample '{out['__key__']}' member '{name}': {e}") from e
        out["weather" if base == "weather" else base] = value
    if "input" not in out:
        raise CorruptSample(f"{out['__url__']}: sample '{out['__key__']}' has no input image")
    return out


def encode_sample(key: str, input_img, weather: int, meta: dict, target=None, teacher=None, prov=None,
                  encoding: str = "png") -> dict:
    if "." in key:
        raise ValueError(f"sample key '{key}' must not contain dots (WebDataset splits on them)")
    sample = {"__key__": key, f"input.{encoding}": encode_image(input_img, encoding),
              "weather.cls": str(int(weather)).encode()}
    if target is not None:
        sample[f"target.{encoding}"] = encode_image(target, encoding)
    if teacher is not None:
        sample[f"teacher.{encoding}"] = encode_image(teacher, encoding)
    sample["meta.json"] = json.dumps(meta).encode()
    if prov is not None:
        sample["prov.json"] = json.dumps(prov).encode()
    return sample
