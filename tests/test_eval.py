"""`weatherkd eval`, `bench model`, `bench step` and `report`, run as a user runs them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import accelerate_launch, make_set, run_cli, refused
from weatherkd import metrics, models
from weatherkd.commands import report
from weatherkd.errors import UserError
from weatherkd.commands import evaluate
from weatherkd.data.check import iter_tar
from weatherkd.data.samples import decode_sample
from weatherkd.data.shards import open_set


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    """Uneven counts per weather (7 samples over 2 ranks), images big enough for SSIM and tiling."""
    path = tmp_path_factory.mktemp("eval") / "set"
    make_set(path, {("test", "rain_haze"): 3, ("test", "raindrop"): 2, ("test", "snow"): 2}, size=40, shard_size=2)
    return path


def save_model(path, arch="residual_cnn", **kwargs):
    torch.manual_seed(0)
    model = models.build(arch, **(kwargs or {"width": 8, "depth": 3}))
    if arch == "residual_cnn":  # its last layer starts at zero (output = input); make it do something
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
    models.save(model, path, extra={"random_init": True})
    return path


def test_sharded_eval_is_exactly_once_and_matches_the_uint8_metrics(eval_set, tmp_path):
    model_dir = save_model(tmp_path / "run" / "model")
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("eval", "--model", model_dir, "--shards", eval_set, "--out", one, "--protocol", "y")
    accelerate_launch(["weatherkd", "eval", "--model", model_dir, "--shards", eval_set, "--out", two,
                       "--protocol", "y", "--workers", "2"], module=True)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert a["n"] == b["n"] == 7 and b["world_size"] == 2
    assert a["protocol"] == "y" and a["random_init"] is True
    assert {w: v["n"] for w, v in b["weathers"].items()} == {"rain_haze": 3, "raindrop": 2, "snow": 2}
    assert a["mean"]["psnr"] == pytest.approx(b["mean"]["psnr"], abs=1e-9)
    rows = json.loads((two / "samples.json").read_text())
    assert len({r["key"] for r in rows}) == len(rows) == 7

    # Every per-sample figure agrees with the uint8 reference metrics on the same prediction.
    model = models.load(model_dir).eval()
    shard_set = open_set(eval_set)
    by_key = {r["key"]: r for r in rows}
    for s in shard_set.shards("test"):
        for raw in iter_tar(shard_set.dir / s["file"]):
            sample = decode_sample(raw)
            with torch.no_grad():
                x = torch.from_numpy(sample["input"]).permute(2, 0, 1)[None].float() / 255
                pred = (model(x).clamp(0, 1)[0].permute(1, 2, 0).double().numpy() * 255).round().astype(np.uint8)
                y = torch.from_numpy(sample["target"]).permute(2, 0, 1)[None].float() / 255
                clean = (model(y).clamp(0, 1)[0].permute(1, 2, 0).double().numpy() * 255).round().astype(np.uint8)
            row = by_key[sample["__key__"]]
            assert row["psnr"] == pytest.approx(metrics.psnr(pred, sample["target"], "y"), abs=1e-6)
            # clean in: the target restored, scored against itself
            assert row["clean_psnr"] == pytest.approx(metrics.psnr(clean, sample["target"], "y"), abs=1e-6)
            assert row["ssim"] == pytest.approx(metrics.ssim(pred, sample["target"], "y"), abs=1e-6)
            assert row["id_psnr"] == pytest.approx(metrics.psnr(sample["input"], sample["target"], "y"), abs=1e-6)
            assert row["origin"] == sample["meta"]["origin"]  # the photo, for the report's per-photo table

    example = np.asarray(Image.open(two / "examples" / "rain_haze.png"))
    assert example.shape == (40, 120, 3)  # input | output | target
    assert "| identity |" in (two / "metrics.md").read_text() and "random weights" in (two / "metrics.md").read_text()
    assert b["clean_in"]["psnr"] == pytest.approx(a["clean_in"]["psnr"], abs=1e-9)
    for weather, figures in a["removal"].items():  # summed over every image, whichever rank scored it
        assert b["removal"][weather] == pytest.approx(figures)
    assert b["clean_in"]["min"] == pytest.approx(min(r["clean_psnr"] for r in rows))


def test_tiled_eval_equals_whole_image_eval(eval_set, tmp_path):
    """A 7-pixel receptive field (radius 3) fits in the quarter of the 16-pixel overlap that the
    blend never uses, so tiles change nothing."""
    model_dir = save_model(tmp_path / "model")
    whole, tiles = tmp_path / "whole", tmp_path / "tiles"
    evaluate.evaluate(model_dir, eval_set, whole, tracker="none")  # in process: the CLI is tested above
    evaluate.evaluate(model_dir, eval_set, tiles, tile=24, overlap=16, tracker="none")
    a, b = (json.loads((d / "samples.json").read_text()) for d in (whole, tiles))
    # Equal up to float rounding in the blend, which can move a pixel across a uint8 level (1e-5 dB).
    assert [r["psnr"] for r in a] == pytest.approx([r["psnr"] for r in b], abs=1e-4)
    # ...and tiles are really used: a 25-pixel receptive field does not fit, so the figures move.
    deep = save_model(tmp_path / "deep", width=8, depth=12)
    evaluate.evaluate(deep, eval_set, whole, tracker="none")
    evaluate.evaluate(deep, eval_set, tiles, tile=24, overlap=16, tracker="none")
    a, b = (json.loads((d / "samples.json").read_text()) for d in (whole, tiles))
    moved = max(abs(x["psnr"] - y["psnr"]) for x, y in zip(a, b))
    assert moved > 1e-3, moved


def test_eval_errors_are_clear(eval_set, tmp_path):
    model_dir = save_model(tmp_path / "model")
    (tmp_path / "not-a-model").mkdir()
    cases = [
        (dict(model_dir=tmp_path / "not-a-model", shards=eval_set), "model.json is missing"),
        (dict(model_dir=model_dir, shards=tmp_path / "nowhere"), "shard set not found"),
        (dict(model_dir=model_dir, shards=eval_set, split="train"), "has no 'train' split"),
        (dict(model_dir=model_dir, shards=eval_set, tile=16, overlap=16), "--overlap must be"),
    ]
    for kwargs, message in cases:  # in process; the command line's one-line form is checked once below
        with pytest.raises(UserError, match=message):
            evaluate.evaluate(**kwargs, tracker="none")
    proc = refused("eval", "--model", tmp_path / "not-a-model", "--shards", eval_set)
    assert proc.returncode == 1 and "model.json is missing" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_model_reports_cost_of_the_exported_teacher(tmp_path):
    net = {"size": "tiny", "prior_dim": 64, "text_dim": 32}
    model_dir = save_model(tmp_path / "teacher", "clipweather", net=net, clip_image="wkd-tiny-vit")
    out = json.loads(run_cli("bench", "model", model_dir, "--size", 64, "--repeats", 3).stdout)
    model = models.load(model_dir)
    assert out["params"] == sum(p.numel() for p in model.parameters())
    assert out["arch"] == "clipweather" and out["random_init"] is True
    assert out["gflops_256"] > 0.1 and 0 < out["latency_ms"]["min"] <= out["latency_ms"]["median"]
    if out["peak_memory"]["kind"] != "unavailable":  # /proc/self/clear_refs may be read-only
        assert out["peak_memory"]["mb"] > 0


def test_bench_step_reports_throughput_and_mfu(builtin_set):
    out = json.loads(run_cli("bench", "step", "--config", "configs/distill/demo.yaml", "--steps", 2,
                             "--warmup", 1, "objective=scratch", f"data.train_shards={builtin_set}",
                             "data.crop=32").stdout)
    assert out["stage"] == "distill" and out["arch"] == "unet_bn"
    assert out["samples_per_s"] > 0 and out["gflops_per_step"] > 0
    assert 0 < out["mfu"] < 1
    assert out["achieved_gflops_per_s"] == pytest.approx(out["gflops_per_step"] / out["seconds_per_step"])


def test_report_tabulates_identity_then_each_run(eval_set, tmp_path):
    for name, width in (("small", 4), ("wide", 16)):
        save_model(tmp_path / name / "model", width=width, depth=3)
    # Several models in one eval launch: one folder per model's run under --out.
    run_cli("eval", "--model", tmp_path / "small" / "model", tmp_path / "wide" / "model", "--shards", eval_set,
            "--out", tmp_path / "evals")
    runs = [tmp_path / "evals" / "small", tmp_path / "evals" / "wide"]
    out = tmp_path / "report.md"
    table = run_cli("report", *runs, "--out", out, "--latency-size", 64).stdout
    assert out.read_text() == table
    main, rest = table.split("Removal and damage", 1)
    removal, rest = rest.split("Per photo:", 1)
    photos, differences = rest.split("Paired differences", 1)

    def first_cells(text):
        return [ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| ")]
    assert first_cells(main)[1:] == ["identity", "small †", "wide †"]
    assert "clean-in PSNR" in main.splitlines()[0]
    assert first_cells(removal)[1:] == ["small †", "wide †"]  # where each row's change comes from
    assert first_cells(photos) == ["photo", "photo0", "photo1"]  # make_set's samples name two photos
    assert first_cells(differences)[1:] == ["small − identity", "wide − identity"]
    report_json = json.loads(out.with_suffix(".json").read_text())
    small, wide = report_json["rows"][1:]
    assert small["cost"]["params"] < wide["cost"]["params"] and small["cost"]["gflops"] < wide["cost"]["gflops"]
    assert report_json["rows"][0]["mean"] == json.loads((runs[0] / "metrics.json").read_text())["identity"]["mean"]

    # Runs that do not compare are refused (in process: the command line's one-line form is below).
    evaluate.evaluate(tmp_path / "wide" / "model", eval_set, tmp_path / "y", protocol="y", tracker="none")
    with pytest.raises(UserError, match="different protocols"):
        report.gather([runs[0], tmp_path / "y"], latency_size=64)
    other_set = tmp_path / "other-set"
    make_set(other_set, {("test", "rain_haze"): 3, ("test", "raindrop"): 2, ("test", "snow"): 2}, size=40, seed=1)
    evaluate.evaluate(tmp_path / "wide" / "model", other_set, tmp_path / "other", tracker="none")
    with pytest.raises(UserError, match="different data \\(shards"):
        report.gather([runs[0], tmp_path / "other"], latency_size=64)
    proc = refused("report", *runs, "--out", tmp_path / "r.json")
    assert proc.returncode == 1 and "not " in proc.stderr and not (tmp_path / "r.json").exists()
