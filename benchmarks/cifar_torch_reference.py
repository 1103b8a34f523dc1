"""PyTorch side of the CIFAR parity tests (tests/test_cifar_models.py) and of the CIFAR speed
benchmark (benchmarks/cifar_speed.py): renderings of mdistiller's CIFAR networks
(``mdistiller/models/cifar/{resnet,wrn,vgg,mobilenetv2,ShuffleNetv1,ShuffleNetv2}.py``, the same
as RepDistiller's ``models/*.py``) written from their published definitions, module for module
and name for name, each ``forward`` returning ``(logits, feats)`` as mdistiller's does; and
``torch_cifar``, a randomly initialised one with random BatchNorm statistics.

torchdistill 1.1.5 ships one of these networks itself: its ``ResNet4Cifar`` (torchvision's
BasicBlock, widths 16, 32, 64) is mdistiller's resnet8..110; ``torchdistill_resnet`` builds it
and the tests hold this rendering to it. Its Wide ResNet is another network (every block
activates its input and the shortcut reads the raw input), so the WRNs here are rendered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdjax.models.cifar_vgg import VGG_STAGES

# --------------------------------------------------------------------------- resnet.py


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None, is_last=False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        preact = out
        out = F.relu(out)
        return (out, preact) if self.is_last else out


class ResNet(nn.Module):
    def __init__(self, depth, num_filters, num_classes=100):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, is_last=(blocks == 1))]
        self.inplanes = planes
        for i in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes, is_last=(i == blocks - 1)))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, f1_pre = self.layer1(x)
        f1 = x
        x, f2_pre = self.layer2(x)
        f2 = x
        x, f3_pre = self.layer3(x)
        f3 = x
        avg = self.avgpool(x).reshape(x.size(0), -1)
        return self.fc(avg), {"feats": [f0, f1, f2, f3], "preact_feats": [f0, f1_pre, f2_pre, f3_pre],
                              "pooled_feat": avg}


# --------------------------------------------------------------------------- wrn.py


class WideBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else out_planes, out_planes,
                                               stride if i == 0 else 1) for i in range(nb_layers)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """``reapply_preact_bn``: mdistiller's forward, which applies ``block2.layer.0.bn1``,
    ``block3.layer.0.bn1`` and ``bn1`` a second time for its ``preact_feats`` (False:
    RepDistiller's forward without ``preact``, which returns the same feats' values)."""

    def __init__(self, depth, num_classes=100, widen_factor=1, reapply_preact_bn=True):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]
        self.reapply_preact_bn = reapply_preact_bn

    def forward(self, x):
        out = self.conv1(x)
        f0 = out
        out = self.block1(out)
        f1 = out
        out = self.block2(out)
        f2 = out
        out = self.block3(out)
        f3 = out
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        f4 = out.reshape(-1, self.nChannels)
        out = self.fc(f4)
        if self.reapply_preact_bn:
            pre = [self.block2.layer[0].bn1(f1), self.block3.layer[0].bn1(f2), self.bn1(f3)]
        else:  # the same values, on copies of the running statistics (which stay as they are)
            pre = [F.batch_norm(f, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, self.training)
                   for f, bn in ((f1, self.block2.layer[0].bn1), (f2, self.block3.layer[0].bn1), (f3, self.bn1))]
        return out, {"feats": [f0, f1, f2, f3], "preact_feats": [f0, *pre], "pooled_feat": f4}


# --------------------------------------------------------------------------- vgg.py


class VGG(nn.Module):
    def __init__(self, cfg, num_classes=100):
        super().__init__()
        self.block0 = self._make_layers(cfg[0], 3)
        self.block1 = self._make_layers(cfg[1], cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        h = x.shape[2]
        x = F.relu(self.block0(x))
        f0 = x
        pre, feats = [f0], [f0]
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4)):
            if i < 3 or h == 64:
                x = (self.pool0, self.pool1, self.pool2, self.pool3)[i](x)
            x = block(x)
            pre.append(x)
            x = F.relu(x)
            feats.append(x)
        f5 = self.pool4(x).reshape(x.size(0), -1)
        return self.classifier(f5), {"feats": feats, "preact_feats": pre, "pooled_feat": f5}

    @staticmethod
    def _make_layers(cfg, in_channels):
        layers = []
        for v in cfg:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
        return nn.Sequential(*layers[:-1])


# --------------------------------------------------------------------------- mobilenetv2.py


def conv_bn(inp, oup, stride):
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp, oup):
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        hidden = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, T, feature_dim, input_size=32, width_mult=1.0):
        super().__init__()
        setting = [[1, 16, 1, 1], [T, 24, 2, 1], [T, 32, 3, 2], [T, 64, 4, 2], [T, 96, 3, 1], [T, 160, 3, 2],
                   [T, 320, 1, 1]]
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 2)
        self.blocks = nn.ModuleList([])
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, feature_dim))
        self.avgpool = nn.AvgPool2d(input_size // (32 // 2), ceil_mode=True)

    def forward(self, x):
        out = self.conv1(x)
        feats = [out]
        for i, block in enumerate(self.blocks):
            out = block(out)
            if i in (1, 2, 4, 6):
                feats.append(out)
        out = self.avgpool(self.conv2(out))
        avg = out.reshape(out.size(0), -1)
        return self.classifier(avg), {"feats": feats, "pooled_feat": avg}


# --------------------------------------------------------------------------- ShuffleNetv1.py, ShuffleNetv2.py


class ShuffleBlock(nn.Module):
    def __init__(self, groups=2):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.size()
        return x.view(n, self.groups, c // self.groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    def __init__(self, in_planes, out_planes, stride, groups, is_last=False):
        super().__init__()
        self.is_last = is_last
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride, 1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class ShuffleNet(nn.Module):
    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes, num_blocks, groups):
        layers = []
        for i in range(num_blocks):
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, stride=2 if i == 0 else 1,
                                     groups=groups, is_last=(i == num_blocks - 1)))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        f0 = out
        out, f1_pre = self.layer1(out)
        f1 = out
        out, f2_pre = self.layer2(out)
        f2 = out
        out, f3_pre = self.layer3(out)
        f3 = out
        f4 = F.avg_pool2d(out, 4).reshape(out.size(0), -1)
        return self.linear(f4), {"feats": [f0, f1, f2, f3], "preact_feats": [f0, f1_pre, f2_pre, f3_pre],
                                 "pooled_feat": f4}


class SplitBlock(nn.Module):
    def __init__(self, ratio):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        c = int(x.size(1) * self.ratio)
        return x[:, :c, :, :], x[:, c:, :, :]


class ShuffleV2Basic(nn.Module):
    def __init__(self, in_channels, split_ratio=0.5, is_last=False):
        super().__init__()
        self.is_last = is_last
        self.split = SplitBlock(split_ratio)
        in_channels = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, in_channels, 3, 1, 1, groups=in_channels, bias=False)
        self.bn2 = nn.BatchNorm2d(in_channels)
        self.conv3 = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(in_channels)
        self.shuffle = ShuffleBlock()

    def forward(self, x):
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        preact = self.bn3(self.conv3(out))
        out = F.relu(preact)
        preact = torch.cat([x1, preact], 1)
        out = self.shuffle(torch.cat([x1, out], 1))
        return (out, preact) if self.is_last else out


class DownBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x):
        out1 = self.bn1(self.conv1(x))
        out1 = F.relu(self.bn2(self.conv2(out1)))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = self.bn4(self.conv4(out2))
        out2 = F.relu(self.bn5(self.conv5(out2)))
        return self.shuffle(torch.cat([out1, out2], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels, num_blocks):
        layers = [DownBlock(self.in_channels, out_channels)]
        for i in range(num_blocks):
            layers.append(ShuffleV2Basic(out_channels, is_last=(i == num_blocks - 1)))
            self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        f0 = out
        out, f1_pre = self.layer1(out)
        f1 = out
        out, f2_pre = self.layer2(out)
        f2 = out
        out, f3_pre = self.layer3(out)
        f3 = out
        out = F.relu(self.bn2(self.conv2(out)))
        f4 = F.avg_pool2d(out, 4).reshape(out.size(0), -1)
        return self.linear(f4), {"feats": [f0, f1, f2, f3], "preact_feats": [f0, f1_pre, f2_pre, f3_pre],
                                 "pooled_feat": f4}


# --------------------------------------------------------------------------- builders

_RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 110)


def rendering(arch: str, num_classes: int = 100, **kwargs) -> nn.Module:
    """The rendering of mdistiller's ``arch`` (kdjax's name), as mdistiller's builder makes it."""
    if arch.startswith("resnet"):
        depth = int(arch[len("resnet"):].removesuffix("x4"))
        widths = [32, 64, 128, 256] if arch.endswith("x4") else [16, 16, 32, 64]
        return ResNet(depth, widths, num_classes)
    if arch.startswith("wrn_"):
        _, depth, widen = arch.split("_")
        return WideResNet(int(depth), num_classes, int(widen), **kwargs)
    if arch in VGG_STAGES:
        return VGG([list(stage) for stage in VGG_STAGES[arch]], num_classes)
    builders = {"mobilenetv2_cifar": lambda: MobileNetV2(6, num_classes, width_mult=0.5),
                "shufflenetv1_cifar": lambda: ShuffleNet(num_classes=num_classes),
                "shufflenetv2_cifar": lambda: ShuffleNetV2(num_classes=num_classes)}
    return builders[arch]()


