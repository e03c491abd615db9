"""The arch registry, and saving/loading exported models."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from weatherkd.errors import UserError
from weatherkd.io import atomic_dir, atomic_write_text, sha256_file
from weatherkd.logs import get_logger

log = get_logger(__name__)

ARCHS: dict[str, Callable[..., torch.nn.Module]] = {}
WEIGHTS, SPEC = "model.safetensors", "model.json"


def register(name: str):
    def wrap(cls):
        ARCHS[name] = cls
        return cls

    return wrap


def build(arch: str, **kwargs) -> torch.nn.Module:
    """Instantiate a registered arch; the spec needed to rebuild it rides along on the module."""
    if arch not in ARCHS:
        raise UserError(f"unknown model arch '{arch}'; registered: {', '.join(sorted(ARCHS))}")
    try:
        model = ARCHS[arch](**kwargs)
    except (TypeError, ValueError, KeyError) as e:  # a size or argument the arch does not have
        raise UserError(f"arch '{arch}' cannot be built with {kwargs}: {e}") from None
    model.weatherkd_spec = {"arch": arch, "kwargs": dict(kwargs)}
    return model


def arch_params(arch: str) -> set[str] | None:
    """The keyword arguments ``arch`` is built with; None when it takes any (``**kwargs``)."""
    params = inspect.signature(ARCHS[arch]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_kwargs(arch: str, kwargs: dict) -> None:
    """A config key the arch would not take is an error, not silently ignored."""
    if arch not in ARCHS:
        raise UserError(f"model.arch: unknown arch '{arch}'; registered: {', '.join(sorted(ARCHS))}")
    accepted = arch_params(arch)
    if accepted is None:
        return
    for key in kwargs:
        if key not in accepted:
            name = "model.size" if key == "size" else f"model.kwargs.{key}"
            takes = ", ".join(sorted(accepted)) or "nothing"
            raise UserError(f"{name}: arch '{arch}' takes no '{key}' (it takes: {takes})")


def save(model: torch.nn.Module, path, state_dict: dict | None = None, extra: dict | None = None) -> Path:
    """Export to ``path/`` atomically. ``state_dict`` overrides the module's (e.g. gathered ZeRO-3 or EMA weights)."""
    spec = getattr(model, "weatherkd_spec", None)
    if spec is None:
        raise ValueError("model was not built with weatherkd.models.build; its arch is unknown")
    state = state_dict if state_dict is not None else model.state_dict()
    # safetensors refuses shared storage and non-contiguous tensors; clone makes each its own.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(state, tmp / WEIGHTS, metadata={"arch": spec["arch"]})
        files = {WEIGHTS: _file_record(tmp / WEIGHTS)}
        (tmp / SPEC).write_text(json.dumps({**spec, **(extra or {}), "files": files}, indent=2) + "\n")
    return path


def _file_record(f: Path) -> dict:
    return {"bytes": f.stat().st_size, "sha256": sha256_file(f)}


def record_file(path, name: str) -> None:
    """Add a file written into an export after it was saved (e.g. the teacher's feature
    statistics) to the files ``model.json`` vouches for."""
    path = Path(path)
    spec = read_spec(path)
    spec["files"] = {**spec.get("files", {}), name: _file_record(path / name)}
    atomic_write_text(path / SPEC, json.dumps(spec, indent=2) + "\n")


def read_spec(path) -> dict:
    path = Path(path)
    spec_file = path / SPEC
    if not spec_file.is_file():
        raise UserError(f"{path} is not an exported model: {SPEC} is missing")
    try:
        spec = json.loads(spec_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{spec_file} is damaged ({e}); export the model again") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("arch"), str) or not isinstance(spec.get("kwargs"), dict):
        raise UserError(f"{spec_file} is not an exported model's record (no arch and kwargs)")
    return spec


def verify(path) -> dict:
    """Check every file ``model.json`` vouches for (size, then sha256) and return the spec; a
    missing or changed file is one line naming the folder and the file."""
    path = Path(path)
    spec = read_spec(path)
    files = spec.get("files")
    if files is None:  # exported before model.json recorded its files
        log.warning("%s records no checksums (exported by an older weatherkd): loaded unverified", path)
        files = {WEIGHTS: None}
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise UserError(f"{path}: {name} is missing")
        if want is None:
            continue
        if f.stat().st_size != want["bytes"]:
            raise UserError(f"{path}: {name} is {f.stat().st_size} bytes, but {SPEC} records {want['bytes']}: "
                            "the export is damaged (truncated or changed); export it again")
        if sha256_file(f) != want["sha256"]:
            raise UserError(f"{path}: {name} does not match the sha256 {SPEC} records: the export is damaged "
                            "or was changed; export it again")
    return spec


def load(path, map_location: str = "cpu") -> torch.nn.Module:
    """Rebuild an exported model from ``path/model.json`` and load ``path/model.safetensors``,
    both verified first."""
    path = Path(path)
    spec = verify(path)
    model = build(spec["arch"], **spec["kwargs"])
    try:
        model.load_state_dict(load_file(path / WEIGHTS, device=map_location))
    except Exception as e:  # unverified (older) exports: a bad file, or weights of another size
        raise UserError(f"{path}: cannot load {WEIGHTS} ({' '.join(str(e).split())[:200]})") from None
    model.weatherkd_spec = spec
    return model


@torch.no_grad()
def check_restores_images(model: torch.nn.Module, where) -> None:
    """What ``restore`` and ``export`` need: a model that maps a (B, 3, H, W) image to the same
    shape. Other archs (the VQ model's codes, the prompt adapter) are refused in one line."""
    arch = getattr(model, "weatherkd_spec", {}).get("arch", type(model).__name__)
    probe = torch.rand(1, 3, 48, 40)
    try:
        out = model(probe)
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    except Exception as e:  # a model that cannot even take an image
        got = f"an error ({' '.join(str(e).split())[:120]})"
    if got != tuple(probe.shape):
        raise UserError(f"{where}: arch '{arch}' does not restore images (a 1x3x48x40 image gives {got})")
