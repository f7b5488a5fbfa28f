"""Architectures ConvLens ships itself (no download, no third-party import).

``RNet`` is MTCNN's refinement network (Zhang, Zhang, Li, Qiao, "Joint Face Detection and
Alignment Using Multitask Cascaded Convolutional Networks", IEEE SPL 2016), written to match the
state dict of ``facenet_pytorch/data/rnet.pt`` (MIT) so those pretrained weights load as-is.
It classifies a 24x24 RGB crop as non-face (index 0) or face (index 1).
"""

from __future__ import annotations

import torch
from torch import nn


class RNet(nn.Module):
    """MTCNN RNet: returns ``(logits, box)``; logits index 0 = non-face, 1 = face.

    Input: (N, 3, 24, 24) RGB, normalised as (pixel - 127.5) / 128.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The original Caffe model was trained on transposed images: flatten in (N, W, H, C) order.
        x = x.permute(0, 3, 2, 1).contiguous().flatten(1)
        x = self.prelu4(self.dense4(x))
        return self.dense5_1(x), self.dense5_2(x)


#: Architectures addressable by short name besides torchvision's (``--arch rnet``).
BUILTIN_ARCHS: dict[str, type[nn.Module]] = {"rnet": RNet}
