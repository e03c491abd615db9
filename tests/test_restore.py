"""`weatherkd restore` on a user's folder, as a user runs it, and `weatherkd export` to ONNX,
checked against PyTorch and restored through."""

import json
import re

import numpy as np
import onnx
import pytest
import tifffile
import torch
from PIL import Image, ImageOps

from conftest import accelerate_launch, run_cli, refused
from weatherkd import config as cfgmod
from weatherkd import models
from weatherkd.data import image_files
from weatherkd.data.shards import open_set
from weatherkd.errors import UserError
from weatherkd.models import deployed, pruned
from weatherkd.commands import export
from weatherkd.commands import prune
from weatherkd.commands import restore


def photo(h, w, seed=0, c=3, dtype=np.uint8):
    top = np.iinfo(dtype).max
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(np.sin(xx / 7 + k) * np.cos(yy / 5 - k) + 1) / 2 for k in range(c)], -1)
    noise = np.random.default_rng(seed).random((h, w, c)) * 0.1
    return (np.clip(smooth * 0.9 + noise, 0, 1) * top).astype(dtype)


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory):
    """A residual CNN whose last layer is zero: output = input exactly, so precision is checkable."""
    net = models.build("residual_cnn", width=8, depth=3)
    torch.nn.init.zeros_(net.body[-1].weight)
    torch.nn.init.zeros_(net.body[-1].bias)
    return models.save(net, tmp_path_factory.mktemp("m") / "identity", extra={"random_init": True})


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The demo's student arch with random (non-identity) weights."""
    torch.manual_seed(0)
    net = models.build("unet_bn", size="tiny")
    torch.nn.init.normal_(net.out[0].weight, 0, 0.02)
    return models.save(net, tmp_path_factory.mktemp("m") / "unet", extra={"random_init": True})


