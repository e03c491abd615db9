"""`weatherkd demo`: every stage a real launch, failures named, interrupted demos resumed.

The default run uses `--quick` (the same stages and launches, a few steps each). The full demo,
with the issue's quality bars, is marked slow: `python -m pytest -m slow tests/test_demo.py`.
"""

import json
import shutil

import pytest

from conftest import cli_env, run_cli
from tiny_sd import save_tiny_sd


def demo(out, shards, *extra, check=True):
    return run_cli("demo", "--quick", "--out", out, "--shards", shards, *extra, check=check, timeout=900,
                   env=cli_env())


def test_failed_stage_is_named_with_its_log(tmp_path):
    out, shards = tmp_path / "out", tmp_path / "shards"
    for name in ("teacher", "vq", "distill-scratch"):  # "finished" stages whose models are missing
        (out / name).mkdir(parents=True)
        (out / name / "metrics.json").write_text("{}")
    proc = demo(out, shards, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    # cache-teacher is the first stage that runs, and it needs the missing teacher
    assert "demo stage 'cache-teacher' failed" in last and str(out / "logs" / "cache-teacher.log") in last
    assert "teacher: done already" in proc.stdout and "vq:" not in proc.stdout  # it stopped at cache-teacher
    assert (shards / "manifest.json").is_file()
    assert "error: teacher: " in (out / "logs" / "cache-teacher.log").read_text()  # each rank's one line


def test_quick_demo_runs_every_stage_and_resumes_a_half_done_one(tmp_path):
    out, shards = tmp_path / "out", tmp_path / "shards"
    first = demo(out, shards).stdout
    for line in ("accelerate launch --config_file launch/cpu-zero2.yaml --num_processes 2 -m weatherkd teacher",
                 "accelerate launch --config_file launch/cpu-ddp.yaml --num_processes 2 -m weatherkd distill",
                 "-m weatherkd eval --model"):
        assert line in first
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["identity", "teacher", "distill-scratch", "distill-kd",
                                                   "distill-dckd", "distill-dream", "prune", "distill-pruned"]
    teacher, students = report["rows"][1], report["rows"][2:6]
    assert teacher["random_init"] and all(s["cost"]["gflops"] * 5 < teacher["cost"]["gflops"] for s in students)
    # The data-free rows: dreamed inputs only, and the pruned teacher's FLOPs cut, against their targets.
    assert json.loads((out / "dream-shards" / "manifest.json").read_text())["has_target"] == {"train": False}
    assert set(report["targets"]) == {"dream_share_of_kd_gain", "pruned_flops_cut", "pruned_psnr_drop",
                                      "pruned_psnr_drop_before_distill", "teacher_weathers_worse_than_identity",
                                      "clean_in_below_bar", "heldout_worst_weather_vs_identity"}
    assert report["targets"]["pruned_flops_cut"] >= 0.4
    assert json.loads((out / "distill-pruned" / "model" / "model.json").read_text())["arch"] == "pruned"
    assert (out / "eval" / "distill-kd" / "examples" / "snow.png").is_file()
    # every model again on the held-out check: other photos, another generator
    held = report["heldout"]
    assert [r["name"] for r in held["rows"]] == [r["name"] for r in report["rows"]]
    assert set(report["targets"]["heldout_worst_weather_vs_identity"]) == {r["name"] for r in held["rows"][1:]}
    assert "Held-out check" in (out / "report.md").read_text()
    # The page, and every exported model's card with both evaluations in it.
    page = (out / "report.html").read_text()
    for figure in ("frontier", "gains", "grid", "grid-heldout", "clean-in"):
        assert f'<figure id="{figure}">' in page
    for name in ("teacher", "distill-kd", "prune", "distill-pruned"):
        model_card = (out / name / "model" / "README.md").read_text()
        assert model_card.startswith("---\nlibrary_name: weatherkd") and model_card.count("<!-- weatherkd-eval ") == 2

    # dckd as if killed after its step-2 checkpoint: no result, the later checkpoint gone.
    dckd = out / "distill-dckd"
    for path in (dckd / "metrics.json", dckd / "model", out / "eval" / "distill-dckd", dckd / "checkpoints" /
                 "step-0000004"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (dckd / "checkpoints" / "latest").write_text("step-0000002")
    second = demo(out, shards).stdout
    for name in ("shards", "teacher", "vq", "distill-scratch", "distill-kd"):
        assert f"{name}: done already" in second
    assert "] eval: accelerate launch" in second  # dckd's evaluation was gone, so the evaluations rerun
    assert "distill-dckd: accelerate launch" in second
    assert "resumed from" in (out / "logs" / "distill-dckd.log").read_text().split("\n# ")[-1]
    assert json.loads((dckd / "metrics.json").read_text())["step"] == 4
    main, heldout = (out / "report.md").read_text().split("### Held-out check")
    table, removal, photos, differences = _sections(main)
    assert table.count("| distill-") == 5 and removal.count("| distill-") == 5
    held_table, held_removal, held_photos, held_differences = _sections(heldout)
    assert (held_table.count("| distill-"), held_removal.count("| distill-"), held_differences.count("| distill-")) == (
        5, 5, 5)  # rows, where their changes come from, then against identity
    assert "| camera |" in held_photos and "| brick |" in held_photos  # per photo: the held-out set's own photos
    assert photos.count("\n| ") >= 2  # the header and at least one test photo
    assert "| distill-dckd − distill-kd |" in differences and "| distill-kd − distill-scratch |" in differences
    assert "No D4IR row" in (out / "report.md").read_text()


def _sections(report_md: str) -> tuple[str, str, str, str]:
    """A report's table, its removal-and-damage table, its per-photo table and its paired differences."""
    table, rest = report_md.split("Removal and damage", 1)
    removal, rest = rest.split("Per photo:", 1)
    photos, differences = rest.split("Paired differences", 1)
    return table, removal, photos, differences


@pytest.mark.slow
def test_quick_demo_with_sd_path_adds_the_d4ir_student(tmp_path):
    """With --sd-path the data-free D4IR student joins. (A tiny random SD here: this checks the wiring
    only, which is why the demo adds the row only when asked.) The stages themselves are tested in
    test_synth.py, and the plan in tests/unit/test_demo_plan.py; this runs it end to end (~6 min)."""
    out, shards = tmp_path / "out", tmp_path / "shards"
    sd = save_tiny_sd(tmp_path / "sd", cross_attention_dim=32)
    third = demo(out, shards, "--sd-path", sd).stdout
    assert "synth: accelerate launch" in third and "prompt.width=32" in third
    rows = [r["name"] for r in json.loads((out / "report.json").read_text())["rows"]]
    assert rows[-1] == "distill-d4ir" and "No D4IR row" not in (out / "report.md").read_text()
    synth_manifest = json.loads((out / "d4ir-shards" / "manifest.json").read_text())
    assert synth_manifest["has_target"] == {"train": False}


@pytest.mark.slow
@pytest.mark.xfail(reason="issue 21: on the 2026-12-03 demo every model still loses more than 0.5 dB to identity "
                          "on the held-out check, kd no longer beats scratch, and the dreamed student recovers 32% "
                          "of kd's gain, not 50%", strict=False)
def test_full_demo_meets_the_quality_bars(tmp_path):
    """About 22 minutes on 2 CPU cores."""
    out, shards = tmp_path / "out", tmp_path / "shards"
    run_cli("demo", "--out", out, "--shards", shards, timeout=1800)
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    psnr = {name: r["mean"]["psnr"] for name, r in rows.items()}
    assert psnr["teacher"] >= psnr["identity"] + 1.0
    assert psnr["distill-kd"] > psnr["distill-scratch"] and psnr["distill-dckd"] > psnr["distill-scratch"]
    # The data-free targets: the dreamed student recovers half of KD's gain; the pruned teacher is 40% cheaper.
    targets = json.loads((out / "report.json").read_text())["targets"]
    assert targets["dream_share_of_kd_gain"] >= 0.5 and targets["pruned_flops_cut"] >= 0.4
    # Safe on a user's photos: the teacher beats identity on every weather, every model returns a
    # clean photo at 35 dB or better, and none loses 0.5 dB to identity on the held-out check.
    assert targets["teacher_weathers_worse_than_identity"] == []
    assert targets["clean_in_below_bar"] == {}
    assert min(targets["heldout_worst_weather_vs_identity"].values()) >= -0.5
