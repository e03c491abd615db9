"""Exported graphs (``weatherkd export``), run like the PyTorch model they came from.

``FILE.onnx`` runs through onnxruntime, whatever its precision (fp32, int8, fp16: all take and
return float32). It is called on a (B, 3, H, W) float tensor and returns
one, so tiling and the restore loop treat it like any model. ``FILE.json`` beside the file (written by the export) says what the model was,
how it was checked and how to tile it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from weatherkd.errors import UserError
from weatherkd.io import sha256_file
from weatherkd.models.tiling import DEFAULT_OVERLAP, DEFAULT_TILE

SUFFIXES = (".onnx",)


def require_runtime(*packages: str) -> None:
    """ONNX support is the optional ``deploy`` extra; without it, say how to get it."""
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not installed: pip install -e '.[deploy]' (onnx, onnxruntime, onnxscript)")


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class Deployed:
    """What the graphs have in common: the export record, tiling, and fixed-shape inputs."""

    def __init__(self, path: Path):
        self.path = path
        rec = record_path(path)
        try:
            self.record = json.loads(rec.read_text()) if rec.is_file() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{rec} is damaged ({e}); export again") from None
        if self.record.get("sha256") and self.record["sha256"] != sha256_file(path):
            raise UserError(f"{rec} describes another export than {path} (sha256 differs); export again")
        self.tile = int(self.record.get("tile", DEFAULT_TILE))
        self.tile_overlap = int(self.record.get("tile_overlap", DEFAULT_OVERLAP))
        self.fixed: tuple[int, int] | None = tuple(self.record["fixed_size"]) if self.record.get("fixed_size") else None
        source = self.record.get("source", {})
        self.weatherkd_spec = {"arch": source.get("arch", path.suffix[1:]), "kwargs": source.get("kwargs", {}),
                               "random_init": bool(source.get("random_init")), "exported": path.suffix[1:]}

    def eval(self):
        return self

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fixed:
            return self._run(x)
        (fh, fw), (h, w) = self.fixed, x.shape[-2:]
        if h > fh or w > fw:
            raise ValueError(f"{self.path} takes {fh}x{fw} inputs; tile larger images to it")
        out = self._run(F.pad(x, (0, fw - w, 0, fh - h), mode="replicate"))  # smaller: padded, cropped back
        return out[..., :h, :w]


class OnnxModel(Deployed):
    def __init__(self, path: Path, device: torch.device, threads: int | None = None):
        require_runtime("onnxruntime")
        import onnxruntime as ort

        super().__init__(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        # Idle workers sleep instead of spinning: restore decodes and writes in threads beside the
        # graph, and on a shared CPU spinning workers took their cores (docs/deployment.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime's own error types; a bad file is a user's error
            raise UserError(f"{path}: onnxruntime cannot load it ({' '.join(str(e).split())[:200]})") from None
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def load(path, device: torch.device = torch.device("cpu")) -> Deployed:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such exported file")
    if path.suffix == ".onnx":
        return OnnxModel(path, device)
    raise UserError(f"{path}: not an exported model (a model folder, or a .onnx file)")
