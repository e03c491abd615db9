"""`weatherkd export`: a trained model as one deployable file, checked before it is kept.

- ``--format onnx`` (default): ``torch.onnx.export`` through ``torch.export`` (dynamo), batch,
  height and width dynamic, or a fixed height and width with ``--size H W``. The graph must pass
  ``onnx.checker`` and onnxruntime (CPU) must match PyTorch within 1e-4 max abs, in fp32, on three
  real photos of different sizes.

- ``--precision int8 --calib-shards DIR``: the checked fp32 graph quantised by onnxruntime
  (``models.reduced``: static, QDQ, Conv only, calibrated on the set's inputs), then measured: its
  PSNR against the fp32 graph's output, and against ground truth on the set's test split (else
  against the targets or teacher outputs of samples it was not calibrated on). More than
  ``--max-psnr-drop`` dB (0.2) below fp32 there, and it is refused in one line; nothing is written.
- ``--precision fp16``: fp16 weights and activations, float32 in and out, checked against the fp32
  graph on the same real photos (max abs within ``FP16_TOLERANCE``, and PSNR).

Every graph is traced from a copy of the model whose pixel (un)shuffles are exact convolutions
(``models.onnx_friendly``): onnxruntime runs those faster than the reshapes they export as.

``FILE.md`` is the model's card (``README.md`` in its folder) with the export's own record added.
``FILE.json`` records the source model's hash, the opset, the input and output shapes, the errors
measured and the latency of both, and how to tile large images. The file and its record are
written atomically, after the check: a file that does not match PyTorch is never left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from weatherkd import cost, models
from weatherkd.errors import UserError
from weatherkd.io import atomic_path, atomic_write_json, sha256_file
from weatherkd.logs import get_logger
from weatherkd.models import card, deployed, onnx_friendly
from weatherkd.models import reduced
from weatherkd.models.registry import SPEC, WEIGHTS
from weatherkd.models.tiling import default_tiling

log = get_logger(__name__)

OPSET = 18  # onnxruntime >= 1.14 runs all of it; the dynamo exporter's native opset
TOLERANCE = 1e-4  # max abs, fp32, images in [0, 1]
CHECK_SIZES = ((96, 128), (181, 243), (256, 256))  # odd sizes too: every student pads to its stride
MAX_PSNR_DROP = 0.2  # dB, int8 below fp32 against ground truth
CALIB_SAMPLES = 32
QUALITY_SAMPLES = 64  # at most, of the test split (or of the held-out calibration samples)
# fp16 against fp32, max abs on [0, 1] images: a few units of fp16's last place at 1.0 (2^-11)
# through a dozen layers; one 8-bit level is 3.9e-3.
FP16_TOLERANCE = 1e-2


def default_out(model_dir: Path, fmt: str, precision: str = "fp32") -> Path:
    """Beside the model folder: ``<run>/model.onnx`` (``model-int8.onnx``, ``model-fp16.onnx``)."""
    tag = "" if precision == "fp32" else f"-{precision}"
    return model_dir.resolve().parent / f"{model_dir.resolve().name}{tag}.{fmt}"


def check_images(sizes) -> list[torch.Tensor]:
    """Real photos (the builtin test photos), centre-cropped or resized to each size: (1, 3, H, W)."""
    from weatherkd.data.photo_set import BUILTIN_TEST_PHOTOS, read_builtin

    photos = [photo for _, photo in read_builtin(BUILTIN_TEST_PHOTOS[:len(sizes)])]
    out = []
    for i, (h, w) in enumerate(sizes):
        img = torch.from_numpy(photos[i % len(photos)]).permute(2, 0, 1)[None]
        scale = max(h / img.shape[-2], w / img.shape[-1])
        if scale > 1:
            img = torch.nn.functional.interpolate(img, scale_factor=scale, mode="bilinear", align_corners=False)
        top, left = (img.shape[-2] - h) // 2, (img.shape[-1] - w) // 2
        out.append(img[..., top:top + h, left:left + w].clamp(0, 1).contiguous())
    return out


def _dynamic_shapes(size):
    if size:
        return ({0: torch.export.Dim("batch", min=1, max=1024)},)
    return ({0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", min=16, max=16384),
             3: torch.export.Dim("width", min=16, max=16384)},)


@contextlib.contextmanager
def _quiet_torch():
    """torch.export logs every failed guard at ERROR, with stacks, before it raises; the raise is
    what we report (in one line), so its loggers are silenced while tracing."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("torch")]
    loggers.append(logging.getLogger("torch"))
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _trace(model: torch.nn.Module, example: torch.Tensor, size, tmp: Path, opset: int) -> None:
    """Write the graph to ``tmp``; a model torch.export cannot trace is a one-line error saying why.
    The example has a batch of 2: torch.export fixes a dimension it sees at size 1."""
    arch = model.weatherkd_spec["arch"]
    try:
        with _quiet_torch(), torch.no_grad():
            program = torch.onnx.export(model, (torch.cat([example, example.flip(-1)]),), dynamo=True,
                                        opset_version=opset, dynamic_shapes=_dynamic_shapes(size),
                                        input_names=["image"], output_names=["restored"], verbose=False)
            program.save(str(tmp))
    except Exception as e:  # torch.export's many failure types all mean: this arch does not trace
        shape = "a fixed height and width" if size else "a dynamic batch, height and width (try --size H W)"
        raise UserError(f"arch '{arch}' cannot export to onnx with {shape}: torch.export fails: {_root_cause(e)}") from None


