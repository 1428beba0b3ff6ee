"""ResNet-IBN-a (Pan et al., ECCV 2018), key-compatible with the public IBN-Net ``resnet50_ibn_a`` weights.

Layout: ``conv1/bn1/layer1..4/fc``; in layers 1-3 each bottleneck's ``bn1`` is an ``IBN`` holding
``bn1.IN`` (InstanceNorm on the first half of the channels) and ``bn1.BN`` (BatchNorm on the rest).
"""

from __future__ import annotations

import torch
from torch import nn


class IBN(nn.Module):
    """Instance norm on the first ``ratio`` of the channels, batch norm on the others."""

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat((self.IN(a.contiguous()), self.BN(b.contiguous())), dim=1)


class BottleneckIBN(nn.Module):
    """ResNet bottleneck (stride on the 3x3 conv) whose first norm is IBN when ``ibn`` is set."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, ibn: bool, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = IBN(planes) if ibn else nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNetIBN(nn.Module):
    """ResNet-IBN-a trunk; ``forward_features`` returns the last feature map (NCHW)."""

    def __init__(self, layers: tuple[int, int, int, int], last_stride: int = 2, num_classes: int = 0) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], stride=1, ibn=True)
        self.layer2 = self._make_layer(128, layers[1], stride=2, ibn=True)
        self.layer3 = self._make_layer(256, layers[2], stride=2, ibn=True)
        self.layer4 = self._make_layer(512, layers[3], stride=last_stride, ibn=False)
        self.num_features = 512 * BottleneckIBN.expansion
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int, ibn: bool) -> nn.Sequential:
        downsample = None
        out = planes * BottleneckIBN.expansion
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        layers = [BottleneckIBN(self.inplanes, planes, ibn, stride, downsample)]
        self.inplanes = out
        layers += [BottleneckIBN(out, planes, ibn) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).mean(dim=(2, 3)))


IBN_DEPTHS = {"resnet50_ibn_a": (3, 4, 6, 3), "resnet101_ibn_a": (3, 4, 23, 3)}


def resnet_ibn_a(name: str, last_stride: int = 2, num_classes: int = 0) -> ResNetIBN:
    """Build ``resnet50_ibn_a`` or ``resnet101_ibn_a`` with random weights."""
    if name not in IBN_DEPTHS:
        raise ValueError(f"unknown IBN-Net model {name!r}; choose one of {sorted(IBN_DEPTHS)}")
    return ResNetIBN(IBN_DEPTHS[name], last_stride=last_stride, num_classes=num_classes)