def torchdistill_resnet(arch: str, num_classes: int = 100) -> nn.Module | None:
    """torchdistill's ``ResNet4Cifar`` for mdistiller's resnet8..110 (None for other archs)."""
    from torchdistill.models.classification.resnet import BasicBlock as TorchvisionBlock, ResNet4Cifar

    depth = arch.removeprefix("resnet")
    if not depth.isdigit() or int(depth) not in _RESNET_DEPTHS:
        return None
    n = (int(depth) - 2) // 6
    return ResNet4Cifar(TorchvisionBlock, [n, n, n], num_classes)


def randomised(net: nn.Module, seed: int = 0, **kwargs) -> nn.Module:
    """``net`` (in eval mode) with weights as a trained network has them rather than as
    initialised: random BatchNorm affines, Linear weights N(0, 1/fan_in) (mdistiller draws VGG's
    and MobileNetV2's at N(0, 0.01), logits ~1e-2) and every bias N(0, 0.1) (mdistiller zeroes
    VGG's convolution biases and several Linear ones, which would hide a misplaced bias); the
    running statistics calibrated on random images (cumulative average over two batches), then
    perturbed, so eval-mode BatchNorm is neither an identity nor far off."""
    gen = torch.Generator().manual_seed(seed + 1)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0 / m.in_features**0.5, generator=gen)
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.normal_(0.0, 0.1, generator=gen)
        for m in bns:
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.normal_(0.0, 0.1, generator=gen)
            m.momentum = None
        net.train()
        for _ in range(2):
            net(torch.randn(8, 3, 32, 32, generator=gen))
        for m in bns:
            m.momentum = 0.1
            m.running_mean.add_(0.05 * torch.randn(m.num_features, generator=gen) * m.running_var.sqrt())
            m.running_var.mul_(torch.empty(m.num_features).uniform_(0.8, 1.25, generator=gen))
            m.num_batches_tracked.fill_(7)
    return net.eval()


def torch_cifar(arch: str, seed: int = 0, num_classes: int = 100) -> nn.Module:
    """``randomised`` rendering of ``arch`` seeded with ``seed`` (torch's global generator draws
    the initial weights)."""
    torch.manual_seed(seed)
    return randomised(rendering(arch, num_classes), seed)
