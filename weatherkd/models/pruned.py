"""Structurally pruned networks as exportable models.

A pruned network is its base arch with narrower layers. ``model.json`` stores the base spec plus
only what pruning changed (parameter shapes and layer attributes such as ``out_channels``), so
``models.load`` rebuilds it like any other model: build the base, narrow it, load the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from weatherkd.models.registry import build, register

# Layer attributes that structured pruning rewrites (torch-pruning updates these alongside the weights).
_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "num_channels",
          "num_groups", "normalized_shape")


def describe(model: nn.Module, base: dict) -> dict:
    """kwargs of the ``pruned`` arch for ``model``, a narrowed copy of the arch in ``base``."""
    fresh = build(base["arch"], **base["kwargs"])
    fresh_shapes = {k: list(v.shape) for k, v in fresh.state_dict().items()}
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if list(v.shape) != fresh_shapes.get(k)}
    fresh_modules = dict(fresh.named_modules())
    attributes = {}
    for name, module in model.named_modules():
        changed = {a: _plain(getattr(module, a)) for a in _ATTRS
                   if hasattr(module, a) and getattr(module, a) != getattr(fresh_modules[name], a)}
        if changed:
            attributes[name] = changed
    return {"base": {"arch": base["arch"], "kwargs": base["kwargs"]}, "shapes": shapes, "attributes": attributes}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@register("pruned")
def pruned(base: dict, shapes: dict[str, list[int]], attributes: dict[str, dict]) -> nn.Module:
    model = build(base["arch"], **base["kwargs"])
    modules = dict(model.named_modules())
    for name, attrs in attributes.items():
        for attr, value in attrs.items():
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
    for key, shape in shapes.items():
        owner, _, leaf = key.rpartition(".")
        module = modules[owner]
        if leaf in module._parameters:
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(torch.empty(shape), requires_grad=old.requires_grad)
        else:
            module._buffers[leaf] = torch.empty(shape, dtype=module._buffers[leaf].dtype)
    return model
