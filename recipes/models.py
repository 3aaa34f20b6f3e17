"""Image classifiers of the paper's experiments: CIFAR ResNet-20 and WRN-16-8, and torchvision's ResNet-18/50.

ResNet-20 is the CIFAR variant of He et al. (CVPR 2016, Sec. 4.2: three stages of 16/32/64 channels, n=3 basic
blocks each); WRN-16-8 is the wide residual network of Zagoruyko and Komodakis (BMVC 2016) with depth 16 and
width factor 8, pre-activation blocks and dropout 0. Both take 32x32 inputs.
"""

from __future__ import annotations

import torchvision
from torch import Tensor, nn


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = nn.functional.relu(self.bn1(x))
        out = self.conv2(nn.functional.relu(self.bn2(self.conv1(pre))))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


def resnet20(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20 (0.27M parameters)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for index in range(3):
            layers.append(_BasicBlock(cin, cout, stride if index == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def wrn16_8(num_classes: int = 10) -> nn.Module:
    """WRN-16-8 (11M parameters): two wide blocks per stage, widths 128/256/512."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)]
    cin = 16
    for cout, stride in ((128, 1), (256, 2), (512, 2)):
        for index in range(2):
            layers.append(_WideBlock(cin, cout, stride if index == 0 else 1))
            cin = cout
    layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


MODELS = {
    "resnet20": resnet20,
    "wrn16_8": wrn16_8,
    "resnet18": lambda num_classes=1000: torchvision.models.resnet18(num_classes=num_classes),
    "resnet50": lambda num_classes=1000: torchvision.models.resnet50(num_classes=num_classes),
}


def build_model(name: str, num_classes: int) -> nn.Module:
    """Builds a model by name (``resnet20``, ``wrn16_8``, ``resnet18``, ``resnet50``), randomly initialised."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. HINT: choose one of {', '.join(map(repr, MODELS))}.")
    return MODELS[name](num_classes=num_classes)
