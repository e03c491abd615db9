"""Distillation losses: KD to the teacher, and DCKD's two terms (DCKD, docs/references.md).

- Dynamic contrastive regularisation: ``Σ_l w_l · d(s, t) / (Σ_neg d(s, n) + ε)`` on VQ-encoder
  features, with d the mean absolute difference (the AECR-Net ratio form the official code uses).
- Distribution mapping: cross-entropy from the teacher's to the student's per-position
  distribution over the VQ codebook.
- Consistency (the official recipe's ``cri_lcr``): the teacher's output on a transformed copy of
  the input, transformed back, as one more L1 target (`transform` / `untransform`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only


def contrastive(student: list[torch.Tensor], teacher: list[torch.Tensor], negatives: list[list[torch.Tensor]],
                weights: list[float], eps: float = 1e-7) -> torch.Tensor:
    """``student``/``teacher``: features per level; ``negatives``: per negative, features per level.
    Only the student's features take a gradient: the teacher's and the negatives' are constants."""
    total = 0.0
    for level, (w, s, t) in enumerate(zip(weights, student, teacher)):
        total = total + _LevelContrast.apply(s, t, w, eps, *(neg[level] for neg in negatives))
    return total


def contrastive_formula(student: list[torch.Tensor], teacher: list[torch.Tensor], negatives: list[list[torch.Tensor]],
                        weights: list[float], eps: float = 1e-7) -> torch.Tensor:
    """`contrastive` as plain tensor maths, sums at least in fp32, for `compiled` to trace: autograd
    derives its gradient, and inductor fuses forward and backward into a few loops. (Eager, this
    form costs ~40 full-size passes per level; `contrastive` is the eager form.)"""
    total = 0.0
    for level, (w, s, t) in enumerate(zip(weights, student, teacher)):
        acc = torch.promote_types(s.dtype, torch.float32)
        d_neg = sum((s - neg[level]).abs().mean(dtype=acc) for neg in negatives)
        total = total + w * (s - t).abs().mean(dtype=acc) / (d_neg + eps)
    return total


@functools.cache
def compiled(fn):
    """``fn`` through torch.compile, once per process (``dckd.compile``). One graph, no breaks: a
    break would silently run part of it eagerly. Compiled at the first call; a second shape
    compiles a dynamic graph, a second VQ (``code_mapping``) its own.

    Each gradient leaves the graph in its input's memory layout: inductor gave channels_last
    features row-major gradients, and the VQ's backward then ran on mixed layouts (GELU's backward
    ~4x slower a call on CPU, `weatherkd bench kd-overhead`). Each function keeps its own
    recompile budget: the wrappers share one code object, which dynamo would otherwise count as one."""
    @functools.wraps(fn)
    def in_input_layout(*args):
        return fn(*tree_map_only(torch.Tensor, lambda x: _GradInInputLayout.apply(x) if x.requires_grad else x, args))

    return torch.compile(in_input_layout, fullgraph=True, isolate_recompiles=True)


class _GradInInputLayout(torch.autograd.Function):
    """The identity, whose gradient takes the input's layout (channels_last or not)."""

    @staticmethod
    def forward(ctx, x):
        ctx.channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last) if ctx.channels_last else grad


class _LevelContrast(torch.autograd.Function):
    """One level's ``w · d(s, t) / (Σ_n d(s, n) + ε)``, with its gradient to ``s`` written out:

        ∂/∂s = w / (N · D) · (sign(s − t) − d(s, t) / D · Σ_n sign(s − n)),   D = Σ_n d(s, n) + ε.

    Autograd's version keeps a difference per pair and makes ~40 full-size elementwise passes per
    level; on CPU that was the largest part of a dckd step's backward (`weatherkd bench
    kd-overhead`). This keeps two sign maps. sign(0) = 0, as autograd's ``abs`` has it."""

    @staticmethod
    def forward(ctx, s, t, w, eps, *negatives):
        if t.requires_grad or any(n.requires_grad for n in negatives):
            raise ValueError("contrastive: the teacher's and the negatives' features must not require grad")
        n_el = s.numel()
        acc = torch.promote_types(s.dtype, torch.float32)  # the sums at least in fp32, even when s is bf16
        diff = s - t
        d_pos = torch.linalg.vector_norm(diff, 1, dtype=acc) / n_el
        sign_pos = diff.sign_()
        # One difference buffer for every negative, and norms that read it without writing |diff|:
        # each full-size temporary was a fresh allocation (page faults on CPU) and a pass more.
        d_neg, sign_neg, diff = s.new_zeros((), dtype=acc), torch.zeros_like(s), torch.empty_like(s)
        for n in negatives:
            torch.sub(s, n, out=diff)
            d_neg += torch.linalg.vector_norm(diff, 1, dtype=acc)
            sign_neg += diff.sign_()
        denom = d_neg / n_el + eps
        ctx.save_for_backward(sign_pos, sign_neg, d_pos, denom)
        ctx.scale, ctx.n_negatives = w / n_el, len(negatives)
        return w * d_pos / denom

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        sign_pos, sign_neg, d_pos, denom = ctx.saved_tensors
        grad_s = sign_neg.mul(-d_pos / denom).add_(sign_pos).mul_(grad * ctx.scale / denom)
        return (grad_s, None, None, None) + (None,) * ctx.n_negatives


