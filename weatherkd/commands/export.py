"""`weatherkd export`: a trained model as one deployable file, checked before it is kept.

- ``--format onnx`` (default): ``torch.onnx.export`` through ``torch.export`` (dynamo), batch,
  height and width dynamic, or a fixed height and width with ``--size H W``. The graph must pass
  ``onnx.checker`` and onnxruntime (CPU) must match PyTorch within 1e-4 max abs, in fp32, on three
  real photos of different sizes.

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
import time
from pathlib import Path

import torch

from weatherkd import models
from weatherkd.errors import UserError
from weatherkd.io import atomic_path, atomic_write_json, sha256_file
from weatherkd.logs import get_logger
from weatherkd.models import card, deployed
from weatherkd.models.registry import SPEC, WEIGHTS
from weatherkd.models.tiling import default_tiling

log = get_logger(__name__)

OPSET = 18  # onnxruntime >= 1.14 runs all of it; the dynamo exporter's native opset
TOLERANCE = 1e-4  # max abs, fp32, images in [0, 1]
CHECK_SIZES = ((96, 128), (181, 243), (256, 256))  # odd sizes too: every student pads to its stride


def default_out(model_dir: Path, fmt: str) -> Path:
    """Beside the model folder: ``<run>/model.onnx``."""
    return model_dir.resolve().parent / f"{model_dir.resolve().name}.{fmt}"


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


def median_ms(fn, x: torch.Tensor, repeats: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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


def export(model_dir, fmt: str = "onnx", out=None, size=None, opset: int = OPSET) -> dict:
    model_dir = Path(model_dir)
    deployed.require_runtime("onnx", "onnxruntime", "onnxscript")
    spec = models.read_spec(model_dir)
    out = Path(out) if out else default_out(model_dir, fmt)
    if out.suffix != f".{fmt}":
        raise UserError(f"--out {out}: a {fmt} file must end in .{fmt}")
    model = models.load(model_dir).eval()
    models.check_restores_images(model, model_dir)
    base = spec["kwargs"].get("base", spec) if spec["arch"] == "pruned" else spec
    torch.manual_seed(0)
    sizes = [tuple(size)] * 3 if size else list(CHECK_SIZES)
    images = check_images(sizes)  # with --size: three different photos at the one size the graph takes
    tile, overlap = default_tiling(model)
    if size:  # the graph takes exactly one tile size; the overlap must fit inside it
        overlap = min(overlap, min(size) // 4)
    with atomic_path(out) as tmp:
        start = time.perf_counter()
        _trace(model, images[0], size, tmp, opset)
        export_s = time.perf_counter() - start
        import onnx

        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise UserError(f"arch '{spec['arch']}': the ONNX graph fails onnx.checker: {str(e).splitlines()[0]}") from None
        runner = deployed.OnnxModel(tmp, torch.device("cpu"))
        errors = []
        with torch.no_grad():
            for x in images:
                errors.append(float((runner._run(x) - model(x)).abs().max()))
        if max(errors) > TOLERANCE:
            raise UserError(f"the {fmt} graph of {model_dir} differs from PyTorch by {max(errors):.2e} "
                            f"(max abs, at sizes {sizes}); allowed {TOLERANCE:g}. Nothing was written")
        x = images[-1]
        with torch.no_grad():
            latency = {"size": list(x.shape[-2:]), "torch_eager_ms": median_ms(model, x),
                       "onnxruntime_ms": median_ms(runner._run, x)}
        record = {
            "format": fmt, "file": out.name, "sha256": sha256_file(tmp),
            "source": {"model": str(model_dir.resolve()), "arch": spec["arch"], "kwargs": spec["kwargs"],
                       "base_arch": base["arch"], "random_init": bool(spec.get("random_init")),
                       "weights_sha256": sha256_file(model_dir / WEIGHTS), "spec_sha256": sha256_file(model_dir / SPEC)},
            "opset": opset,
            "inputs": {"image": ["batch", 3, *(size or ["height", "width"])], "dtype": "float32", "range": [0, 1]},
            "outputs": {"restored": ["batch", 3, *(size or ["height", "width"])]},
            "fixed_size": list(size) if size else None,
            "check": {"sizes": [list(s) for s in sizes], "max_abs_error": errors, "tolerance": TOLERANCE,
                      "onnx_checker": "passed", "runtime": "onnxruntime CPUExecutionProvider"},
            "latency": latency, "export_seconds": export_s, "tile": tile, "tile_overlap": overlap,
            "versions": _versions(),
        }
        # The record and the card first, then the graph: a graph is never left with another export's record.
        atomic_write_json(deployed.record_path(out), record)
        card.export_copy(model_dir, out, record)
    log.info("exported %s -> %s (%s, max abs error %.1e over %d images; %s)", model_dir, out, fmt, max(errors),
             len(images), ", ".join(f"{k} {v:.2f}" for k, v in latency.items() if k.endswith("_ms")))
    return record


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def run_cli(args) -> int:
    if args.size and (len(args.size) != 2 or min(args.size) < 16):
        raise UserError("--size takes a height and a width of at least 16 pixels")
    record = export(args.model, args.format, args.out, args.size, args.opset)
    print(json.dumps({"file": str(Path(args.out) if args.out else default_out(Path(args.model), args.format)),
                      "max_abs_error": max(record["check"]["max_abs_error"]), "latency": record["latency"],
                      "random_init": record["source"]["random_init"]}))
    return 0

