"""Users' own image files, read and written at full fidelity (what `weatherkd restore` sees).

- Formats: JPEG, PNG, WebP, BMP and TIFF in; PNG, JPEG and WebP out.
- EXIF orientation is applied on reading, so pixels are stored upright and written without it.
- Grayscale, palette and RGBA images work. The model sees RGB; grayscale goes back as grayscale,
  and alpha is passed through untouched.
- 16-bit PNG and TIFF keep their precision: PIL reads 16-bit RGB PNG as 8 bits, so those go through
  pypng, and TIFF through tifffile; 16 bits are written back as 16-bit PNG (pypng).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from weatherkd.data.samples import BadImage

READ_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
WRITE_FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
_EXIF_ORIENTATION = 0x0112


@dataclass
class Photo:
    rgb: np.ndarray  # float32 H×W×3 in [0, 1], upright
    alpha: np.ndarray | None  # H×W in the file's own integer dtype, or None
    bits: int  # 8 or 16
    gray: bool  # written back with one channel

    @property
    def shape(self) -> tuple[int, int]:
        return self.rgb.shape[:2]


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in READ_SUFFIXES


def orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an H×W(×C) array: the pixels as the camera meant them."""
    ops = {2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
           5: lambda x: x.swapaxes(0, 1), 6: lambda x: x.swapaxes(0, 1)[:, ::-1],
           7: lambda x: x[::-1, ::-1].swapaxes(0, 1), 8: lambda x: x.swapaxes(0, 1)[::-1]}
    return np.ascontiguousarray(ops[orientation](a)) if orientation in ops else a


def _png_bit_depth(data: bytes) -> int:
    """The IHDR bit depth (byte 24) of a PNG, 0 when the bytes are not a PNG."""
    return data[24] if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 else 0


def _read_png16(data: bytes) -> np.ndarray:
    import png  # pypng

    width, height, rows, info = png.Reader(bytes=data).asDirect()
    planes = info["planes"]
    return np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(height, width, planes)


def _read_tiff(path: Path) -> tuple[np.ndarray, int]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        a = page.asarray()
        tag = page.tags.get(274)  # Orientation
        orientation = int(tag.value) if tag is not None else 1
    if a.ndim == 3 and a.shape[0] in (1, 2, 3, 4) and a.shape[-1] not in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (C, H, W) storage
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"TIFF sample type {a.dtype} is not supported (8- or 16-bit integers are)")
    return a, orientation


def _read_pil(data: bytes) -> tuple[np.ndarray, int]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # a truncated file fails here
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.clip(np.asarray(im), 0, 65535).astype(np.uint16), orientation
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode not in ("L", "LA", "RGB", "RGBA"):
            im = im.convert("RGBA" if im.mode in ("PA", "La") or "A" in im.getbands() else "RGB")
        return np.asarray(im), orientation


def read(path) -> Photo:
    """Decode one image file; anything unreadable is a ``BadImage`` naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if path.suffix.lower() in (".tif", ".tiff"):
            a, orientation = _read_tiff(path)
        elif _png_bit_depth(data) == 16:
            a = _read_png16(data)
            with Image.open(io.BytesIO(data)) as im:
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        else:
            a, orientation = _read_pil(data)
    except BadImage:
        raise
    except Exception as e:  # every decoder's failure means the same: this file cannot be restored
        reason = " ".join(str(e).split()) or type(e).__name__
        raise BadImage(f"{path}: unreadable image ({reason})") from None
    a = orient(a if a.ndim == 3 else a[..., None], orientation)
    bits = 16 if a.dtype == np.uint16 else 8
    channels = a.shape[-1]
    alpha = a[..., -1].copy() if channels in (2, 4) else None
    color = a[..., :3] if channels >= 3 else np.repeat(a[..., :1], 3, axis=-1)
    rgb = color.astype(np.float32) / (65535.0 if bits == 16 else 255.0)
    return Photo(rgb=rgb, alpha=alpha, bits=bits, gray=channels in (1, 2))


def read_rgb8(path) -> np.ndarray:
    """An image file as upright uint8 RGB (what shard sets store): `read`, then rounded to 8 bits."""
    return quantize(read(path).rgb, 8)


def header_size(path) -> tuple[int, int]:
    """(height, width) as `read` returns the image (EXIF orientation applied), from the header
    alone; (0, 0) when it cannot be read (the decode then names the problem)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            turned = im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        return (w, h) if turned else (h, w)
    except Exception:  # any unreadable header: the decode will name it
        return (0, 0)


def quantize(rgb: np.ndarray, bits: int) -> np.ndarray:
    """A float image in [0, 1] -> uint8 or uint16, rounded to nearest."""
    top = 65535 if bits == 16 else 255
    return (np.clip(rgb, 0, 1) * top + 0.5).astype(np.uint16 if bits == 16 else np.uint8)


def encode(photo: Photo, fmt: str = "png", quality: int = 95) -> tuple[bytes, list[str]]:
    """The file bytes for ``photo`` in ``fmt``, and what the format could not keep (e.g. JPEG has no alpha)."""
    lost = []
    bits = photo.bits
    if bits == 16 and fmt != "png":
        lost.append(f"{fmt} holds 8 bits per channel, not 16")
        bits = 8
    color = photo.rgb.mean(axis=-1, keepdims=True) if photo.gray else photo.rgb
    pixels = quantize(color, bits)
    alpha = photo.alpha
    if alpha is not None and fmt == "jpg":
        lost.append("jpg has no alpha channel")
        alpha = None
    if alpha is not None:
        if alpha.dtype != pixels.dtype:  # a 16-bit alpha written at 8 bits, or the reverse
            alpha = quantize(alpha.astype(np.float32) / np.iinfo(alpha.dtype).max, bits)
        pixels = np.concatenate([pixels, alpha[..., None]], axis=-1)
    buf = io.BytesIO()
    if bits == 16:
        import png  # pypng: PIL cannot write 16-bit colour

        h, w, c = pixels.shape
        png.Writer(w, h, greyscale=c in (1, 2), alpha=c in (2, 4), bitdepth=16).write(buf, pixels.reshape(h, w * c))
        return buf.getvalue(), lost
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[-1]]
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=3)
    elif fmt == "jpg":
        image.save(buf, format="JPEG", quality=quality)
    else:  # WebP stores RGB(A) only
        image.convert("RGBA" if "A" in mode else "RGB").save(buf, format="WEBP", quality=quality)
    return buf.getvalue(), lost
