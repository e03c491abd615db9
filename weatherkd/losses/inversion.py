"""Terms of teacher inversion (Dreaming to Prune, after DeepInversion): match recorded feature statistics,
spread deep features apart across the batch, and keep the images natural."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weatherkd.models.feature_stats import channel_moments


def statistics(features: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """‖μ − μ*‖₂ + ‖σ² − σ²*‖₂ over channels: the batch's moments against the recorded ones."""
    m, v = channel_moments(features, channel_dim)
    return torch.linalg.vector_norm(m - mean) + torch.linalg.vector_norm(v - var)


def orthogonality(features: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between different samples' features: zero when they are
    mutually orthogonal, so minimising it makes a dreamed batch diverse."""
    f = F.normalize(features.flatten(1).float(), dim=1)
    gram = f @ f.T
    b = gram.shape[0]
    if b < 2:
        return gram.new_zeros(())
    return (gram - torch.eye(b, device=gram.device)).pow(2).sum() / (b * (b - 1))


def mean_pairwise_distance(features: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance between the L2-normalised features of every pair in the batch."""
    f = F.normalize(features.flatten(1).float(), dim=1)
    b = f.shape[0]
    return torch.cdist(f, f).sum() / (b * (b - 1))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (TV-L1)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """Mean squared distance from mid-grey: keeps pixels away from saturating."""
    return (x - 0.5).pow(2).mean()