def user_folder(root):
    """What a user's photo folder holds: mixed formats and sizes, and things that are not photos."""
    (root / "trip" / "day2").mkdir(parents=True)
    rotated = Image.fromarray(photo(40, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held sideways: stored 60 wide, shown 40 wide
    rotated.save(root / "trip" / "turned.jpg", exif=exif, quality=95)
    Image.fromarray(photo(33, 47, 1)).save(root / "trip" / "plain.png")
    Image.fromarray(photo(50, 50, 2, c=4), "RGBA").save(root / "trip" / "day2" / "alpha.png")
    Image.fromarray(photo(30, 30, 3)[..., 0], "L").save(root / "trip" / "day2" / "gray.bmp")
    Image.fromarray(photo(64, 80, 4)).save(root / "trip" / "day2" / "web.webp", quality=90)
    tifffile.imwrite(root / "trip" / "scan.tif", photo(24, 36, 5, dtype=np.uint16))
    deep = photo(40, 40, 6, dtype=np.uint16)
    data, _ = image_files.encode(image_files.Photo(deep.astype(np.float32) / 65535, None, 16, False), "png")
    (root / "trip" / "deep.png").write_bytes(data)
    good = (root / "trip" / "plain.png").read_bytes()
    (root / "trip" / "broken.jpg").write_bytes((root / "trip" / "turned.jpg").read_bytes()[:300])
    (root / "trip" / "notes.txt").write_text("not a photo")
    return good, deep


def summary_line(stdout: str) -> dict:
    m = re.search(r"restored (\d+), skipped (\d+), failed (\d+), ([\d.]+) images/s", stdout)
    assert m, stdout
    return {"restored": int(m[1]), "skipped": int(m[2]), "failed": int(m[3])}


def test_restore_a_users_folder_then_rerun(identity_model, tmp_path):
    _, deep = user_folder(tmp_path / "in")
    out = tmp_path / "out"
    proc = run_cli("restore", "--model", identity_model, tmp_path / "in", "--out", out, "--compare", check=False)
    assert proc.returncode == 1, proc.stderr  # one file failed
    assert summary_line(proc.stdout) == {"restored": 7, "skipped": 0, "failed": 1}
    assert "broken.jpg" in proc.stderr and "Traceback" not in proc.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    stems = ["trip/day2/alpha", "trip/day2/gray", "trip/day2/web", "trip/deep", "trip/plain", "trip/scan", "trip/turned"]
    assert written == sorted([f"{s}.png" for s in stems] + [f"{s}_compare.png" for s in stems])

    # The identity model hands every pixel back, so each output is its input at full precision.
    shown = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "in" / "trip" / "turned.jpg")))
    assert shown.shape == (60, 40, 3) and np.array_equal(np.asarray(Image.open(out / "trip" / "turned.png")), shown)
    back = image_files.read(out / "trip" / "deep.png")
    assert back.bits == 16 and np.array_equal(image_files.quantize(back.rgb, 16), deep)
    assert image_files.read(out / "trip" / "scan.png").bits == 16  # 16-bit TIFF -> 16-bit PNG
    alpha_in = np.asarray(Image.open(tmp_path / "in" / "trip" / "day2" / "alpha.png"))
    assert np.array_equal(np.asarray(Image.open(out / "trip" / "day2" / "alpha.png")), alpha_in)
    assert Image.open(out / "trip" / "day2" / "gray.png").mode == "L"
    assert Image.open(out / "trip" / "plain_compare.png").size == (94, 33)  # input | restored

    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = run_cli("restore", "--model", identity_model, tmp_path / "in", "--out", out, "--compare", check=False)
    assert summary_line(again.stdout) == {"restored": 0, "skipped": 7, "failed": 1}
    assert stamp == {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    redo = run_cli("restore", "--model", identity_model, tmp_path / "in" / "trip" / "*.png", "--out", out,
                   "--overwrite", "--format", "jpg", "--quality", "80")
    assert summary_line(redo.stdout) == {"restored": 2, "skipped": 0, "failed": 0}  # plain.png, deep.png
    assert (out / "plain.jpg").is_file() and (out / "deep.jpg").is_file()  # relative to the glob's folder
    assert "jpg holds 8 bits" in redo.stderr


def test_restore_refuses_bad_requests_in_one_line(identity_model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no photos here")
    (tmp_path / "photos").mkdir()
    Image.fromarray(photo(20, 20)).save(tmp_path / "photos" / "a.png")
    (tmp_path / "twin").mkdir()
    Image.fromarray(photo(20, 20)).save(tmp_path / "twin" / "a.png")  # the same name in another folder
    out = tmp_path / "out"
    cases = [
        ((tmp_path / "photos", [tmp_path / "photos"]), "model.json is missing"),
        ((tmp_path / "nowhere", [tmp_path / "photos"]), "no such model folder or file"),
        ((tmp_path / "photos" / "a.png", [tmp_path / "photos"]), "not an exported model"),
        ((identity_model, [tmp_path / "missing"]), "no such file or folder"),
        ((identity_model, [tmp_path / "empty"]), "no image files in"),
        ((identity_model, [tmp_path / "photos" / "*.jpg"]), "no file matches"),
        ((identity_model, [tmp_path / "photos"], tmp_path / "photos"), "would overwrite the input"),
        ((identity_model, [tmp_path / "photos", tmp_path / "twin"]), "would both be written to"),
    ]
    for args, message in cases:
        model, inputs, *dest = args
        with pytest.raises(UserError, match=message):
            restore.restore(model, [str(i) for i in inputs], dest[0] if dest else out)
        assert not out.exists()
    # --out inside the input folder: a rerun does not take the outputs for inputs.
    inside = tmp_path / "photos" / "restored"
    for _ in range(2):
        counts = restore.restore(identity_model, [str(tmp_path / "photos")], inside)
    assert (counts.restored, counts.skipped) == (0, 1) and [p.name for p in inside.iterdir()] == ["a.png"]
    # ...and on the command line each is one line, no traceback.
    proc = refused("restore", "--model", identity_model, tmp_path / "empty", "--out", out)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: no image files in")
    assert "Traceback" not in proc.stderr and not out.exists()


def test_two_processes_restore_each_file_exactly_once(student, tmp_path):
    for i in range(7):
        Image.fromarray(photo(24 + 8 * (i % 3), 32, i)).save(tmp_path / f"p{i}.png")
    out = tmp_path / "out"
    proc = accelerate_launch(["weatherkd", "restore", "--model", student, tmp_path, "--out", out, "--batch-size", 2],
                             module=True)
    assert summary_line(proc.stdout) == {"restored": 7, "skipped": 0, "failed": 0}
    per_rank = {int(r): int(n) for r, n in re.findall(r"rank (\d) of 2: restored (\d+)", proc.stderr)}
    assert sorted(per_rank) == [0, 1] and sum(per_rank.values()) == 7 and min(per_rank.values()) >= 3
    assert sorted(p.name for p in out.iterdir()) == [f"p{i}.png" for i in range(7)]
    # the same outputs as one process writes
    one = tmp_path / "one"
    run_cli("restore", "--model", student, tmp_path / "p*.png", "--out", one)
    for i in range(7):
        assert np.array_equal(np.asarray(Image.open(out / f"p{i}.png")), np.asarray(Image.open(one / f"p{i}.png")))


def test_large_images_are_tiled_and_batched(tmp_path):
    torch.manual_seed(0)
    net = models.build("unet_bn", size="tiny")  # a U-Net sees past a 32-pixel overlap
    torch.nn.init.normal_(net.out[0].weight, 0, 0.3)  # and makes a large correction
    model_dir = models.save(net, tmp_path / "wide")
    big = photo(300, 420, 9)
    Image.fromarray(big).save(tmp_path / "big.png")
    run_cli("restore", "--model", model_dir, tmp_path / "big.png", "--out", tmp_path / "whole", "--tile", 512)
    run_cli("restore", "--model", model_dir, tmp_path / "big.png", "--out", tmp_path / "tiles", "--tile", 128,
            "--overlap", 32, "--batch-size", 3)
    whole = np.asarray(Image.open(tmp_path / "whole" / "big.png")).astype(int)
    tiles = np.asarray(Image.open(tmp_path / "tiles" / "big.png")).astype(int)
    assert whole.shape == tiles.shape == big.shape
    assert np.abs(whole - big).mean() > 5  # the model changes the image a lot...
    diff = np.abs(whole - tiles)
    assert diff.max() > 0 and diff.mean() < 1.0, (diff.max(), diff.mean())  # ...tiles (really used) barely


def test_every_arch_restores_and_other_models_are_refused(tmp_path):
    torch.manual_seed(0)
    archs = {"clipweather": dict(net={"size": "tiny", "prior_dim": 64, "text_dim": 32}, clip_image="wkd-tiny-vit"),
             "transweather": dict(size="tiny"), "nafnet": dict(size="tiny"), "unet_bn": dict(size="tiny")}
    Image.fromarray(photo(40, 56)).save(tmp_path / "a.png")
    for arch, kwargs in archs.items():
        model_dir = models.save(models.build(arch, **kwargs), tmp_path / arch)
        counts = restore.restore(model_dir, [str(tmp_path / "a.png")], tmp_path / f"out-{arch}")
        assert counts.restored == 1 and counts.failed == 0, arch
        assert np.asarray(Image.open(tmp_path / f"out-{arch}" / "a.png")).shape == (40, 56, 3)
    counts = restore.restore(pruned_student(tmp_path), [str(tmp_path / "a.png")], tmp_path / "out-pruned")
    assert counts.restored == 1
    models.save(models.build("prompt_adapter_head", clip_width=16, tokens=2, width=8, hidden=8), tmp_path / "head")
    with pytest.raises(UserError, match="arch 'prompt_adapter_head' does not restore images"):
        restore.restore(tmp_path / "head", [str(tmp_path / "a.png")], tmp_path / "out-head")
    assert not (tmp_path / "out-head").exists()


def pruned_student(tmp_path):
    net = models.build("unet_bn", size="tiny")
    cfg = cfgmod.load(prune.Config, None, [f"out_dir={tmp_path}"])
    pruner = prune.Pruner(net, cfg)
    small = pruner.prune({g: 0.5 for g in pruner.groups})
    small.weatherkd_spec = {"arch": "pruned", "kwargs": pruned.describe(small, net.weatherkd_spec)}
    return models.save(small, tmp_path / "pruned", extra={"random_init": True})


def random_nafnet(tmp_path):
    torch.manual_seed(0)
    naf = models.build("nafnet", size="tiny")
    for name, p in naf.named_parameters():  # NAFNet starts as the identity; make every block count
        if name.endswith(("beta", "gamma")):
            torch.nn.init.normal_(p, 0, 0.3)
    torch.nn.init.normal_(naf.ending[0].weight, 0, 0.02)
    return models.save(naf, tmp_path / "naf", extra={"random_init": True})


def test_export_to_onnx_matches_pytorch_for_every_student_arch(student, tmp_path):
    sources = {"unet_bn": student, "nafnet": random_nafnet(tmp_path), "pruned": pruned_student(tmp_path)}
    for arch, model_dir in sources.items():
        record = export.export(model_dir, "onnx", tmp_path / f"{arch}.onnx")
        onnx.checker.check_model(str(tmp_path / f"{arch}.onnx"), full_check=True)
        assert record["source"]["arch"] == arch and record["opset"] == export.OPSET
        assert record["check"]["sizes"] == [list(s) for s in export.CHECK_SIZES]
        assert max(record["check"]["max_abs_error"]) <= 1e-4
        assert record["source"]["random_init"] is True
        assert record["latency"]["onnxruntime_ms"] > 0 and record["latency"]["torch_eager_ms"] > 0
        graph = onnx.load(str(tmp_path / f"{arch}.onnx")).graph
        dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))  # dynamic
    # An arch that is not a restorer is refused in one line, and nothing is left behind.
    models.save(models.build("prompt_adapter_head", clip_width=16, tokens=2, width=8, hidden=8), tmp_path / "head")
    with pytest.raises(UserError, match="arch 'prompt_adapter_head' does not restore images"):
        export.export(tmp_path / "head", "onnx", tmp_path / "head.onnx")
    assert not (tmp_path / "head.onnx").exists() and not list(tmp_path.glob(".head.onnx*"))


