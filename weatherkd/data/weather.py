"""Physical weather degradation models (Tan et al. 2024 §II-A), seeded and vectorised.

Images are float32 H×W×3 arrays in [0, 1]. Every model draws its parameters
from configurable ranges with the caller's ``numpy.random.Generator`` and
returns them, so ``meta.json`` can say exactly how a sample was made.

- rain_haze: O = T·(B + Σ S_i) + (1 − T)·A        (heavy rain, Li et al. 2019)
- raindrop:  O = (1 − M)·B + R                    (attentive GAN, Qian et al. 2018)
- snow:      O = (1 − Z)·B + Z·C, plus veiling    (DesnowNet, Liu et al. 2018)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, signal


def _uniform(rng: np.random.Generator, bounds) -> float:
    lo, hi = bounds
    return float(rng.uniform(lo, hi))


def _line_kernel(length: float, angle_deg: float) -> np.ndarray:
    """A normalised motion-blur kernel: a line of ``length`` px at ``angle_deg`` from vertical."""
    size = int(np.ceil(length)) | 1
    k = np.zeros((size, size), np.float32)
    c = size // 2
    t = np.linspace(-length / 2, length / 2, 4 * size)
    a = np.deg2rad(angle_deg)
    ys = np.clip(np.round(c + t * np.cos(a)).astype(int), 0, size - 1)
    xs = np.clip(np.round(c + t * np.sin(a)).astype(int), 0, size - 1)
    k[ys, xs] = 1.0
    return k / k.sum()


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int = 4) -> np.ndarray:
    """A smooth random field in [0, 1]: coarse noise upsampled with cubic splines."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    field_ = ndimage.zoom(coarse, (h / cells, w / cells), order=3, mode="nearest")[:h, :w]
    field_ -= field_.min()
    return field_ / max(float(field_.max()), 1e-6)


# ---------------------------------------------------------------------------
# rain + haze
# ---------------------------------------------------------------------------


@dataclass
class RainHazeParams:
    layers: list[int] = field(default_factory=lambda: [2, 4])  # inclusive range of streak layers
    density: list[float] = field(default_factory=lambda: [0.002, 0.008])  # streak seeds per pixel
    length: list[float] = field(default_factory=lambda: [0.06, 0.18])  # fraction of the short side
    angle: list[float] = field(default_factory=lambda: [-30.0, 30.0])  # degrees from vertical
    angle_jitter: float = 6.0  # per-layer deviation from the storm's angle
    intensity: list[float] = field(default_factory=lambda: [0.5, 1.0])
    beta: list[float] = field(default_factory=lambda: [0.3, 1.2])  # haze density in T = exp(-beta·d)
    airlight: list[float] = field(default_factory=lambda: [0.75, 0.95])


def rain_haze(clean: np.ndarray, rng: np.random.Generator, p: RainHazeParams | None = None, severity: float = 1.0):
    p = p or RainHazeParams()
    h, w, _ = clean.shape
    short = min(h, w)
    n_layers = int(rng.integers(p.layers[0], p.layers[1] + 1))
    storm_angle = _uniform(rng, p.angle)
    streaks = np.zeros((h, w), np.float32)
    layers = []
    for _ in range(n_layers):
        density = _uniform(rng, p.density) * severity
        length = max(3.0, _uniform(rng, p.length) * short)
        angle = storm_angle + float(rng.uniform(-p.angle_jitter, p.angle_jitter))
        intensity = _uniform(rng, p.intensity)
        seeds = (rng.random((h, w)) < density).astype(np.float32) * rng.uniform(0.5, 1.0, (h, w)).astype(np.float32)
        layer = signal.fftconvolve(seeds, _line_kernel(length, angle), mode="same")
        layer = ndimage.gaussian_filter(layer, 0.5)
        layer = np.clip(layer / max(float(layer.max()), 1e-6), 0, 1) * intensity
        streaks += layer
        layers.append({"density": density, "length_px": length, "angle": angle, "intensity": intensity})
    # Depth proxy: far at the top of the frame, plus smooth scene-dependent variation.
    ramp = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None]
    depth = 0.6 * ramp + 0.4 * _smooth_field(rng, h, w)
    beta = _uniform(rng, p.beta) * severity
    T = np.exp(-beta * depth)[..., None]
    A = _uniform(rng, p.airlight) + rng.uniform(-0.03, 0.03, 3).astype(np.float32)
    out = T * (clean + streaks[..., None]) + (1 - T) * A
    params = {
        "layers": layers,
        "beta": beta,
        "airlight": [float(a) for a in A],
        "mean_transmission": float(T.mean()),
        "streak_coverage": float((streaks > 0.1).mean()),
    }
    return np.clip(out, 0, 1).astype(np.float32), params


# ---------------------------------------------------------------------------
# raindrops on the lens
# ---------------------------------------------------------------------------


@dataclass
class RaindropParams:
    count: list[int] = field(default_factory=lambda: [25, 60])  # drops per 256×256
    radius: list[float] = field(default_factory=lambda: [0.05, 0.12])  # fraction of the short side
    aspect: list[float] = field(default_factory=lambda: [0.6, 1.0])  # minor/major axis
    zoom: list[float] = field(default_factory=lambda: [1.5, 3.0])  # how much wider the lens sees
    blur: list[float] = field(default_factory=lambda: [1.0, 3.0])  # defocus of the refracted view (px)
    edge_softness: float = 0.15


