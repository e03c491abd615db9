"""Distillation losses: KD to the teacher, and DCKD's two terms (papers/001).

- Dynamic contrastive regularisation: ``Σ_l w_l · d(s, t) / (Σ_neg d(s, n) + ε)`` on VQ-encoder
  features, with d the mean absolute difference (the AECR-Net ratio form the official code uses).
- Distribution mapping: cross-entropy from the teacher's to the student's per-position
  distribution over the VQ codebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive(student: list[torch.Tensor], teacher: list[torch.Tensor], negatives: list[list[torch.Tensor]],
                weights: list[float], eps: float = 1e-7) -> torch.Tensor:
    """``student``/``teacher``: features per level; ``negatives``: per negative, features per level."""
    total = 0.0
    for level, (w, s, t) in enumerate(zip(weights, student, teacher)):
        d_pos = (s - t).abs().mean()
        d_neg = sum((s - neg[level]).abs().mean() for neg in negatives)
        total = total + w * d_pos / (d_neg + eps)
    return total


def distribution_mapping(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """CE(teacher distribution -> student distribution) over the codebook axis (dim 1), mean over positions."""
    p_teacher = F.softmax(teacher_logits.float(), dim=1)
    return -(p_teacher * F.log_softmax(student_logits.float(), dim=1)).sum(1).mean()


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