def test_export_cli_record_and_restore_through_the_file(student, tmp_path):
    proc = run_cli("export", "--model", student)
    out = student.parent / "unet.onnx"
    assert json.loads(proc.stdout.strip().splitlines()[-1])["file"] == str(out)
    record = json.loads((student.parent / "unet.onnx.json").read_text())
    assert record["sha256"] and record["source"]["weights_sha256"] and record["versions"]["onnxruntime"]
    # The model card goes beside the file, with the export's own record (format, opset, parity).
    onnx_card = (student.parent / "unet.onnx.md").read_text()
    assert onnx_card.startswith("---\nlibrary_name: weatherkd") and "| arch | `unet_bn` |" in onnx_card
    assert f"sha256 `{record['sha256']}`" in onnx_card and f"opset {record['opset']}" in onnx_card
    assert f"max abs error {max(record['check']['max_abs_error']):.2e}" in onnx_card
    Image.fromarray(photo(70, 90, 3)).save(tmp_path / "a.png")
    Image.fromarray(photo(200, 150, 4)).save(tmp_path / "b.png")
    for model, dest in ((student, "torch"), (out, "onnx")):
        run_cli("restore", "--model", model, tmp_path / "a.png", tmp_path / "b.png", "--out", tmp_path / dest)
    for name in ("a.png", "b.png"):
        a = np.asarray(Image.open(tmp_path / "torch" / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "onnx" / name)).astype(int)
        assert np.abs(a - b).max() <= 1  # the same image, up to rounding at 8 bits

    # A fixed-shape graph: images larger than it are tiled to it, smaller ones padded to it.
    fixed = tmp_path / "fixed.onnx"
    export.export(student, "onnx", fixed, (64, 96))  # in process: the command line is checked above
    assert json.loads((tmp_path / "fixed.onnx.json").read_text())["fixed_size"] == [64, 96]
    run_cli("restore", "--model", fixed, tmp_path / "a.png", tmp_path / "b.png", "--out", tmp_path / "fixed")
    for name, shape in (("a.png", (70, 90, 3)), ("b.png", (200, 150, 3))):
        assert np.asarray(Image.open(tmp_path / "fixed" / name)).shape == shape

    bad = refused("export", "--model", student, "--out", tmp_path / "x.txt")
    assert bad.returncode == 1 and "must end in .onnx" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("arch", ["unet_bn", "nafnet", "pruned"])
