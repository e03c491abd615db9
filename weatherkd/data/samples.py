"""Encoding and decoding shard samples by extension. Untrusted bytes are data: no pickle, ever."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from weatherkd.errors import UserError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# Every image member of a sample, in the DESIGN schema.
IMAGE_FIELDS = ("input", "target", "teacher")


class CorruptSample(ValueError):
    """A sample whose members cannot be decoded; loaders skip and count these."""


def encode_png(img: np.ndarray) -> bytes:
    """uint8 (or float [0, 1]) H×W×3 -> PNG bytes."""
    if img.dtype != np.uint8:
        img = to_uint8(img)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


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


def read_image_file(path) -> np.ndarray:
    """Decode a whole image file to uint8 RGB; any failure is a ``BadImage`` naming the file."""
    try:
        with open(path, "rb") as f:
            return decode_image(f.read())
    # PIL reports broken files as OSError (truncated, unidentified), ValueError, SyntaxError (bad
    # PNG chunks) or its DecompressionBombError; all mean the same thing here.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise BadImage(f"{path}: unreadable image ({reason})") from None


def decode_member(ext: str, data: bytes):
    ext = ext.lower()
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


def encode_sample(key: str, input_img, weather: int, meta: dict, target=None, teacher=None, prov=None) -> dict:
    if "." in key:
        raise ValueError(f"sample key '{key}' must not contain dots (WebDataset splits on them)")
    sample = {"__key__": key, "input.png": encode_png(input_img), "weather.cls": str(int(weather)).encode()}
    if target is not None:
        sample["target.png"] = encode_png(target)
    if teacher is not None:
        sample["teacher.png"] = encode_png(teacher)
    sample["meta.json"] = json.dumps(meta).encode()
    if prov is not None:
        sample["prov.json"] = json.dumps(prov).encode()
    return sample
