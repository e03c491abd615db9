"""The figures of `weatherkd report`, drawn with matplotlib (Agg, no display needed).

- ``frontier``: mean PSNR against GFLOPs@256 and against latency, one point per row (model), error
  bars over seeds where a row has seeds, identity as a reference line; a second row of panels for
  the held-out set when the report has one.
- ``gains``: per weather, each model's gain over identity with its paired standard error.
- ``grid`` (and ``grid-heldout``): restorations of a fixed, seeded choice of test images, two per
  weather: input | each model | ground truth, each cell labelled with its PSNR, and below each
  image one crop enlarged (where the models disagree most) so that a 0.2 dB difference shows.
  The exported models are run on the images now, so the grid can be redrawn at any time.
- ``clean-in``: a clean photo given to each model, and where its output moved it.

Every figure comes back as a ``Drawn``: the PNG, the matplotlib figure and the data it plots (the
tests read both).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from weatherkd.logs import get_logger

log = get_logger(__name__)

DPI = 100
PER_WEATHER = 2  # test images per weather in the grid
SEED = 0  # the grid's choice of images: fixed, so every redraw shows the same ones
ZOOM = 4  # the enlarged crop is this fraction of the image's side, shown at the image's size
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


@dataclass
class Drawn:
    name: str  # the file stem: frontier, gains, grid, grid-heldout, clean-in
    title: str
    caption: str
    figure: Figure
    data: dict = field(default_factory=dict)
    png: bytes = b""


def _finish(drawn: Drawn) -> Drawn:
    FigureCanvasAgg(drawn.figure)  # the Agg canvas: no display, no pyplot state
    buf = io.BytesIO()
    drawn.figure.savefig(buf, format="png", dpi=DPI, metadata={"Software": "weatherkd"})
    drawn.png = buf.getvalue()
    return drawn


def _sets(report: dict) -> list[tuple[str, dict]]:
    return [("test", report)] + ([("held-out", report["heldout"])] if report.get("heldout") else [])


def _colour(names: list[str]) -> dict[str, str]:
    return {n: COLOURS[i % len(COLOURS)] for i, n in enumerate(names)}


def frontier_points(report: dict) -> list[dict]:
    """One point per model row (identity has no cost): its mean PSNR, the spread over its seeds, its costs."""
    points = []
    for row in report["rows"][1:]:
        cost = row.get("cost")
        if not cost:
            continue
        seeded = row.get("runs", 1) > 1
        points.append({"name": row["name"], "psnr": row["mean"]["psnr"], "gflops": cost["gflops"],
                       "latency_ms": cost["latency_ms"], "runs": row.get("runs", 1),
                       "std": row["std"]["mean"]["psnr"] if seeded else None,
                       "random_init": bool(row.get("random_init"))})
    return points


def _stacking(points: list[dict], key: str, log_x: bool) -> list[int]:
    """How many labels each point's label sits above: points that (nearly) coincide, as the
    students of a few-step demo do, get their names stacked instead of drawn over each other."""
    if not points:
        return []
    xs = np.array([np.log10(p[key]) if log_x and p[key] > 0 else p[key] for p in points], dtype=float)
    ys = np.array([p["psnr"] for p in points], dtype=float)
    xs = (xs - xs.min()) / (np.ptp(xs) or 1.0)
    ys = (ys - ys.min()) / (np.ptp(ys) or 1.0)
    out = []
    for i in range(len(points)):
        out.append(sum(1 for j in range(i) if abs(xs[i] - xs[j]) < 0.08 and abs(ys[i] - ys[j]) < 0.04))
    return out


def frontier(report: dict) -> Drawn:
    sets = _sets(report)
    names = [r["name"] for r in report["rows"][1:]]
    colour = _colour(names)
    cost = next((r["cost"] for r in report["rows"] if r.get("cost")), {"flops_size": 256, "latency_size": 256})
    fig = Figure(figsize=(12, 4.6 * len(sets)), layout="constrained")
    axes = fig.subplots(len(sets), 2, squeeze=False)
    data = {}
    costs = {p["name"]: p for p in frontier_points(report)}
    for r, (label, rep) in enumerate(sets):
        points, identity = frontier_points(rep), rep["rows"][0]["mean"]["psnr"]
        for p in points:  # a model costs what it costs on any data: the held-out panel uses the main measurement
            p.update({k: costs[p["name"]][k] for k in ("gflops", "latency_ms")} if p["name"] in costs else {})
        data[label] = {"points": points, "identity": identity}
        for c, (key, xlabel) in enumerate((("gflops", f"GFLOPs at {cost['flops_size']}×{cost['flops_size']}"),
                                           ("latency_ms", f"latency (ms) at {cost['latency_size']}², "
                                                          f"{report.get('device', '?')}"))):
            ax = axes[r][c]
            log_x = bool(points) and max(p[key] for p in points) > 4 * min(p[key] for p in points) > 0
            for p, stacked in zip(points, _stacking(points, key, log_x)):
                ax.errorbar(p[key], p["psnr"], yerr=None if p["std"] is None else p["std"], fmt="o", ms=7,
                            capsize=4, color=colour.get(p["name"], "k"), label=p["name"])
                ax.annotate(p["name"] + (f" (n={p['runs']})" if p["runs"] > 1 else ""), (p[key], p["psnr"]),
                            textcoords="offset points", xytext=(6, 5 + 10 * stacked), fontsize=8,
                            color=colour.get(p["name"], "k"))
            ax.axhline(identity, ls="--", color="0.45", lw=1.2, label=f"identity ({identity:.2f} dB)")
            ax.margins(x=0.12, y=0.2)  # room for the names
            if log_x:
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"mean PSNR (dB, {rep['protocol']})")
            ax.set_title(f"{label} set: quality against {'compute' if key == 'gflops' else 'speed'}")
            ax.grid(alpha=0.3, which="both")
        axes[r][1].legend(fontsize=8, loc="best")
    caption = ("Mean PSNR against cost, one point per model; error bars: standard deviation over a row's seeds "
               "(where it has several); dashed line: identity (the input itself). Up and left is better."
               + (" Bottom: the held-out set." if len(sets) > 1 else ""))
    return _finish(Drawn("frontier", "Quality against cost", caption, fig, data))


def gain_bars(report: dict) -> list[dict]:
    """Each model row against identity, per weather and overall: the mean ΔPSNR and its paired SE."""
    out = []
    for d in report.get("differences", []):
        if d["b"] != "identity":
            continue
        out.append({"name": d["a"], "mean": d["mean"], "se": d["se"],
                    "weathers": {w: {"mean": v["mean"], "se": v["se"]} for w, v in d["weathers"].items()}})
    return out


def gains(report: dict) -> Drawn:
    sets = _sets(report)
    colour = _colour([r["name"] for r in report["rows"][1:]])
    fig = Figure(figsize=(12, 4.4 * len(sets)), layout="constrained")
    axes = fig.subplots(len(sets), 1, squeeze=False)
    data = {}
    for r, (label, rep) in enumerate(sets):
        ax, bars = axes[r][0], gain_bars(rep)
        groups = [*rep["weathers"], "mean"]
        data[label] = {"bars": bars, "groups": groups}
        width = 0.8 / max(1, len(bars))
        for i, b in enumerate(bars):
            values = [b["weathers"].get(w, {}).get("mean", np.nan) for w in rep["weathers"]] + [b["mean"]]
            errors = [b["weathers"].get(w, {}).get("se") for w in rep["weathers"]] + [b["se"]]
            x = np.arange(len(groups)) - 0.4 + width * (i + 0.5)
            ax.bar(x, values, width, yerr=[e or 0 for e in errors], capsize=3, color=colour.get(b["name"], "k"),
                   label=b["name"])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(groups)), groups)
        ax.set_ylabel("ΔPSNR over identity (dB)")
        ax.set_title(f"{label} set: each model's gain over identity, per weather (± paired SE over the images)")
        ax.grid(alpha=0.3, axis="y")
        if bars:
            ax.legend(fontsize=8, ncol=min(4, len(bars)))
        else:
            ax.text(0.5, 0.5, "no per-image results (give `weatherkd eval` outputs)", ha="center",
                    transform=ax.transAxes)
    caption = ("Each model's PSNR minus identity's, image by image on the same test images; error bars: the "
               "standard error of that paired difference over the images. Above zero, the model helps.")
    return _finish(Drawn("gains", "Gain over identity, per weather", caption, fig, data))


# ---------------------------------------------------------------------------
# Restorations: the exported models run on a seeded choice of test images.
# ---------------------------------------------------------------------------


def shards_of(report: dict) -> tuple[Path | None, str]:
    """The shard set and split the report's rows were evaluated on."""
    if report.get("shards"):
        return Path(report["shards"]), report.get("split") or "test"
    for row in report["rows"][1:]:  # reports written before they recorded it: the evaluations say
        metrics = Path(row.get("dir", "")) / "metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            if m.get("shards"):
                return Path(m["shards"]), m.get("split") or "test"
    return None, "test"


