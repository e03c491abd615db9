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
