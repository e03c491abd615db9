"""`weatherkd report RUN_DIR...`: several runs' metrics and costs in one table, and a page to look at.

A RUN_DIR is a stage's ``out_dir`` (``metrics.json`` + ``model/``) or a ``weatherkd eval`` output
(whose ``metrics.json`` names its model). Rows: identity, then each run in the order given.
Costs are measured now, in this process, so the latency column compares like with like.

Runs whose configs differ only in ``seed`` are one row: mean ± standard deviation over the seeds,
with n. Every row's paired difference to identity, and the differences asked for with
``--diff A:B``, are computed image by image on the shared test images (``samples.json``): their
mean, its standard error over the images, and the spread of the per-seed differences.

With ``--out report.md`` it also writes ``report.json`` and ``report.html``: one self-contained
page with the tables, the quality/cost frontier, each model's gain per weather, a grid of
restorations (the exported models run on a fixed choice of test images) and the clean-in check
(``figures``, ``page``). ``weatherkd report report.json`` redraws the page (and, with
``--figures-to DIR``, the figures as PNGs) from a report already written.
"""

from __future__ import annotations

import io
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from weatherkd import cost, models
from weatherkd.commands.report import photos
from weatherkd.engine.run_config import flatten, with_defaults
from weatherkd.engine.validate import removal_cells
from weatherkd.errors import UserError
from weatherkd.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from weatherkd.placement import place
from weatherkd.stages import STAGES


def _load_run(run_dir: Path) -> dict:
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise UserError(f"{run_dir}: no metrics.json (not a finished run or eval output)")
    metrics = json.loads(metrics_file.read_text())
    model_dir = Path(metrics["model"]) if "model" in metrics else run_dir / "model"
    name = model_dir.resolve().parent.name if "model" in metrics else run_dir.resolve().name
    models.read_spec(model_dir)  # a clear error when the model folder is missing
    samples = run_dir / "samples.json"
    config, seed = _config_and_seed(model_dir.parent)
    return {"name": name, "dir": str(run_dir), "model": str(model_dir), "metrics": metrics, "config": config,
            "seed": seed, "samples": json.loads(samples.read_text()) if samples.is_file() else None}


# Settings that say where a run wrote and how it was watched, not what it is.
_NOT_THE_METHOD = ("seed", "out_dir", "tracker")


def _config_and_seed(run_dir: Path) -> tuple[str | None, int | None]:
    """The run's config without its seed (what runs of one method share), and its seed."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None, None
    saved = yaml.safe_load(path.read_text()) or {}
    seed, config = saved.get("seed"), _as_this_code_reads_it(saved)
    return json.dumps({k: v for k, v in config.items() if k not in _NOT_THE_METHOD}, sort_keys=True), seed


def _as_this_code_reads_it(saved: dict) -> dict:
    """A key added since the run was saved takes its default, so that seeds of one method saved
    before and after the key existed are one row. Several stages' configs may read one saved
    config (the teacher's reads a VQ's): the one that adds the fewest keys is the run's."""
    readings = []
    for stage in STAGES.values():
        if stage.kind == "train":
            filled = with_defaults(stage.config_class, saved)
            if filled is not saved:
                readings.append((len(flatten(filled)), filled))
    return min(readings, key=lambda r: r[0])[1] if readings else saved


def _group_name(names: list[str]) -> str:
    stripped = {re.sub(r"-(s|seed)\d+$", "", n) for n in names}
    return stripped.pop() if len(stripped) == 1 else names[0]


def _groups(runs: list[dict]) -> list[list[dict]]:
    """Runs in order of first appearance, those of one config (all but the seed) together."""
    groups: dict = {}
    for i, r in enumerate(runs):
        key = r["config"] if r["config"] is not None and r["seed"] is not None else f"#{i}"
        groups.setdefault(key, []).append(r)
    for members in groups.values():
        seeds = [r["seed"] for r in members]
        if len(set(seeds)) < len(seeds):
            raise UserError(f"runs {', '.join(r['dir'] for r in members)} share a config and a seed: "
                            "list each run once")
        if len(members) > 1:
            members.sort(key=lambda r: r["seed"])
    return list(groups.values())