def _shard_samples(shards, calib_samples: int):
    """Calibration inputs from a shard set (any kind: distillation, dreamed, taught), taken in turn
    from each shard of its training split (so every weather is in), and the samples the quality is
    measured on: the test split's when it has targets, else the split's next samples with a
    target or a teacher output. Returns (calibration, quality samples, what each is)."""
    from weatherkd.data.check import iter_tar
    from weatherkd.data.samples import CorruptSample, decode_sample
    from weatherkd.data.shards import open_set

    shard_set = open_set(shards)
    splits = list(shard_set.manifest["splits"])
    split = "train" if "train" in splits else splits[0]

    def take(split_name: str, n: int, skip: int = 0) -> list[dict]:
        streams = [iter_tar(shard_set.dir / s["file"]) for s in shard_set.shards(split_name)]
        out, k = [], 0
        while streams and len(out) < n:  # round robin over the shards
            for stream in list(streams):
                raw = next(stream, None)
                if raw is None:
                    streams.remove(stream)
                    continue
                k += 1
                if k > skip and len(out) < n:
                    try:
                        out.append(decode_sample(raw))
                    except CorruptSample as e:
                        raise UserError(f"--calib-shards {shards}: {e}") from None
        return out

    calib = take(split, calib_samples)
    if not calib:
        raise UserError(f"--calib-shards {shards}: its '{split}' split has no samples")
    if "test" in splits and shard_set.has_target("test"):
        held, where, ref = take("test", QUALITY_SAMPLES), "test", "target"
    else:
        held = take(split, QUALITY_SAMPLES, skip=calib_samples)
        where = f"{split} (not calibrated on)"
        ref = "target" if held and "target" in held[0] else "teacher"
        if not held or ref not in held[0]:
            raise UserError(f"--calib-shards {shards}: no test split with targets, and no {split} samples beyond the "
                            f"{len(calib)} calibrated on with a target or teacher output to measure the int8 graph "
                            "against; use a set with a test split")
    as_input = lambda img: (img.astype(np.float32) / 255).transpose(2, 0, 1)[None].copy()  # noqa: E731
    quality = [(as_input(s["input"]), as_input(s[ref])) for s in held]
    source = {"set": str(Path(shards).resolve()), "split": split, "samples": len(calib)}
    measured = {"set": str(Path(shards).resolve()), "split": where, "samples": len(quality),
                "reference": "ground truth" if ref == "target" else "the teacher's output"}
    return reduced.Calibration([as_input(s["input"]) for s in calib], source), quality, measured


def _psnr(a, b) -> float:
    from weatherkd.metrics import psnr_batch

    return float(psnr_batch(torch.as_tensor(a), torch.as_tensor(b)).mean())