def distribution_mapping(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """CE(teacher distribution -> student distribution) over the codebook axis (dim 1), mean over positions."""
    # Not the official code's form, on purpose. Its CELoss is F.cross_entropy(s_prob, t_prob) on
    # softmax *probabilities*: cross_entropy applies log_softmax to them again, so the loss is not
    # minimised at student = teacher (DCKD's official code, super-SSS/DCKD). A standard cross-entropy on
    # the logits is minimised there: the sound choice, kept deliberately.
    p_teacher = F.softmax(teacher_logits.float(), dim=1)
    return -(p_teacher * F.log_softmax(student_logits.float(), dim=1)).sum(1).mean()


def code_mapping(code_logits, student_latent: torch.Tensor, teacher_latent: torch.Tensor) -> torch.Tensor:
    """`distribution_mapping` over the codebook distances ``code_logits`` gives each latent. The
    distances come in as a callable so that, compiled, they fuse with the mapping."""
    return distribution_mapping(code_logits(student_latent), code_logits(teacher_latent))


# The consistency term's transforms, in the order `transform` applies them (the official code's
# `noising`): colour inversion 1 − x, a flip of the rows (dim −2, upside down), a flip of the
# columns (dim −1, left-right), a transposition of H and W. Each is its own inverse;
# `untransform` undoes them in reverse order.
CONSISTENCY_OPS = ("invert", "flip_rows", "flip_columns", "transpose")


def consistency_ops(batch: int, prob: float, generator: torch.Generator,
                    allowed: Sequence[str] = CONSISTENCY_OPS) -> torch.Tensor:
    """(batch, 4) bools: which of `CONSISTENCY_OPS` each sample gets, each independently with
    probability ``prob`` (drawn on the CPU from the recipe's seeded, checkpointed generator).
    Ops outside ``allowed`` are never chosen; all four are drawn anyway, so that two runs that
    allow different ops see the same draws for the ops they share."""
    drawn = torch.rand(batch, len(CONSISTENCY_OPS), generator=generator) < prob
    return drawn & torch.tensor([op in allowed for op in CONSISTENCY_OPS])


def _apply_op(x: torch.Tensor, op: int, chosen: torch.Tensor) -> torch.Tensor:
    done = (1 - x if op == 0 else x.flip(-2) if op == 1 else x.flip(-1) if op == 2 else x.transpose(-2, -1))
    # per sample, without boolean indexing (a host sync on a GPU): the op where chosen, else x
    return torch.where(chosen.view(-1, *([1] * (x.dim() - 1))), done, x)


def _apply_ops(x: torch.Tensor, ops: torch.Tensor, order) -> torch.Tensor:
    layout = torch.channels_last if x.dim() == 4 and not x.is_contiguous() and \
        x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    ops = ops.to(x.device, non_blocking=True)
    for op in order:
        x = _apply_op(x, op, ops[:, op])
    return x.contiguous(memory_format=layout)  # the input's layout (`train.channels_last`), not the views' mix


def transform(x: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) with each sample's chosen ops (``ops``: `consistency_ops`) applied in
    `CONSISTENCY_OPS` order. A transposition needs square images (training crops are)."""
    if x.shape[-2] != x.shape[-1]:
        raise ValueError(f"consistency: transposing needs square images, got {x.shape[-2]}x{x.shape[-1]}")
    return _apply_ops(x, ops, range(len(CONSISTENCY_OPS)))


def untransform(y: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """The inverse of `transform` for the same ``ops``: the same ops in reverse order."""
    return _apply_ops(y, ops, reversed(range(len(CONSISTENCY_OPS))))


@torch.no_grad()
def degrade(x: torch.Tensor, kind: str, teacher_out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One negative: a worse version of the input (DCKD's LQ copies), seeded."""
    def u(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    if kind == "blur":
        import torchvision.transforms.functional as TF

        return TF.gaussian_blur(x, kernel_size=7, sigma=u(1.0, 2.5))
    if kind == "resize":
        h, w = x.shape[-2:]
        f = u(2.0, 4.0)
        small = F.interpolate(x, size=(max(1, int(h / f)), max(1, int(w / f))), mode="bilinear", align_corners=False)
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    if kind == "noise":
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        return (x + u(0.03, 0.1) * noise).clamp(0, 1)
    if kind == "weather":  # more of this image's own weather: push the input away from the teacher's output
        return (x + u(0.5, 1.0) * (x - teacher_out)).clamp(0, 1)
    raise ValueError(f"unknown negative kind '{kind}'; use blur, resize, noise or weather")
