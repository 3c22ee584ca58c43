"""The demo CNN, split the way SPEC §2 wants every model: a backbone giving non-negative
features and a separate linear head, so neural PCA can work on w_k ⊙ phi(x) directly.
"""
from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 128


def _block(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]


class DemoCNN(nn.Module):
    """A bag-of-local-features CNN (BagNet-like): 25-pixel receptive fields, then a global
    average pool, so phi(x) in R^d_{>=0} and `head` = Linear(d, C).

    Why local: evidence then adds up over the image, so a planted feature moves phi by about the
    same amount whether or not the class object is beside it. A deep net with receptive fields
    spanning the whole image instead learns units for "object or feature", and no direction of
    w_k ⊙ phi within class k is the feature alone. Shapes still separate by their local parts
    (corner angles, curvature, holes).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            *_block(3, 16, stride=2),  # 32x32, cheap on a CPU
            *_block(16, 32),
            nn.MaxPool2d(2),  # 16x16
            *_block(32, 64),
            *_block(64, 64),
            *_block(64, FEATURE_DIM, kernel=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, C] for normalised images [N, 3, H, W]."""
        return self.head(self.backbone(x))