def _int8_quality(fp32, int8, photos, quality, measured: dict, max_drop: float, model_dir) -> dict:
    """The int8 graph's PSNR against the fp32 graph (on the check photos and the set's samples)
    and against the reference; refused when it is more than ``max_drop`` dB below fp32 there."""
    pairs = [(int8._run(x), fp32._run(x)) for x in photos]
    vs_fp32 = [_psnr(a, b) for a, b in pairs]
    f32 = [(fp32._run(torch.from_numpy(x)), torch.from_numpy(ref)) for x, ref in quality]
    i8 = [int8._run(torch.from_numpy(x)) for x, _ in quality]
    psnr_fp32 = statistics.fmean(_psnr(y, ref) for y, ref in f32)
    psnr_int8 = statistics.fmean(_psnr(y, ref) for y, (_, ref) in zip(i8, f32))
    drop = psnr_fp32 - psnr_int8
    record = {"psnr_int8_vs_fp32_photos_db": vs_fp32,
              "max_abs_error_vs_fp32_photos": [float((a - b).abs().max()) for a, b in pairs],
              "psnr_int8_vs_fp32_set_db": statistics.fmean(_psnr(y, y32) for y, (y32, _) in zip(i8, f32)),
              **measured, "psnr_fp32_db": psnr_fp32, "psnr_int8_db": psnr_int8, "drop_db": drop,
              "max_drop_db": max_drop}
    if not drop <= max_drop:
        raise UserError(f"the int8 graph of {model_dir} is {drop:.3f} dB below fp32 against {measured['reference']} "
                        f"({psnr_int8:.2f} vs {psnr_fp32:.2f} dB on {len(quality)} {measured['split']} samples of "
                        f"{measured['set']}); allowed {max_drop:g} (--max-psnr-drop). Nothing was written")
    return record


def _fp16_parity(fp32, fp16, photos, model_dir) -> dict:
    errors = [float((fp16._run(x) - fp32._run(x)).abs().max()) for x in photos]
    record = {"max_abs_error_vs_fp32": errors, "tolerance": FP16_TOLERANCE,
              "psnr_vs_fp32_photos_db": [_psnr(fp16._run(x), fp32._run(x)) for x in photos],
              "runtime": "onnxruntime CPUExecutionProvider (fp16 ops without a CPU kernel run in fp32 between Casts)"}
    if max(errors) > FP16_TOLERANCE:
        raise UserError(f"the fp16 graph of {model_dir} differs from fp32 by {max(errors):.2e} (max abs on real photos); "
                        f"allowed {FP16_TOLERANCE:g}. Nothing was written")
    return record