def _keys(shards: Path, split: str) -> list[tuple[str, int, Path]]:
    """(key, weather index, tar) of every sample of the split with a target, without decoding images."""
    from weatherkd.data.check import iter_tar
    from weatherkd.data.shards import open_set

    shard_set = open_set(shards, split)
    out = []
    for s in shard_set.shards(split):
        tar = shard_set.dir / s["file"]
        for raw in iter_tar(tar):
            if "weather.cls" in raw and any(k.startswith("target.") for k in raw):
                out.append((raw["__key__"], int(raw["weather.cls"].decode().strip()), tar))
    return out


def choose(shards: Path, split: str, per_weather: int = PER_WEATHER, seed: int = SEED) -> list[dict]:
    """A fixed, seeded choice of ``per_weather`` samples of each weather (fewer where a weather has
    fewer), decoded: ``{"key", "weather", "input", "target"}`` (uint8 H×W×3), weathers in the set's order."""
    from weatherkd.data.check import iter_tar
    from weatherkd.data.samples import decode_sample
    from weatherkd.data.shards import open_set

    weathers = open_set(shards).weathers
    found = _keys(shards, split)
    rng = np.random.default_rng(seed)
    chosen: dict[str, tuple[int, Path]] = {}
    for wi in range(len(weathers)):
        keys = sorted((k, tar) for k, w, tar in found if w == wi)
        for i in sorted(rng.choice(len(keys), size=min(per_weather, len(keys)), replace=False)) if keys else []:
            chosen[keys[i][0]] = (wi, keys[i][1])
    samples = {}
    for tar in sorted({tar for _, tar in chosen.values()}):
        for raw in iter_tar(tar):
            if raw["__key__"] in chosen:
                s = decode_sample(raw)
                samples[s["__key__"]] = {"key": s["__key__"], "weather": weathers[s["weather"]],
                                         "input": s["input"], "target": s["target"]}
    return sorted(samples.values(), key=lambda s: (weathers.index(s["weather"]), s["key"]))


