"""PyTorch side of the parity tests: randomly initialised torchvision ResNets and helpers."""

from __future__ import annotations

import numpy as np
import torch
import torchvision


def torch_resnet(arch: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised torchvision ResNet with a 2-class head whose BatchNorm layers have
    random affine parameters and non-trivial running statistics.

    The running statistics are first calibrated on random images (cumulative average over two
    batches) and then perturbed, so eval-mode BatchNorm is neither an identity nor wildly off:
    with raw random statistics a random ResNet-50's logits reach ~400, which says nothing about
    a real network and turns float32 round-off into large absolute errors.
    """
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = torch.nn.Linear(net.fc.in_features, 2)
    gen = torch.Generator().manual_seed(seed + 1)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.normal_(0.0, 0.1, generator=gen)
            m.momentum = None  # cumulative moving average while calibrating
        net.train()
        for _ in range(2):
            net(torch.randn(8, 3, 64, 64, generator=gen))
        for m in bns:
            m.momentum = 0.1
            m.running_mean.add_(0.05 * torch.randn(m.num_features, generator=gen))
            m.running_var.mul_(torch.empty(m.num_features).uniform_(0.8, 1.25, generator=gen))
            m.num_batches_tracked.fill_(7)
    return net.eval()


def numpy_state_dict(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def torch_forward(net, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()
