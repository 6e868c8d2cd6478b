"""Seeded synthetic features shaped like CLIP's, for tests of the blend and the tuner.

What matters about real CLIP features here: every image-image cosine is positive (one
shared "modality" direction dominates, cosines ~0.45-0.8), class structure lives in a
low-rank subspace, and image-text cosines are small (~0.1-0.35), so signatures
softmax(x W_t / T) are nearly flat. Random unit vectors have none of these properties.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ClipLike:
    text_weights: torch.Tensor  # D x C, columns unit
    keys: torch.Tensor  # N x D support image keys (mean of views)
    queries: torch.Tensor  # N x D each support image's plain view, close to its key
    labels: torch.Tensor  # N support labels
    test_features: torch.Tensor  # M x D held-out images of the same classes
    test_labels: torch.Tensor  # M


def clip_like(
    classes: int,
    per_class: int | list[int],
    *,
    dim: int = 64,
    rank: int = 24,
    seed: int = 0,
    informative_labels: bool = True,
    within_class: float = 0.9,
    text_noise: float = 1.0,
    test_per_class: int = 0,
) -> ClipLike:
    """Support items of `classes` classes (`per_class` each, or one count per class).

    `informative_labels=False` draws the support labels independently of the features
    (a random permutation of the same class counts): no method can beat chance on them.
    `within_class` is the spread of images around their class centre in the class subspace;
    `text_noise` the spread of each class's text weight around it (large: useless zero-shot).
    """
    g = torch.Generator().manual_seed(seed)
    counts = [per_class] * classes if isinstance(per_class, int) else list(per_class)
    basis, _ = torch.linalg.qr(torch.randn(dim, rank + 2, generator=g))
    image_dir, text_dir, subspace = basis[:, 0], basis[:, 1], basis[:, 2:]
    centres = torch.randn(classes, rank, generator=g)

    def images(labels: torch.Tensor) -> torch.Tensor:
        codes = centres[labels] + within_class * torch.randn(len(labels), rank, generator=g)
        class_part = F.normalize(codes @ subspace.T, dim=-1)
        noise = 0.25 / dim**0.5 * torch.randn(len(labels), dim, generator=g)
        return F.normalize(0.85 * image_dir + 0.5 * class_part + noise, dim=-1)

    truth = torch.arange(classes).repeat_interleave(torch.tensor(counts))
    keys = images(truth)
    queries = F.normalize(keys + 0.1 / dim**0.5 * torch.randn(keys.shape, generator=g), dim=-1)
    text_codes = centres + text_noise * torch.randn(classes, rank, generator=g)
    text = 0.8 * text_dir + 0.3 * image_dir + 0.3 * F.normalize(text_codes @ subspace.T, dim=-1)
    text_weights = F.normalize(text + 0.1 / dim**0.5 * torch.randn(classes, dim, generator=g), dim=-1).T.contiguous()
    labels = truth if informative_labels else truth[torch.randperm(len(truth), generator=g)]
    test_labels = torch.arange(classes).repeat_interleave(test_per_class)
    return ClipLike(text_weights, keys, queries, labels, images(test_labels), test_labels)
