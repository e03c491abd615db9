"""The report's per-photo table: on which photo, and under which weather, each model does worst.

A demo set names each image's source photo (``origin`` in ``samples.json``); a model that damages
fine texture shows up as the same few photos at the bottom of every column.
"""

from __future__ import annotations

import numpy as np

# A set with more photos than this (an ingested dataset names each image its own origin) gets no
# per-photo table: it would be one row per image.
MAX_PHOTOS = 24


def per_photo(members: list[dict]) -> dict | None:
    """Photo -> its worst weather (by the mean PSNR gain over identity on that photo's images,
    averaged over the members, i.e. seeds), that gain, and its clean-in PSNR; None unless every
    image of every member names its photo and the members share their photos."""
    samples = [r["samples"] for r in members]
    if any(s is None or not s or not all(x.get("origin") for x in s) for s in samples):
        return None
    photos = sorted({x["origin"] for x in samples[0]})
    if len(photos) > MAX_PHOTOS or any({x["origin"] for x in s} != set(photos) for s in samples[1:]):
        return None
    out = {}
    for photo in photos:
        gains: dict[str, list[float]] = {}
        clean = []
        for rows in samples:
            mine = [x for x in rows if x["origin"] == photo]
            for weather in sorted({x["weather"] for x in mine}):
                gains.setdefault(weather, []).append(
                    float(np.mean([x["psnr"] - x["id_psnr"] for x in mine if x["weather"] == weather])))
            if all("clean_psnr" in x for x in mine):
                clean.append(np.mean([x["clean_psnr"] for x in mine]))
        worst = min(gains, key=lambda w: np.mean(gains[w]))
        out[photo] = {"worst_weather": worst, "worst_gain": float(np.mean(gains[worst])),
                      "clean_in": float(np.mean(clean)) if len(clean) == len(samples) else None}
    return out


def markdown(report: dict) -> str:
    rows = [r for r in report["rows"] if "photos" in r]
    if not rows:
        return ""
    photos = sorted({p for r in rows for p in r["photos"]})

    def cell(figures: dict | None) -> str:
        if figures is None:
            return "—"
        clean = figures["clean_in"]
        return (f"{figures['worst_gain']:+.2f} {figures['worst_weather']}"
                + (f" / {clean:.1f}" if clean is not None else ""))

    lines = ["", "Per photo: each model's worst weather against identity (the mean PSNR gain over that photo's "
             "images, dB) / its clean-in PSNR: where a model damages, and on what content.", "",
             "| photo | " + " | ".join(f"{r['name']}{' †' if r.get('random_init') else ''}" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    lines += [f"| {p.replace('|', chr(92) + '|')} | " + " | ".join(cell(r["photos"].get(p)) for r in rows) + " |"
              for p in photos]
    missing = [r["name"] for r in report["rows"][1:] if "photos" not in r]
    if missing:
        lines += ["", f"Not in it: {', '.join(missing)} (an image not named by its photo, as in evaluations "
                      f"before `samples.json` named them, seeds scored on other photos, or more than {MAX_PHOTOS} "
                      "photos)."]
    return "\n".join(lines) + "\n"
