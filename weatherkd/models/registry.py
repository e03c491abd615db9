"""The arch registry, and saving/loading exported models."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from weatherkd.errors import UserError
from weatherkd.io import atomic_dir

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
        (tmp / SPEC).write_text(json.dumps({**spec, **(extra or {})}, indent=2) + "\n")
    return path


def read_spec(path) -> dict:
    path = Path(path)
    spec_file = path / SPEC
    if not spec_file.is_file():
        raise UserError(f"{path} is not an exported model: {SPEC} is missing")
    return json.loads(spec_file.read_text())


def load(path, map_location: str = "cpu") -> torch.nn.Module:
    """Rebuild an exported model from ``path/model.json`` and load ``path/model.safetensors``."""
    path = Path(path)
    spec = read_spec(path)
    if not (path / WEIGHTS).is_file():
        raise UserError(f"{path}: {WEIGHTS} is missing")
    model = build(spec["arch"], **spec["kwargs"])
    model.load_state_dict(load_file(path / WEIGHTS, device=map_location))
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