def _spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def _group_row(members: list[dict]) -> dict:
    """mean ± std over the members' (seeds') per-weather and mean figures."""
    first = members[0]["metrics"]
    row = {"name": _group_name([r["name"] for r in members]), "runs": len(members),
           "seeds": [r["seed"] for r in members], "weathers": {}, "mean": {}, "std": {"weathers": {}, "mean": {}}}
    for w in first["weathers"]:
        for m in ("psnr", "ssim"):
            s = _spread([r["metrics"]["weathers"][w][m] for r in members])
            row["weathers"].setdefault(w, {})[m] = s["mean"]
            row["std"]["weathers"].setdefault(w, {})[m] = s["std"]
    for m in ("psnr", "ssim"):
        s = _spread([r["metrics"]["mean"][m] for r in members])
        row["mean"][m], row["std"]["mean"][m] = s["mean"], s["std"]
    if all("clean_in" in r["metrics"] for r in members):
        s = _spread([r["metrics"]["clean_in"]["psnr"] for r in members])
        row["clean_in"] = {"psnr": s["mean"], "min": min(r["metrics"]["clean_in"]["min"] for r in members)}
        row["std"]["clean_in"] = {"psnr": s["std"]}
    return row


def _per_image(members: list[dict], metric: str = "psnr") -> list[dict[str, tuple[str, float]]] | None:
    """Per member (in seed order): image key -> (weather, the metric); None without per-image rows."""
    if any(r["samples"] is None for r in members):
        return None
    return [{s["key"]: (s["weather"], s[metric]) for s in r["samples"]} for r in members]


def _identity_images(runs: list[dict]) -> list[dict[str, tuple[str, float]]] | None:
    run = next((r for r in runs if r["samples"] is not None), None)
    return None if run is None else [{s["key"]: (s["weather"], s["id_psnr"]) for s in run["samples"]}]


