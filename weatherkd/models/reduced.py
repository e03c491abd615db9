"""Reduced-precision copies of an exported fp32 ONNX graph: int8 (static, calibrated) and fp16.

Both are made with onnxruntime's own tools from the fp32 graph ``weatherkd export`` has already
checked against PyTorch; ``commands/export.py`` then measures them against that graph (and against
ground truth) before anything is written. Why these settings: docs/deployment.md.

int8 (``Int8Settings``), chosen by measuring on the students (random and trained weights; the
figures are in docs/deployment.md):

- **QDQ**, not QOperator: the same quality and speed here, and QDQ is the format other
  providers (TensorRT, CUDA, QNN) read; onnxruntime's CPU provider fuses DQ→Conv→Q into QLinearConv.
- **Conv only** (``op_types``): the convolutions are where the time is. Quantising the element-wise
  ops too (SimpleGate, the residual adds, the norm's affine) cost 2-15 dB against fp32 and gained
  no time: each becomes Q→QLinear op→DQ between float neighbours. Everything else stays in float.
- **reduce_range** (7-bit weights): without VNNI, x86's u8×s8 kernels (``vpmaddubsw``) saturate
  their 16-bit pair sums; on the nafnet ``medium`` student full-range weights gave 31 dB against
  fp32 and 7-bit weights 43-45 dB. The graph may run on any x86, so it always takes 7 bits.
- **per-channel** weights: no cost at run time, and a channel's small weights keep their bits.
- **MinMax** calibration: Entropy gave the same scales here and is slower; Percentile lost 3-5 dB
  (it clips the bright highlights a restorer must pass through).

``quant_pre_process`` is not used: its symbolic shape inference stops on the dynamic graph (the
pad computed from the input's size), and the exporter has already folded BatchNorm into the convs.
"""

from __future__ import annotations

import collections
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "int8", "fp16")


@dataclass(frozen=True)
class Int8Settings:
    format: str = "QDQ"  # onnxruntime.quantization.QuantFormat
    per_channel: bool = True
    reduce_range: bool = True
    calibration: str = "MinMax"  # onnxruntime.quantization.CalibrationMethod
    op_types: tuple[str, ...] = ("Conv",)
    activations: str = "QUInt8"  # onnxruntime.quantization.QuantType
    weights: str = "QInt8"
    # MinMax calibration keeps only each tensor's min and max per image (its graph ends in
    # ReduceMin/ReduceMax), so calibrating on many large images costs time, not memory. Its
    # CalibMaxIntermediateOutputs option would drop those figures, not merge them: not used.


@dataclass
class Calibration:
    """Images (1, 3, H, W) float32 in [0, 1], each fed alone: the graph's sizes are dynamic."""

    images: list[np.ndarray]
    source: dict = field(default_factory=dict)


def _unshare_initializers(model):
    """Give every float initializer one consumer. The exporter shares equal constants between
    nodes (a fresh model's norm weights, all ones), and quantize_static refuses a weight two
    nodes share ("Quantization parameter shared mode is not supported for weight yet")."""
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    seen: set[str] = set()
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            init = inits.get(name)
            if init is None or init.data_type != onnx.TensorProto.FLOAT:
                continue
            if name in seen:
                twin = copy.deepcopy(init)
                twin.name = f"{name}__{len(model.graph.initializer)}"
                model.graph.initializer.append(twin)
                node.input[k] = twin.name
            seen.add(name)
    return model


def to_int8(fp32_path: Path, out_path: Path, calibration: Calibration, settings: Int8Settings = Int8Settings()) -> dict:
    """Static int8 quantisation of ``fp32_path`` into ``out_path``; returns what was quantised
    and what stayed in float (op type -> count)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self, images):
            self.images = iter(images)

        def get_next(self):
            x = next(self.images, None)
            return None if x is None else {"image": x}

    shared = out_path.with_name(out_path.name + ".unshared.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process, on the root logger: see the docstring above
    try:
        onnx.save(_unshare_initializers(onnx.load(str(fp32_path))), str(shared))
        quantize_static(str(shared), str(out_path), Reader(calibration.images),
                        quant_format=getattr(QuantFormat, settings.format), per_channel=settings.per_channel,
                        reduce_range=settings.reduce_range,
                        calibrate_method=getattr(CalibrationMethod, settings.calibration),
                        op_types_to_quantize=list(settings.op_types),
                        activation_type=getattr(QuantType, settings.activations),
                        weight_type=getattr(QuantType, settings.weights))
    finally:
        shared.unlink(missing_ok=True)
        root.setLevel(level)
    return split_ops(onnx.load(str(out_path)))


def split_ops(model) -> dict:
    """Op types that run in int8 (a QLinear op, or a node fed a dequantised activation and a
    dequantised weight: onnxruntime fuses DQ→op→Q into its QLinear kernel) and those that stay in
    float (op type -> count)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    weights = {i.name for i in model.graph.initializer}
    quantised, floating = collections.Counter(), collections.Counter()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        dq = [producers[i] for i in node.input if i in producers and producers[i].op_type == "DequantizeLinear"]
        if node.op_type.startswith("QLinear") or (len(dq) >= 2 and any(d.input[0] in weights for d in dq)):
            quantised[node.op_type] += 1
        else:
            floating[node.op_type] += 1
    return {"int8": dict(quantised), "float": dict(floating)}


def to_fp16(fp32_path: Path, out_path: Path) -> dict:
    """fp16 weights and activations, float32 inputs and outputs (``keep_io_types``), so the graph
    is called like the fp32 one. onnxruntime's CPU provider lacks fp16 kernels for most of these
    ops and runs them in fp32 between inserted Casts (so the check below is of fp16 rounding, not
    of the GPU's kernels); its CUDA provider has fp16 kernels for every op the students export to
    (Conv, ConvTranspose, InstanceNormalization, Resize, Pad, element-wise) - not tested here."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return {"ops": dict(collections.Counter(n.op_type for n in model.graph.node))}
