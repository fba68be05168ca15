"""The networks, built by name."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """The PyTorch tutorial's CNN, layer for layer: 62 k parameters, 0.65 M multiply-adds."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


_BUILDERS = {"tutorial": Net}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_BUILDERS)}") from None
    return builder(num_classes=num_classes)


def model_names() -> tuple[str, ...]:
    return tuple(_BUILDERS)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def predict_log_proba(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Class log-probabilities averaged over each image and its mirror image.

    Flip test-time augmentation: a cheap, reliable point or two of accuracy. Every
    evaluation and the served model go through here, so they agree.
    """
    views = torch.stack([model(inputs).float(), model(inputs.flip(-1)).float()])
    return views.log_softmax(dim=-1).logsumexp(dim=0) - math.log(2)