def test_int8_export_records_its_quality_within_tolerance(arch, student, builtin_set, tmp_path):
    model_dir = {"unet_bn": lambda: student, "nafnet": lambda: random_nafnet(tmp_path),
                 "pruned": lambda: pruned_student(tmp_path)}[arch]()
    out = tmp_path / f"{arch}-int8.onnx"
    record = export.export(model_dir, "onnx", out, precision="int8", calib_shards=builtin_set, calib_samples=8)
    assert json.loads((tmp_path / f"{arch}-int8.onnx.json").read_text()) == record
    q, quant = record["quality"], record["quantization"]
    assert record["precision"] == "int8" and quant["calibration"]["samples"] == 8
    # builtin_set has a test split with targets: the drop is measured against ground truth there.
    assert q["reference"] == "ground truth" and q["split"] == "test" and q["samples"] == open_set(builtin_set).count("test")
    assert q["drop_db"] == pytest.approx(q["psnr_fp32_db"] - q["psnr_int8_db"]) and q["drop_db"] <= 0.2
    assert len(q["psnr_int8_vs_fp32_photos_db"]) == len(export.CHECK_SIZES)
    # The convolutions run in int8 (QDQ around them); the rest is named as float.
    nodes = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= nodes and quant["ops"]["int8"].get("Conv", 0) > 0
    assert quant["ops"]["float"] and "Conv" not in quant["ops"]["float"]
    # The figures recorded are the graph's: recomputed here on the first photo.
    photo = export.check_images(export.CHECK_SIZES[:1])[0]
    got = deployed.load(out)(photo)
    with torch.no_grad():
        want = models.load(model_dir).eval()(photo)
    assert abs(export._psnr(got, want) - q["psnr_int8_vs_fp32_photos_db"][0]) < 0.05  # fp32 graph vs PyTorch: 1e-4
    assert f"{q['psnr_int8_db']:.2f} dB against ground truth" in (tmp_path / f"{arch}-int8.onnx.md").read_text()


