"""W&B tracking, for real, offline: values logged come back out of the run folder."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import cli_env

SCRIPT = """
import sys, numpy as np
from accelerate import Accelerator
from weatherkd.config import TrackerConfig
from weatherkd.tracking import Tracker
out, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
acc = Accelerator(cpu=True, log_with=["wandb"])
tracker = Tracker(acc, TrackerConfig(), out, {"lr": 0.1})
for step in range(first, last):
    tracker.log({"loss": 1.0 / (step + 1), "lr": 0.01 * step}, step=step)
tracker.log_images({"grid": [np.full((8, 8, 3), 200, np.uint8)]}, step=last - 1)
tracker.finish()
print(tracker.run_dir)
"""


def _history(run_dir: Path) -> list[dict]:
    wandb = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                         text=True, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def test_offline_scalars_and_images_read_back_and_resume_keeps_the_run(tmp_path):
    env = cli_env()
    env.pop("WANDB_MODE")  # let the tracker choose: no API key -> offline
    env["HOME"] = str(tmp_path)  # no ~/.netrc with a key either
    runs = []
    for first, last in ((0, 3), (3, 5)):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run"), str(first), str(last)],
                              capture_output=True, text=True, env=env, check=True)
        runs.append(Path(proc.stdout.strip().splitlines()[-1]))
    assert all(r.name.startswith("offline-run-") for r in runs)
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert all(r.name.endswith(run_id) for r in runs), "a resumed run must continue the same W&B run"

    first, second = _history(runs[0]), _history(runs[1])
    scalars = {h["_step"]: h for h in first + second if "loss" in h}
    assert sorted(scalars) == [0, 1, 2, 3, 4]
    for step, h in scalars.items():
        assert abs(h["loss"] - 1.0 / (step + 1)) < 1e-9 and abs(h["lr"] - 0.01 * step) < 1e-9
    assert list((runs[1] / "files" / "media" / "images").glob("grid_*.png"))


def _records(run_dir: Path, kind: str) -> list[dict]:
    wandb = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                         text=True, check=True).stdout
    return [json.loads(line)[kind] for line in out.splitlines() if line.startswith("{") and f'"type":"{kind}"' in line]


def _table(run_dir: Path, name: str) -> dict:
    (path,) = (run_dir / "files" / "media" / "table").glob(f"{name}_*.table.json")
    return json.loads(path.read_text())


def test_a_pipeline_is_one_group_with_stage_job_types_and_eval_and_report_tables(tmp_path):
    """Also: a 2-process run with W&B on ends cleanly (ending the tracker ends the process group)."""
    from conftest import accelerate_launch, make_set, run_cli

    env = cli_env(WEATHERKD_PIPELINE="pipe-t", HOME=str(tmp_path))
    env.pop("WANDB_MODE")  # no API key -> offline, as a user without one gets
    shards = tmp_path / "set"
    make_set(shards, {("train", "snow"): 6, ("train", "raindrop"): 6, ("test", "snow"): 2, ("test", "raindrop"): 2},
             size=40)
    student = tmp_path / "distill-scratch"
    accelerate_launch(["weatherkd", "distill", "--config", "configs/distill/demo.yaml", "objective=scratch",
                       f"out_dir={student}", f"data.train_shards={shards}", "data.crop=32", "data.num_workers=0",
                       "train.max_steps=2", "train.eval_every=2", "ckpt.every=2", "train.log_every=1"],
                      module=True, env=env)
    run_cli("eval", "--model", student / "model", "--shards", shards, "--out", tmp_path / "eval" / "scratch", env=env)
    run_cli("report", tmp_path / "eval" / "scratch", "--out", tmp_path / "report" / "report.md", env=env)

    runs = {}
    for folder in (student, tmp_path / "eval" / "scratch", tmp_path / "report"):
        (run_dir,) = (folder / "wandb").glob("offline-run-*")
        (record,) = _records(run_dir, "run")
        runs[record["job_type"]] = (record, run_dir)
    assert set(runs) == {"distill", "eval", "report"}
    assert {r["run_group"] for r, _ in runs.values()} == {"pipe-t"}
    assert runs["distill"][0]["display_name"] == "pipe-t/distill-scratch"
    assert all("pipe-t" in r["display_name"] and job in r["display_name"] for job, (r, _) in runs.items())

    table = _table(runs["eval"][1], "eval/per_weather")
    metrics = json.loads((tmp_path / "eval" / "scratch" / "metrics.json").read_text())
    by_weather = {row[1]: row for row in table["data"]}
    assert set(by_weather) == {"snow", "raindrop", "mean"}
    assert abs(by_weather["snow"][table["columns"].index("psnr")] - metrics["weathers"]["snow"]["psnr"]) < 1e-9
    assert list((runs["eval"][1] / "files" / "media" / "images" / "eval" / "examples").glob("snow_*.png"))
    report = _table(runs["report"][1], "report/comparison")
    assert [row[0] for row in report["data"]] == ["identity", "distill-scratch"]
    assert report["columns"][-4:] == ["params", "gflops", "latency_ms", "random_init"]
    student_row = report["data"][1]
    clean_in = metrics["clean_in"]["psnr"]
    assert abs(student_row[report["columns"].index("clean_in_psnr")] - clean_in) < 1e-9
    diffs = _table(runs["report"][1], "report/differences")
    (row,) = diffs["data"]  # the student against identity, image by image
    col = diffs["columns"].index
    assert row[:2] == ["distill-scratch", "identity"] and row[col("se")] is not None
    report_json = json.loads((tmp_path / "report" / "report.json").read_text())
    assert abs(row[col("mean_dpsnr")] - report_json["differences"][0]["mean"]) < 1e-9
    # The ± columns and the per-weather standard errors are kept, and the page's figures go along as images.
    assert {"mean_psnr_std", "snow_psnr_std", "snow_ssim_std", "clean_in_psnr_std"} <= set(report["columns"])
    assert {"n_images", "snow_dpsnr", "snow_se", "raindrop_se", "per_seed_std"} <= set(diffs["columns"])
    assert row[col("snow_se")] == report_json["differences"][0]["weathers"]["snow"]["se"]
    figures = runs["report"][1] / "files" / "media" / "images" / "report" / "figures"
    assert {p.name.split("_")[0] for p in figures.glob("*.png")} == {"frontier", "gains", "grid", "clean-in"}
    assert (tmp_path / "report" / "report.html").is_file()