def _by_weather(values: dict[str, tuple[str, float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for key in sorted(values):
        weather, v = values[key]
        out.setdefault(weather, []).append(v)
    return out


def paired_difference(a: list[dict], b: list[dict], seeds_a: list, seeds_b: list) -> dict | None:
    """A − B in PSNR, image by image on the same images (each image's value averaged over a row's
    seeds). Per weather: the mean and its standard error over that weather's images; overall, as
    the table's mean column is taken, the mean of the per-weather means, with the SE that follows
    (sqrt of the summed per-weather variances, over the number of weathers). Where both rows have
    the same seeds, the spread of the per-seed differences of that mean. None when the rows were
    not scored on the same images."""
    keys = set(a[0])
    if any(set(run) != keys for run in (*a, *b)):
        return None
    diff = {k: (a[0][k][0], float(np.mean([run[k][1] for run in a]) - np.mean([run[k][1] for run in b])))
            for k in keys}
    weathers = {}
    for w, d in sorted(_by_weather(diff).items()):
        se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None
        weathers[w] = {"mean": float(np.mean(d)), "se": se, "n_images": len(d)}
    ses = [v["se"] for v in weathers.values()]
    out = {"mean": float(np.mean([v["mean"] for v in weathers.values()])),
           "se": None if None in ses else float(np.sqrt(np.sum(np.square(ses))) / len(ses)),
           "n_images": len(keys), "weathers": weathers}
    if len(seeds_a) > 1 and sorted(seeds_a) == sorted(seeds_b):
        runs_b = dict(zip(seeds_b, b))
        per_seed = []
        for seed, run_a in zip(seeds_a, a):
            d = {k: (run_a[k][0], run_a[k][1] - runs_b[seed][k][1]) for k in keys}
            per_seed.append(float(np.mean([np.mean(v) for v in _by_weather(d).values()])))
        out["per_seed"] = _spread(per_seed)
    return out


def _mean_removal(per_seed: list[dict]) -> dict:
    """validate.removal's figures per weather, averaged over seeds (None where no seed has one)."""
    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None
    return {w: {k: mean([r[w][k] for r in per_seed]) for k in per_seed[0][w]} for w in per_seed[0]}


def gather(run_dirs: list, latency_size: int = 256, device: str | None = None,
           diffs: list[tuple[str, str]] = ()) -> dict:
    runs = [_load_run(Path(d)) for d in run_dirs]
    protocols = {r["metrics"]["protocol"] for r in runs}
    if len(protocols) > 1:
        raise UserError(f"runs were evaluated under different protocols {sorted(protocols)}; "
                        "re-run `weatherkd eval --protocol` so they match")
    for what in ("n", "weathers", "shards", "split"):
        seen = {json.dumps(sorted(m[what]) if what == "weathers" else m.get(what)) for m in
                (r["metrics"] for r in runs)}
        if len(seen) > 1:
            raise UserError(f"runs were evaluated on different data ({what}: {', '.join(sorted(seen))}); "
                            "evaluate them on the same shard set and split with `weatherkd eval`")
    device = str(place(device).device)
    first = runs[0]["metrics"]
    rows = [{"name": "identity", "weathers": first["identity"]["weathers"], "mean": first["identity"]["mean"]}]
    images = {"identity": (_identity_images(runs), [None])}
    for members in _groups(runs):
        r = members[0]  # the cost is the arch's: the same for every seed
        row = _group_row(members) if len(members) > 1 else {"name": r["name"], "weathers": r["metrics"]["weathers"],
                                                            "mean": r["metrics"]["mean"]}
        if len(members) == 1 and "clean_in" in r["metrics"]:
            row["clean_in"] = r["metrics"]["clean_in"]
        if all("removal" in m["metrics"] for m in members):
            row["removal"] = _mean_removal([m["metrics"]["removal"] for m in members])
        if (per_photo := photos.per_photo(members)) is not None:
            row["photos"] = per_photo
        row.update(cost=cost.summary(models.load(r["model"]), latency_size=latency_size, device=device),
                   random_init=bool(r["metrics"].get("random_init")), model=r["model"], dir=r["dir"])
        if row["name"] in images:
            raise UserError(f"two rows are named '{row['name']}' ({r['dir']}); name the runs' folders apart")
        rows.append(row)
        images[row["name"]] = (_per_image(members), [m["seed"] for m in members])
    differences = []
    wanted = [(row["name"], "identity") for row in rows[1:]] + [tuple(d) for d in diffs]
    for a, b in wanted:
        for name in (a, b):
            if name not in images:
                raise UserError(f"--diff {a}:{b}: no row named '{name}' (rows: {', '.join(images)})")
        asked = (a, b) in {tuple(d) for d in diffs}
        d = None
        if images[a][0] is not None and images[b][0] is not None:
            d = paired_difference(images[a][0], images[b][0], images[a][1], images[b][1])
        if d is not None:
            differences.append({"a": a, "b": b, **d})
        elif asked:  # against identity, a run without per-image results (a training run's own) is left out
            raise UserError(f"--diff {a}:{b}: the two rows were not scored on the same images, image by image "
                            "(give `weatherkd eval` outputs, which hold samples.json, evaluated on one split)")
    return {"protocol": first["protocol"], "n": first["n"], "weathers": list(first["weathers"]), "rows": rows,
            "differences": differences, "shards": first.get("shards"), "split": first.get("split"), "device": device,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d")}


def markdown(report: dict) -> str:
    weathers = report["weathers"]
    sizes = _cost_sizes(report)
    cols = [*(f"{w} PSNR/SSIM" for w in weathers), "mean PSNR/SSIM", "params", f"GFLOPs@{sizes[0]}",
            f"latency ms@{sizes[1]}"]
    seeded = any(row.get("runs", 1) > 1 for row in report["rows"])
    cols = ["n", *cols] if seeded else cols
    clean = any("clean_in" in row for row in report["rows"])
    if clean:
        cols.insert(cols.index("params"), "clean-in PSNR")
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row in report["rows"]:
        std = row.get("std")

        def cell(value: dict, spread: dict | None, bold: bool = False) -> str:
            p = f"{value['psnr']:.2f}" + (f" ± {spread['psnr']:.2f}" if spread else "")
            return (f"**{p}**" if bold else p) + f" / {value['ssim']:.3f}"

        cells = [("—" if row["name"] == "identity" else str(row.get("runs", 1)))] if seeded else []
        cells += [cell(row["weathers"][w], std and std["weathers"][w]) for w in weathers]
        cells.append(cell(row["mean"], std and std["mean"], bold=True))
        if clean:
            ci = row.get("clean_in")
            spread = (std or {}).get("clean_in")
            cells.append("—" if ci is None else f"{ci['psnr']:.2f}" + (f" ± {spread['psnr']:.2f}" if spread else ""))
        c = row.get("cost")
        cells += [f"{c['params'] / 1e6:.3f} M", f"{c['gflops']:.2f}", f"{c['latency_ms']:.1f}"] if c else ["—"] * 3
        name = row["name"] + (" †" if row.get("random_init") else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [f"Protocol `{report['protocol']}`, {report['n']} samples; latency on {report['device']} "
             f"({report['machine']}), {report['date']}."]
    if seeded:
        notes.append("a ± b: mean and standard deviation over the n seeds of a row (one run each).")
    if clean:
        notes.append("clean-in PSNR: each clean test target given as the input, the output scored against it "
                     "(a model that leaves clean content alone scores high; 35 dB is the bar).")
    if any(r.get("random_init") for r in report["rows"]):
        notes.append("† built with random pretrained towers (allow_random_init): a pipeline check, not a result.")
    notes += report.get("notes", [])
    return ("\n".join(lines) + "\n\n" + "\n".join(notes) + "\n" + _removal_markdown(report)
            + photos.markdown(report) + _differences_markdown(report))


def _removal_markdown(report: dict) -> str:
    rows = [r for r in report["rows"] if "removal" in r]
    if not rows:
        return ""
    weathers = report["weathers"]

    def cell(figures: dict | None) -> str:
        return " / ".join(removal_cells(figures))

    share = rows[0]["removal"]
    lines = ["", "Removal and damage, per weather (RGB): the share of the input's squared error on the pixels the "
             "weather changed that the model took away / PSNR over the pixels it left exact (damage; identity: "
             "exact). Weather pixels: " + ", ".join(f"{w} {100 * share[w]['weather_pixels']:.0f}%"
                                                     for w in weathers if w in share) + ".", "",
             "| model | " + " | ".join(weathers) + " |", "|---|" + "---|" * len(weathers)]
    lines += [f"| {r['name']}{' †' if r.get('random_init') else ''} | "
              + " | ".join(cell(r["removal"].get(w)) for w in weathers) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _differences_markdown(report: dict) -> str:
    if not report.get("differences"):
        return ""
    weathers = report["weathers"]
    cols = ["mean ΔPSNR ± SE", *weathers, "per-seed Δ (mean ± std, n)"]
    lines = ["", "Paired differences in PSNR (dB), image by image on the same test images; SE is the standard "
             "error over the images:", "", "| A − B | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for d in report["differences"]:
        def pm(x: dict) -> str:  # one image has no standard error
            return f" ± {x['se']:.2f}" if x["se"] is not None else f" ({x['n_images']} image, no SE)"

        cells = [f"**{d['mean']:+.2f}**{pm(d)}"]
        cells += [f"{d['weathers'][w]['mean']:+.2f}{pm(d['weathers'][w])}" if w in d["weathers"] else "—"
                  for w in weathers]
        s = d.get("per_seed")
        cells.append(f"{s['mean']:+.2f} ± {s['std']:.2f}, {s['n']}" if s else "—")
        lines.append(f"| {d['a']} − {d['b']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cost_sizes(report: dict) -> tuple[int, int]:
    costs = [r["cost"] for r in report["rows"] if "cost" in r]
    return (costs[0]["flops_size"], costs[0]["latency_size"]) if costs else (256, 256)


def write(report: dict, text: str, out: Path, figures_to: Path | None = None) -> list:
    """``out`` (markdown), the same name with ``.json``, and with ``.html`` (``html``); the
    figures also as PNG files in ``figures_to``. Returns the figures (``figures.Drawn``)."""
    atomic_write_json(out.with_suffix(".json"), report)
    atomic_write_text(out, text)
    return html(report, text, out.with_suffix(".html"), figures_to)


def html(report: dict, text: str, out: Path, figures_to: Path | None = None) -> list:
    """``report.html``: one self-contained page, the tables and every figure inlined. The grid of
    restorations runs the report's exported models now, so it can be redrawn from the JSON at any time."""
    from weatherkd.commands.report import figures as drawing, page

    figures, notes = drawing.draw(report)
    atomic_write_text(out, page.page(report, text, figures, notes))
    if figures_to is not None:
        for d in figures:
            atomic_write_bytes(Path(figures_to) / f"{d.name}.png", d.png)
    for note in notes:
        print(f"report.html: {note}", file=sys.stderr)
    return figures


def track(report: dict, out_dir: Path, figures: list | None = None) -> Path:
    """The comparison as a W&B run (job type report) in the pipeline's group: the table with every
    ± column (each seeded row's spread and n, per weather too, and clean-in PSNR), the paired
    differences with their standard errors per weather and their per-seed spread, the held-out
    set's two tables when the report has one, and the report's figures as images."""
    from weatherkd import tracking

    tables = {}
    for prefix, rep in (("report", report), ("report/heldout", report.get("heldout"))):
        if rep:
            tables[f"{prefix}/comparison"] = _comparison_table(rep)
            tables[f"{prefix}/differences"] = _differences_table(rep)
    images = {}
    for d in figures or []:
        from PIL import Image

        images[f"report/figures/{d.name}"] = np.asarray(Image.open(io.BytesIO(d.png)).convert("RGB"))
    return tracking.log_tables("report", out_dir, tables, images)


def _comparison_table(report: dict) -> tuple[list[str], list[list]]:
    weathers = report["weathers"]
    columns = ["model", "runs", *(f"{w}_{m}{s}" for w in weathers for m in ("psnr", "ssim") for s in ("", "_std")),
               "mean_psnr", "mean_psnr_std", "mean_ssim", "mean_ssim_std", "clean_in_psnr", "clean_in_psnr_std",
               "params", "gflops", "latency_ms", "random_init"]
    rows = []
    for r in report["rows"]:
        c, std = r.get("cost") or {}, r.get("std") or {}
        per_weather = []
        for w in weathers:
            for m in ("psnr", "ssim"):
                per_weather += [r["weathers"][w][m], std.get("weathers", {}).get(w, {}).get(m)]
        rows.append([r["name"], r.get("runs", 1 if r["name"] != "identity" else None), *per_weather,
                     r["mean"]["psnr"], std.get("mean", {}).get("psnr"), r["mean"]["ssim"],
                     std.get("mean", {}).get("ssim"), (r.get("clean_in") or {}).get("psnr"),
                     (std.get("clean_in") or {}).get("psnr"), c.get("params"), c.get("gflops"), c.get("latency_ms"),
                     bool(r.get("random_init"))])
    return columns, rows


def _differences_table(report: dict) -> tuple[list[str], list[list]]:
    weathers = report["weathers"]
    columns = ["a", "b", "mean_dpsnr", "se", "n_images", *(f"{w}_{x}" for w in weathers for x in ("dpsnr", "se")),
               "per_seed_mean", "per_seed_std", "seeds"]
    rows = []
    for d in report["differences"]:
        per_seed = d.get("per_seed") or {}
        per_weather = []
        for w in weathers:
            per_weather += [d["weathers"].get(w, {}).get("mean"), d["weathers"].get(w, {}).get("se")]
        rows.append([d["a"], d["b"], d["mean"], d["se"], d["n_images"], *per_weather, per_seed.get("mean"),
                     per_seed.get("std"), per_seed.get("n")])
    return columns, rows


def document(report: dict) -> str:
    """The whole markdown report: the table and its notes, then the held-out set's when there is one."""
    text = markdown(report)
    held = report.get("heldout")
    if held:
        about = report.get("heldout_about")
        text += (f"\n### {report.get('heldout_title', 'Held-out set')}\n\n" + (f"{about}\n\n" if about else "")
                 + markdown(held))
    return text


def _redraw(source: Path, args) -> int:
    """``weatherkd report REPORT.json``: the page and figures again from a report already written."""
    try:
        report = json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: not a readable report ({e})") from None
    if not isinstance(report, dict) or "rows" not in report:
        raise UserError(f"{source}: not a report.json written by `weatherkd report` or `weatherkd demo`")
    page = (Path(args.out) if args.out else source).with_suffix(".html")
    figures = html(report, document(report), page, Path(args.figures_to) if args.figures_to else None)
    from weatherkd import tracking

    if tracking.wanted(args.tracker):
        track(report, source.parent, figures)
    shown = f" and {len(figures)} PNGs in {args.figures_to}" if args.figures_to else ""
    print(f"{page}{shown}: {', '.join(d.name for d in figures)}")
    return 0


def run_cli(args) -> int:
    if len(args.runs) == 1 and Path(args.runs[0]).suffix == ".json":
        return _redraw(Path(args.runs[0]), args)
    if args.out and Path(args.out).suffix == ".json":
        raise UserError(f"--out names the markdown file (the JSON goes next to it), not {args.out}")
    diffs = []
    for d in args.diff or []:
        a, sep, b = d.partition(":")
        if not sep or not a or not b:
            raise UserError(f"--diff takes A:B, two row names (got '{d}')")
        diffs.append((a, b))
    report = gather(args.runs, latency_size=args.latency_size, diffs=diffs)
    text = markdown(report)
    figures_to = Path(args.figures_to) if args.figures_to else None
    from weatherkd import tracking

    figures = None
    if args.out:
        figures = write(report, text, Path(args.out), figures_to)
    elif figures_to is not None or tracking.wanted(args.tracker):
        from weatherkd.commands.report import figures as drawing

        figures, _ = drawing.draw(report)
        for d in figures if figures_to is not None else []:
            atomic_write_bytes(figures_to / f"{d.name}.png", d.png)
    if tracking.wanted(args.tracker):
        track(report, Path(args.out).parent if args.out else Path("runs") / "report", figures)
    print(text, end="")
    return 0
