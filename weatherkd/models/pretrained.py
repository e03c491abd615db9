"""Pretrained weights from local files (CLIP towers, VGG16): read without running pickled code, and
checked against the model they are meant for, so a wrong file is one line naming the config key.

The readers take the layouts the libraries write: safetensors, and torch files holding a state
dict, a ``{"state_dict": ...}`` training checkpoint, or keys prefixed ``module.`` (DDP).
"""

from __future__ import annotations

from pathlib import Path

import torch

from weatherkd.errors import UserError


def read_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's fault; say so in one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{key}: cannot read {path} as a state dict (.safetensors, or a torch file of "
                        f"tensors; pickled objects and TorchScript archives are refused): {reason}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in state.items()):
        raise UserError(f"{key}: {path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def check_fits(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], key: str, path, what: str,
               allow_unexpected: bool = False) -> None:
    """One line naming the first differences when ``found`` (a file's tensors) does not fit ``expected``."""
    shapes = [k for k in expected if k in found and found[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in found]
    unexpected = [] if allow_unexpected else [k for k in found if k not in expected]
    if not (shapes or missing or unexpected):
        return
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensors differ in shape (e.g. {k}: {tuple(found[k].shape)} in the file, "
                     f"{tuple(expected[k].shape)} in {what})")
    if missing:
        parts.append(f"{len(missing)} of {what}'s tensors are missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors are not {what}'s (e.g. {unexpected[0]})")
    raise UserError(f"{key}: {path} does not fit {what}: {'; '.join(parts)}")


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], key: str, path, what: str) -> None:
    """Check a file's ``state`` (from ``read_state_dict``) fits ``model`` exactly, and load it strictly."""
    expected = model.state_dict()
    for name, value in list(state.items()):  # older open_clip files keep logit_scale as a scalar
        if name in expected and value.numel() == expected[name].numel() and value.ndim != expected[name].ndim:
            state[name] = value.reshape(expected[name].shape)
    check_fits(expected, state, key, path, what)
    model.load_state_dict(state, strict=True)
