"""A small CNN for the built-in part data set (:mod:`engine.concepts.parts`), CPU-trainable.

``PartNet`` takes 48x48 RGB images: four 3x3 conv stages (16, 32, 64, 64 channels; 2x2 max
pooling after the first three), so the top conv layer ``relu4`` gives 6x6 maps of 64 filters,
then two fully connected layers. Address it as ``--arch engine.filters.partnet:PartNet``.
"""

from __future__ import annotations

import torch
from torch import nn

PARTNET_ARCH = "engine.filters.partnet:PartNet"


class PartNet(nn.Module):
    """Input (N, 3, 48, 48); output (N, num_classes) logits."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.MaxPool2d(2)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.relu4 = nn.ReLU()
        self.fc1 = nn.Linear(64 * 6 * 6, 64)
        self.relu5 = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.pool3(self.relu3(self.conv3(x)))
        x = self.relu4(self.conv4(x))
        return self.fc2(self.relu5(self.fc1(x.flatten(1))))