def test_int8_export_below_its_tolerance_is_refused_and_writes_nothing(student, builtin_set, tmp_path):
    out = tmp_path / "s-int8.onnx"
    bad = refused("export", "--model", student, "--out", out, "--precision", "int8", "--calib-shards", builtin_set,
                  "--calib-samples", 4, "--max-psnr-drop", -100)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    line = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and re.search(r"int8 graph of .* is -?\d+\.\d+ dB below fp32 against ground truth", line[0])
    assert "allowed -100 (--max-psnr-drop). Nothing was written" in line[0]
    assert list(tmp_path.iterdir()) == []  # no graph, record, card or temporary file
    no_set = refused("export", "--model", student, "--out", out, "--precision", "int8")
    assert no_set.returncode == 1 and "--precision int8 needs --calib-shards DIR" in no_set.stderr
    fp16_set = refused("export", "--model", student, "--out", out, "--precision", "fp16", "--calib-shards", builtin_set)
    assert fp16_set.returncode == 1 and "--precision fp16 takes none" in fp16_set.stderr
    assert list(tmp_path.iterdir()) == []


def test_restore_through_int8_and_fp16_graphs(student, builtin_set, tmp_path):
    """int8: restoring the photos the export measured gives the fp32 model's images within the
    recorded error (plus the fp32 graph's 1e-4 and 8-bit rounding); through tiles too. fp16: the
    graph really holds fp16, takes float32, and matches PyTorch within its recorded tolerance."""
    int8 = tmp_path / "s-int8.onnx"
    record = export.export(student, "onnx", int8, precision="int8", calib_shards=builtin_set, calib_samples=8)
    bound = max(record["quality"]["max_abs_error_vs_fp32_photos"]) + export.TOLERANCE
    photos = export.check_images(export.CHECK_SIZES)
    (tmp_path / "in").mkdir()
    for i, x in enumerate(photos):
        img = x[0].permute(1, 2, 0).numpy()
        assert np.abs(np.round(img * 255) / 255 - img).max() < 1e-6  # 8-bit photos: the PNG is the same image
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(tmp_path / "in" / f"{i}.png")
    for model, dest in ((student, "torch"), (int8, "int8")):
        restore.restore(model, [str(tmp_path / "in")], tmp_path / dest)
        restore.restore(model, [str(tmp_path / "in")], tmp_path / f"{dest}-tiled", tile=64, overlap=16)
    for i in range(len(photos)):
        a = np.asarray(Image.open(tmp_path / "torch" / f"{i}.png")).astype(float)
        b = np.asarray(Image.open(tmp_path / "int8" / f"{i}.png")).astype(float)
        assert np.abs(a - b).max() <= bound * 255 + 1
        # Tiled, each tile is another input than the photo the bound was measured on: on average
        # within it (each output pixel is a blend of tiles' outputs).
        a = np.asarray(Image.open(tmp_path / "torch-tiled" / f"{i}.png")).astype(float)
        b = np.asarray(Image.open(tmp_path / "int8-tiled" / f"{i}.png")).astype(float)
        assert a.shape == (*photos[i].shape[-2:], 3) and np.abs(a - b).mean() <= bound * 255 + 1

    fp16 = tmp_path / "s-fp16.onnx"
    record = export.export(student, "onnx", fp16, precision="fp16")
    check = record["fp16"]
    assert max(check["max_abs_error_vs_fp32"]) <= check["tolerance"] == export.FP16_TOLERANCE
    graph = onnx.load(str(fp16)).graph
    assert {i.data_type for i in graph.initializer if i.dims and i.dims[0] > 1} == {onnx.TensorProto.FLOAT16}
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # called like the fp32 graph
    net = models.load(student).eval()
    with torch.no_grad():
        for x in photos:
            assert (deployed.load(fp16)(x) - net(x)).abs().max() <= export.FP16_TOLERANCE + export.TOLERANCE
    restore.restore(fp16, [str(tmp_path / "in")], tmp_path / "fp16", tile=64, overlap=16)
    assert len(list((tmp_path / "fp16").iterdir())) == len(photos)
