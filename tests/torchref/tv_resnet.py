"""PyTorch reference: the ResNet of DSRAN's own `resnet.py` (torchvision's network, key
names and forward, returning the four stage outputs), written after the authors' code.

Runs in the jax-free reference process (see `torchref/__init__.py`). Its state dict has
torchvision's keys (`conv1.weight`, `layer1.0.downsample.1.running_var`, `fc.weight`,
every BatchNorm's `num_batches_tracked`), as `img_enc.cnn.*` in their checkpoints.
"""
import torch
from torch import nn


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride here, v1.5) -> 1x1, BatchNorm after each, projected shortcut."""
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class ResNet(nn.Module):
  """Their `ResNet(Bottleneck, layers)`; `forward` returns `(x1, x2, x3, x4)`, the four
  stages' maps (their EncoderImageFull reads `x4`). `widths` and `stem` default to
  torchvision's; smaller ones make a small network with the same key names."""

  def __init__(self, layers=(3, 8, 36, 3), widths=(64, 128, 256, 512), stem=64,
               num_classes=1000):
    super().__init__()
    self.inplanes = stem
    self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(stem)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(widths[0], layers[0])
    self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
    self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
    self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(widths[3] * Bottleneck.expansion, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def _make_layer(self, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride,
                    bias=False),
          nn.BatchNorm2d(planes * Bottleneck.expansion))
    layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * Bottleneck.expansion
    layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x1 = self.layer1(x)
    x2 = self.layer2(x1)
    x3 = self.layer3(x2)
    x4 = self.layer4(x3)
    return x1, x2, x3, x4


def randomise(model: ResNet, seed: int) -> ResNet:
  """Distinct BatchNorm statistics in every layer, as a trained-then-drifted CNN has:
  running stats from one train-mode pass over noise images (so activations keep their
  scale through the blocks), then scaled and shifted at random; random affine
  parameters, head and step counters (a different count per layer)."""
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  for bn in bns:
    bn.momentum = 1.0
  model.train()
  with torch.no_grad():
    model(torch.randn(2, 3, 64, 64, generator=g))
    for i, bn in enumerate(bns):
      n = bn.num_features
      bn.running_var.mul_(0.7 + 0.7 * torch.rand(n, generator=g))
      bn.running_mean.add_(0.2 * bn.running_var.sqrt() * torch.randn(n, generator=g))
      bn.weight.copy_(0.6 + 0.8 * torch.rand(n, generator=g))
      bn.bias.copy_(0.2 * torch.randn(n, generator=g))
      bn.num_batches_tracked.fill_(1000 + i)
      bn.momentum = 0.1
    model.fc.weight.copy_(0.01 * torch.randn(model.fc.weight.shape, generator=g))
    model.fc.bias.copy_(0.01 * torch.randn(model.fc.bias.shape, generator=g))
  return model.eval()