def export(model_dir, fmt: str = "onnx", out=None, size=None, opset: int = OPSET, precision: str = "fp32",
           calib_shards=None, calib_samples: int = CALIB_SAMPLES, max_psnr_drop: float = MAX_PSNR_DROP,
           int8: reduced.Int8Settings = reduced.Int8Settings()) -> dict:
    model_dir = Path(model_dir)
    deployed.require_runtime("onnx", "onnxruntime", "onnxscript")
    if precision not in reduced.PRECISIONS:
        raise UserError(f"--precision {precision}: choose one of {', '.join(reduced.PRECISIONS)}")
    if precision == "int8" and not calib_shards:
        raise UserError("--precision int8 needs --calib-shards DIR: a shard set whose inputs calibrate it")
    if calib_shards and precision != "int8":
        raise UserError(f"--calib-shards calibrates int8 graphs; --precision {precision} takes none")
    if calib_samples < 1:
        raise UserError("--calib-samples must be at least 1")
    spec = models.read_spec(model_dir)
    out = Path(out) if out else default_out(model_dir, fmt, precision)
    if out.suffix != f".{fmt}":
        raise UserError(f"--out {out}: a {fmt} file must end in .{fmt}")
    calibration = _shard_samples(calib_shards, calib_samples) if precision == "int8" else None  # its errors first
    model = models.load(model_dir).eval()
    models.check_restores_images(model, model_dir)
    base = spec["kwargs"].get("base", spec) if spec["arch"] == "pruned" else spec
    torch.manual_seed(0)
    sizes = [tuple(size)] * 3 if size else list(CHECK_SIZES)
    images = check_images(sizes)  # with --size: three different photos at the one size the graph takes
    tile, overlap = default_tiling(model)
    if size:  # the graph takes exactly one tile size; the overlap must fit inside it
        overlap = min(overlap, min(size) // 4)
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as work:
        fp32_path = tmp if precision == "fp32" else Path(work) / "fp32.onnx"
        start = time.perf_counter()
        traced = onnx_friendly.for_export(model)
        traced.weatherkd_spec = model.weatherkd_spec
        _trace(traced, images[0], size, fp32_path, opset)
        export_s = time.perf_counter() - start
        import onnx

        try:
            onnx.checker.check_model(str(fp32_path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise UserError(f"arch '{spec['arch']}': the ONNX graph fails onnx.checker: {str(e).splitlines()[0]}") from None
        fp32 = deployed.OnnxModel(fp32_path, torch.device("cpu"))
        errors = []
        with torch.no_grad():
            for x in images:
                errors.append(float((fp32._run(x) - model(x)).abs().max()))
        if max(errors) > TOLERANCE:
            raise UserError(f"the {fmt} graph of {model_dir} differs from PyTorch by {max(errors):.2e} "
                            f"(max abs, at sizes {sizes}); allowed {TOLERANCE:g}. Nothing was written")
        extra: dict = {}
        if precision == "int8":
            calib, quality, measured = calibration
            ops = reduced.to_int8(fp32_path, tmp, calib, int8)
            runner = deployed.OnnxModel(tmp, torch.device("cpu"))
            extra["quantization"] = {**asdict(int8), "op_types": list(int8.op_types), "calibration": calib.source, "ops": ops}
            extra["quality"] = _int8_quality(fp32, runner, images, quality, measured, max_psnr_drop, model_dir)
        elif precision == "fp16":
            extra["fp16"] = {**reduced.to_fp16(fp32_path, tmp)}
            runner = deployed.OnnxModel(tmp, torch.device("cpu"))
            extra["fp16"].update(_fp16_parity(fp32, runner, images, model_dir))
        else:
            runner = fp32
        x = images[-1]
        with torch.no_grad():
            def median_ms(fn) -> float:
                return cost.timed_ms(fn, x, repeats=10, warmup=2)["median"]

            latency = {"size": list(x.shape[-2:]), "torch_eager_ms": median_ms(model),
                       "onnxruntime_ms": median_ms(runner._run)}
            if precision != "fp32":
                latency["onnxruntime_fp32_ms"] = median_ms(fp32._run)
        record = {
            "format": fmt, "precision": precision, "file": out.name, "sha256": sha256_file(tmp),
            "source": {"model": str(model_dir.resolve()), "arch": spec["arch"], "kwargs": spec["kwargs"],
                       "base_arch": base["arch"], "random_init": bool(spec.get("random_init")),
                       "weights_sha256": sha256_file(model_dir / WEIGHTS), "spec_sha256": sha256_file(model_dir / SPEC)},
            "opset": opset,
            "inputs": {"image": ["batch", 3, *(size or ["height", "width"])], "dtype": "float32", "range": [0, 1]},
            "outputs": {"restored": ["batch", 3, *(size or ["height", "width"])]},
            "fixed_size": list(size) if size else None,
            "check": {"sizes": [list(s) for s in sizes], "max_abs_error": errors, "tolerance": TOLERANCE,
                      "onnx_checker": "passed", "runtime": "onnxruntime CPUExecutionProvider",
                      "of": "the fp32 graph" + ("" if precision == "fp32" else f", before it was made {precision}")},
            **extra,
            "latency": latency, "export_seconds": export_s, "tile": tile, "tile_overlap": overlap,
            "versions": _versions(),
        }
        # The record and the card first, then the graph: a graph is never left with another export's record.
        atomic_write_json(deployed.record_path(out), record)
        card.export_copy(model_dir, out, record)
    log.info("exported %s -> %s (%s %s, max abs error %.1e over %d images; %s)", model_dir, out, fmt, precision,
             max(errors), len(images), ", ".join(f"{k} {v:.2f}" for k, v in latency.items() if k.endswith("_ms")))
    return record


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def run_cli(args) -> int:
    if args.size and (len(args.size) != 2 or min(args.size) < 16):
        raise UserError("--size takes a height and a width of at least 16 pixels")
    record = export(args.model, args.format, args.out, args.size, args.opset, args.precision, args.calib_shards,
                    args.calib_samples, args.max_psnr_drop)
    out = Path(args.out) if args.out else default_out(Path(args.model), args.format, args.precision)
    print(json.dumps({"file": str(out), "precision": args.precision,
                      "max_abs_error": max(record["check"]["max_abs_error"]), "latency": record["latency"],
                      **{k: record[k] for k in ("quality", "fp16") if k in record},
                      "random_init": record["source"]["random_init"]}))
    return 0

