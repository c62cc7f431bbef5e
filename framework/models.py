"""Models built with ``_target_`` from ``conf/model/``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LeNet(nn.Module):
    """The founding document's Net: conv 1->20->50, fc 800->500->10 (431,080 params), 28x28 input."""

    def __init__(self, conv1: int = 20, conv2: int = 50, hidden: int = 500, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, conv1, 5)
        self.conv2 = nn.Conv2d(conv1, conv2, 5)
        self.fc1 = nn.Linear(4 * 4 * conv2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = torch.flatten(x, 1)  # the document's view(-1, 4*4*50), without hard-coding the width
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


class MLP(nn.Module):
    """A small fully connected classifier over flattened images."""

    def __init__(self, in_features: int = 784, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(F.relu(self.fc1(torch.flatten(x, 1)))), dim=1)


class SimpleNet(nn.Module):
    """The founding document's quantization example: one Linear layer, 10 -> 1."""

    def __init__(self, in_features: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class BigModel(nn.Module):
    """The distillation teacher. The document's BigModel is a single Linear, no bigger than its student;
    this one has two hidden layers so that there is something to distil."""

    def __init__(self, in_features: int = 10, hidden: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallModel(SimpleNet):
    """The distillation student, as in the document: one Linear layer, 10 -> 1."""