def raindrop(clean: np.ndarray, rng: np.random.Generator, p: RaindropParams | None = None, severity: float = 1.0):
    p = p or RaindropParams()
    h, w, _ = clean.shape
    short = min(h, w)
    n = max(1, int(round(rng.integers(p.count[0], p.count[1] + 1) * h * w / 256**2 * severity)))
    cy, cx = rng.uniform(0, h, n), rng.uniform(0, w, n)
    ry = rng.uniform(*p.radius, n) * short
    rx = ry * rng.uniform(*p.aspect, n)
    theta = rng.uniform(0, np.pi, n)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Elliptic radius of every pixel w.r.t. every drop: (n, h, w), vectorised over drops.
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    ct, st = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = (dx * ct + dy * st) / rx[:, None, None]
    v = (-dx * st + dy * ct) / ry[:, None, None]
    r = np.sqrt(u * u + v * v)
    masks = np.clip((1 - r) / p.edge_softness, 0, 1)
    owner = masks.argmax(0)
    M = masks.max(0)
    # Each drop is a small lens: it shows an inverted, zoomed-out, defocused view of the scene
    # around its centre. Sample the blurred background at the refracted coordinates.
    zoom = rng.uniform(*p.zoom, n)
    blur = _uniform(rng, p.blur)
    blurred = ndimage.gaussian_filter(clean, (blur, blur, 0))
    oy, ox, oz = cy[owner], cx[owner], zoom[owner]
    src_y = np.clip(oy - (yy - oy) * oz, 0, h - 1)
    src_x = np.clip(ox - (xx - ox) * oz, 0, w - 1)
    refracted = np.stack(
        [ndimage.map_coordinates(blurred[..., c], [src_y, src_x], order=1) for c in range(3)], -1
    )
    brighten = 1.08  # drops gather light, so they read slightly brighter than their surroundings
    R = M[..., None] * np.clip(refracted * brighten, 0, 1)
    out = (1 - M[..., None]) * clean + R
    params = {"drops": int(n), "blur": blur, "mean_zoom": float(zoom.mean()), "mask_coverage": float((M > 0.5).mean())}
    return np.clip(out, 0, 1).astype(np.float32), params


# ---------------------------------------------------------------------------
# snow
# ---------------------------------------------------------------------------


@dataclass
class SnowParams:
    # One entry per flake size: seeds per pixel and flake radius (px at 256×256).
    densities: list[float] = field(default_factory=lambda: [0.004, 0.0015, 0.0004])
    sizes: list[float] = field(default_factory=lambda: [0.7, 1.5, 3.0])
    density_scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    motion: list[float] = field(default_factory=lambda: [2.0, 8.0])  # motion-blur length (px)
    angle: list[float] = field(default_factory=lambda: [-40.0, 40.0])
    opacity: list[float] = field(default_factory=lambda: [0.7, 1.0])
    veil: list[float] = field(default_factory=lambda: [0.05, 0.25])  # veiling brightening


def snow(clean: np.ndarray, rng: np.random.Generator, p: SnowParams | None = None, severity: float = 1.0):
    p = p or SnowParams()
    h, w, _ = clean.shape
    scale = min(h, w) / 256
    density_scale = _uniform(rng, p.density_scale) * severity
    angle = _uniform(rng, p.angle)
    motion = _uniform(rng, p.motion) * max(scale, 0.5)
    opacity = _uniform(rng, p.opacity)
    Z = np.zeros((h, w), np.float32)
    for density, size in zip(p.densities, p.sizes):
        sigma = max(0.5, size * scale)
        seeds = (rng.random((h, w)) < density * density_scale).astype(np.float32)
        flakes = ndimage.gaussian_filter(seeds, sigma) * (2 * np.pi * sigma**2)  # peak ≈ 1 per flake
        flakes = signal.fftconvolve(flakes, _line_kernel(motion * size / p.sizes[-1] + 1, angle), mode="same")
        flakes = np.clip(flakes * 1.5, 0, 1) * opacity
        Z = 1 - (1 - Z) * (1 - flakes)  # flakes at different depths occlude, they don't add
    flake_colour = 0.92 + rng.uniform(0, 0.08, 3).astype(np.float32)
    out = (1 - Z[..., None]) * clean + Z[..., None] * flake_colour
    veil = _uniform(rng, p.veil) * severity
    out = (1 - veil) * out + veil * 0.9
    params = {
        "density_scale": density_scale,
        "angle": angle,
        "motion_px": motion,
        "opacity": opacity,
        "veil": veil,
        "mask_coverage": float((Z > 0.5).mean()),
    }
    return np.clip(out, 0, 1).astype(np.float32), params


# ---------------------------------------------------------------------------


@dataclass
class WeatherParams:
    """Parameter ranges for every weather model (a config section)."""

    rain_haze: RainHazeParams = field(default_factory=RainHazeParams)
    raindrop: RaindropParams = field(default_factory=RaindropParams)
    snow: SnowParams = field(default_factory=SnowParams)


MODELS = {"rain_haze": rain_haze, "raindrop": raindrop, "snow": snow}


def degrade(clean: np.ndarray, weather: str, rng: np.random.Generator, params: WeatherParams | None = None,
            severity: float = 1.0):
    """Degrade a float H×W×3 image in [0, 1]; returns (degraded, parameters used).

    ``severity`` scales how much weather there is (streak and flake density, haze and veil, the
    number of drops), not what one streak, flake or drop looks like: 1 is the ranges as
    configured, 0.2 a light shower of the same weather. Every random draw happens at any
    severity, so a sample's other parameters do not depend on it.
    """
    if weather not in MODELS:
        raise ValueError(f"unknown weather '{weather}'; known: {', '.join(MODELS)}")
    params = params or WeatherParams()
    degraded, used = MODELS[weather](clean.astype(np.float32), rng, getattr(params, weather), severity)
    return degraded, {**used, "severity": severity}
