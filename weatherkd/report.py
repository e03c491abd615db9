"""`weatherkd report RUN_DIR...`: several runs' metrics and costs in one table.

A RUN_DIR is a stage's ``out_dir`` (``metrics.json`` + ``model/``) or a ``weatherkd eval`` output
(whose ``metrics.json`` names its model). Rows: identity, then each run in the order given.
Costs are measured now, in this process, so the latency column compares like with like.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from weatherkd import cost, models
from weatherkd.errors import UserError
from weatherkd.io import atomic_write_json, atomic_write_text
from weatherkd.placement import place


def _load_run(run_dir: Path) -> dict:
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise UserError(f"{run_dir}: no metrics.json (not a finished run or eval output)")
    metrics = json.loads(metrics_file.read_text())
    model_dir = Path(metrics["model"]) if "model" in metrics else run_dir / "model"
    name = model_dir.resolve().parent.name if "model" in metrics else run_dir.resolve().name
    models.read_spec(model_dir)  # a clear error when the model folder is missing
    return {"name": name, "dir": str(run_dir), "model": str(model_dir), "metrics": metrics}


def gather(run_dirs: list, latency_size: int = 256, device: str | None = None) -> dict:
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
    for r in runs:
        r["cost"] = cost.summary(models.load(r["model"]), latency_size=latency_size, device=device)
    first = runs[0]["metrics"]
    rows = [{"name": "identity", "weathers": first["identity"]["weathers"], "mean": first["identity"]["mean"]}]
    for r in runs:
        m = r["metrics"]
        rows.append({"name": r["name"], "weathers": m["weathers"], "mean": m["mean"], "cost": r["cost"],
                     "random_init": bool(m.get("random_init")), "model": r["model"], "dir": r["dir"]})
    return {"protocol": first["protocol"], "n": first["n"], "weathers": list(first["weathers"]), "rows": rows,
            "device": device, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "date": time.strftime("%Y-%m-%d")}


def markdown(report: dict) -> str:
    weathers = report["weathers"]
    sizes = _cost_sizes(report)
    cols = [*(f"{w} PSNR/SSIM" for w in weathers), "mean PSNR/SSIM", "params", f"GFLOPs@{sizes[0]}",
            f"latency ms@{sizes[1]}"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row in report["rows"]:
        cells = [f"{row['weathers'][w]['psnr']:.2f} / {row['weathers'][w]['ssim']:.3f}" for w in weathers]
        cells.append(f"**{row['mean']['psnr']:.2f}** / {row['mean']['ssim']:.3f}")
        c = row.get("cost")
        cells += [f"{c['params'] / 1e6:.3f} M", f"{c['gflops']:.2f}", f"{c['latency_ms']:.1f}"] if c else ["—"] * 3
        name = row["name"] + (" †" if row.get("random_init") else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [f"Protocol `{report['protocol']}`, {report['n']} samples; latency on {report['device']} "
             f"({report['machine']}), {report['date']}."]
    if any(r.get("random_init") for r in report["rows"]):
        notes.append("† built with random pretrained towers (allow_random_init): a pipeline check, not a result.")
    notes += report.get("notes", [])
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _cost_sizes(report: dict) -> tuple[int, int]:
    costs = [r["cost"] for r in report["rows"] if "cost" in r]
    return (costs[0]["flops_size"], costs[0]["latency_size"]) if costs else (256, 256)


def write(report: dict, text: str, out: Path) -> None:
    """``out`` (markdown) and the same name with ``.json``."""
    atomic_write_json(out.with_suffix(".json"), report)
    atomic_write_text(out, text)


def track(report: dict, out_dir: Path) -> Path:
    """The comparison table as a W&B run (job type report) in the pipeline's group."""
    from weatherkd import tracking

    weathers = report["weathers"]
    columns = ["model", *(f"{w}_{m}" for w in weathers for m in ("psnr", "ssim")), "mean_psnr", "mean_ssim",
               "params", "gflops", "latency_ms", "random_init"]
    rows = []
    for r in report["rows"]:
        c = r.get("cost") or {}
        rows.append([r["name"], *(r["weathers"][w][m] for w in weathers for m in ("psnr", "ssim")),
                     r["mean"]["psnr"], r["mean"]["ssim"], c.get("params"), c.get("gflops"), c.get("latency_ms"),
                     bool(r.get("random_init"))])
    return tracking.log_tables("report", out_dir, {"report/comparison": (columns, rows)})


def run_cli(args) -> int:
    if args.out and Path(args.out).suffix == ".json":
        raise UserError(f"--out names the markdown file (the JSON goes next to it), not {args.out}")
    report = gather(args.runs, latency_size=args.latency_size)
    text = markdown(report)
    if args.out:
        write(report, text, Path(args.out))
    from weatherkd import tracking

    if tracking.wanted(args.tracker):
        track(report, Path(args.out).parent if args.out else Path("runs") / "report")
    print(text, end="")
    return 0