def _to_tensor(img: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float().div(255).to(device)


@torch.no_grad()
def restore(model, img: np.ndarray, device) -> np.ndarray:
    """One uint8 H×W×3 image through a model, as `weatherkd eval` runs it (tiled when larger than its tile)."""
    from weatherkd.metrics import quantize
    from weatherkd.models.tiling import default_tiling, tiled

    x = _to_tensor(img, device)
    tile, overlap = default_tiling(model)
    y = tiled(model, x, tile, overlap) if max(x.shape[-2:]) > tile else model(x)
    return quantize(y.float())[0].permute(1, 2, 0).byte().cpu().numpy()


def _psnr(a: np.ndarray, b: np.ndarray, protocol: str) -> float:
    from weatherkd.metrics import psnr

    return float(psnr(a, b, protocol))


def _crop_box(images: list[np.ndarray], reference: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the 1/ZOOM-size window where the images differ most from
    ``reference`` and from each other: where a small difference in PSNR is easiest to see."""
    h, w = reference.shape[:2]
    ch, cw = max(4, h // ZOOM), max(4, w // ZOOM)
    stack = np.stack([i.astype(np.float32) for i in [*images, reference]])
    score = stack.std(0).mean(-1) + np.abs(stack[:-1] - stack[-1]).mean((0, -1))
    integral = np.pad(score, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = integral[ch:, cw:] - integral[:-ch, cw:] - integral[ch:, :-cw] + integral[:-ch, :-cw]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(top), int(left), ch, cw


def _cell_inches(img: np.ndarray) -> tuple[float, float]:
    h, w = img.shape[:2]
    width = float(np.clip(w / DPI, 1.7, 3.2))
    return width, width * h / w


def _draw_rows(label: str, rows: list[dict], columns: list[str], title: str, caption: str, name: str) -> Drawn:
    """``rows``: {"label", "cells": [(image, text)], "box"}; two figure rows each: whole and enlarged crop."""
    cw, chh = _cell_inches(rows[0]["cells"][0][0]) if rows else (2.0, 2.0)
    fig = Figure(figsize=(cw * len(columns) + 0.6, (chh + 0.55) * 2 * max(1, len(rows)) + 0.6), layout="constrained")
    axes = fig.subplots(max(1, 2 * len(rows)), len(columns), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for r, row in enumerate(rows):
        top, left, h, w = row["box"]
        for c, (img, text) in enumerate(row["cells"]):
            whole, zoom = axes[2 * r][c], axes[2 * r + 1][c]
            whole.imshow(img, interpolation="nearest")
            whole.add_patch(Rectangle((left - 0.5, top - 0.5), w, h, fill=False, ec="#ffdd00", lw=1.2))
            whole.set_title(f"{columns[c]}\n{text}", fontsize=8)
            zoom.imshow(img[top:top + h, left:left + w], interpolation="nearest")
            for spine in zoom.spines.values():
                spine.set_edgecolor("#ffdd00")
        axes[2 * r][0].set_ylabel(row["label"], fontsize=8)
        axes[2 * r + 1][0].set_ylabel(f"×{ZOOM} crop", fontsize=8)
    fig.suptitle(title, fontsize=11)
    data = {"columns": columns, "rows": [{"label": r["label"], "texts": [t for _, t in r["cells"]], "box": r["box"]}
                                         for r in rows]}
    return _finish(Drawn(name, title, caption, fig, data))


def _models(report: dict, device) -> list[tuple[str, torch.nn.Module]]:
    from weatherkd import models

    return [(row["name"], models.load(row["model"]).to(device).eval()) for row in report["rows"][1:]]


def grid(report: dict, label: str, loaded, device, samples: list[dict]) -> Drawn:
    protocol = report["protocol"]
    columns = ["input", *(n for n, _ in loaded), "ground truth"]
    rows = []
    for s in samples:
        outputs = [restore(m, s["input"], device) for _, m in loaded]
        cells = [(s["input"], f"{_psnr(s['input'], s['target'], protocol):.2f} dB")]
        cells += [(o, f"{_psnr(o, s['target'], protocol):.2f} dB") for o in outputs]
        cells.append((s["target"], "reference"))
        rows.append({"label": f"{s['weather']}\n{s['key']}", "cells": cells, "box": _crop_box(outputs, s["target"])})
    name = "grid" if label == "test" else f"grid-{label.replace('-', '')}"
    seeded = any(r.get("runs", 1) > 1 for r in report["rows"])
    caption = (f"{label} set: {len(samples)} images, {PER_WEATHER} per weather where it has them (a fixed, seeded "
               f"choice), restored now by each "
               f"exported model; PSNR ({protocol}) against the ground truth under each. The framed crop, where "
               f"the outputs differ most, is enlarged ×{ZOOM} below each image."
               + (" Rows with seeds show their first seed's model." if seeded else ""))
    return _draw_rows(label, rows, columns, f"Restorations, {label} set", caption, name)


def clean_in(report: dict, loaded, device, photos: list[tuple[str, np.ndarray]]) -> Drawn:
    """Clean photos in: each model's output and its PSNR against the photo (35 dB is the bar)."""
    protocol = report["protocol"]
    columns = ["clean input", *(n for n, _ in loaded)]
    rows = []
    for label, photo in photos:
        outputs = [restore(m, photo, device) for _, m in loaded]
        cells = [(photo, "the photo")] + [(o, f"{_psnr(o, photo, protocol):.2f} dB") for o in outputs]
        rows.append({"label": label, "cells": cells, "box": _crop_box(outputs, photo)})
    caption = ("A clean photo (a test target: nothing to remove) given to each model; PSNR of its output against "
               "the photo itself. A restorer should return it unchanged (35 dB is the bar); the enlarged crop is "
               "where the outputs moved it most.")
    return _draw_rows("clean", rows, columns, "Clean in: what each model does to a photo with no weather",
                      caption, "clean-in")


def draw(report: dict) -> tuple[list[Drawn], list[str]]:
    """Every figure of ``report``; and notes on any that could not be drawn (a shard set or model that
    is not here any more), which the page shows in their place."""
    drawn, notes = [frontier(report), gains(report)], []
    from weatherkd.errors import UserError

    device = torch.device(report.get("device") or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    try:
        loaded = _models(report, device)
    except (UserError, OSError) as e:
        return drawn, [f"No restorations: a model could not be loaded ({e})."]
    clean_photos = []
    for label, rep in _sets(report):
        shards, split = shards_of(rep)
        try:
            if shards is None:
                raise UserError("the report does not say which shard set it was evaluated on")
            samples = choose(shards, split)
        except (UserError, OSError) as e:
            notes.append(f"No {label} restorations: {e}.")
            continue
        if not samples:
            notes.append(f"No {label} restorations: {shards}/{split} has no sample with a ground truth.")
            continue
        drawn.append(grid(rep, label, loaded, device, samples))
        clean_photos.append((f"{label}: {samples[0]['key']}\n(its ground truth)", samples[0]["target"]))
    if clean_photos:
        drawn.append(clean_in(report, loaded, device, clean_photos))
    return drawn, notes
