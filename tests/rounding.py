"""Tolerances for results computed in 16-bit formats, derived from the format, never measured.

bf16 and fp16 arithmetic differs between CPUs (oneDNN's AMX kernels, AVX-512 and AVX2 round at
different points) and between eager and compiled code, so a bound that one machine happened to
meet fails on another. Every 16-bit comparison in the tests takes its bound from here:

- One rounding to a format moves a value by at most its unit roundoff ``u = eps / 2``, relatively:
  bf16 2^-8, fp16 2^-11, fp32 2^-24.
- ``k`` successive roundings stay within ``γ_k = k·u / (1 − k·u)`` of the exact result
  (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1).
- Through a network, to first order, a layer passes its input's relative error on unchanged when
  its activations stay of the order of its inputs (the tests' nets are built so), and adds its own
  roundings. ``roundings_through`` counts them on the longest path: the input's cast, each weighted
  layer's weights and output, each other op's output. ReLU, pixel (un)shuffle and identity are exact.
  Accumulation inside convolutions and matmuls is fp32 for 16-bit inputs in every kernel torch uses,
  which adds fp32 roundings only, negligible at these sizes.
- An error of ``γ_k`` relative to a network's activations is an absolute error of ``γ_k`` times the
  largest output, not of each output element: small elements get the large ones' error.
"""

from __future__ import annotations

import torch
from torch import nn

EXACT = (nn.ReLU, nn.Identity, nn.PixelShuffle, nn.PixelUnshuffle, nn.Dropout, nn.Flatten)


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(k: int, dtype: torch.dtype) -> float:
    """The relative error bound of ``k`` roundings to ``dtype``."""
    ku = k * unit_roundoff(dtype)
    assert ku < 1, f"{k} roundings to {dtype} bound nothing"
    return ku / (1 - ku)


def roundings_through(module: nn.Module, functional: int = 0) -> int:
    """Roundings on the longest path through ``module`` run in a 16-bit format: the input's cast,
    then each leaf op in turn (2 for one with weights, 0 for an exact one, 1 otherwise), plus
    ``functional``: ops of the forward that are no module (residual sums, interpolations)."""
    k = 1 + functional
    for m in module.modules():
        if next(m.children(), None) is not None or isinstance(m, EXACT):
            continue
        k += 2 if next(m.parameters(recurse=False), None) is not None else 1
    return k
