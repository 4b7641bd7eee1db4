"""The four benchmark workloads, built in code from bundled or random data.

Every workload is a model in eval mode (no dropout, batch norm on its running
statistics), a cross-entropy loss with mean reduction and one
``(inputs, targets)`` batch. Nothing is downloaded: the digits come with
scikit-learn and the rest is drawn from a seeded ``torch.Generator``.

| name        | model                                   | data                          | parameters |
|-------------|-----------------------------------------|-------------------------------|------------|
| mlp         | MLP 64-32-10, tanh                      | all 1,797 digits (8x8)        | 2,410      |
| cnn         | 2 conv + 2 linear layers                | first 256 digits              | 11,676     |
| transformer | 2-layer ``nn.TransformerEncoder``, d=64 | 64 random sequences of 16     | 67,594     |
| resnet18    | ResNet-18 with BasicBlocks, 10 classes  | 8 random images, 3x32x32      | 11,173,962 |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

WORKLOAD_NAMES = ("mlp", "cnn", "transformer", "resnet18")

DESCRIPTIONS = {
    "mlp": "MLP 64-32-10 on all 1,797 digits",
    "cnn": "CNN on 256 digits",
    "transformer": "2-layer transformer encoder, d=64, math attention, 64 random sequences of 16",
    "resnet18": "ResNet-18, 8 random images 32x32",
}


@dataclass
class Workload:
    """A model, its loss and one batch, ready for every tool under test."""

    name: str
    description: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def gradient_bytes(self) -> int:
        """Bytes of one gradient: the unit of memory in every table."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


# --- data -----------------------------------------------------------------


def digits(num_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return scikit-learn's bundled 8x8 digits, scaled to [0, 1], as (N, 64) and (N,)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    inputs = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    targets = torch.as_tensor(bunch.target, dtype=torch.long)
    if num_samples is not None:
        inputs, targets = inputs[:num_samples], targets[:num_samples]
    return inputs, targets


# --- models ---------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


class SmallCNN(nn.Module):
    """Two 3x3 convolutions, one 2x2 max pool and two linear layers for 8x8 images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 20, 3, padding=1)
        self.fc1 = nn.Linear(20 * 4 * 4, 26)
        self.fc2 = nn.Linear(26, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        x = torch.relu(self.conv1(x))
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.tanh(self.fc1(x.flatten(1)))
        return self.fc2(x)


class SequenceClassifier(nn.Module):
    """A 2-layer transformer encoder over embeddings, mean-pooled into class logits.

    Attention runs on the math kernel of ``scaled_dot_product_attention``,
    the one whose backward can itself be differentiated, so double backward,
    forward-over-reverse and every peer see the same computation.
    """

    def __init__(self, d_model: int = 64, num_heads: int = 4, num_layers: int = 2, num_classes: int = 10):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model, num_heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        # Nested tensors are a fast path for padded batches; these batches have no padding.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            h = self.encoder(x)
        return self.head(h.mean(dim=1))


class BasicBlock(nn.Module):
    """The two-convolution residual block of ResNet-18 (He et al., 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images: a 3x3 stem, four stages of two BasicBlocks, a linear head.

    Reference: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for
    Image Recognition", CVPR 2016. The 3x3 stem without max pooling is the
    usual variant for 32x32 inputs.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        in_channels = 64
        for out_channels, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(BasicBlock(in_channels, out_channels, stride))
            stages.append(BasicBlock(out_channels, out_channels, 1))
            in_channels = out_channels
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# --- workloads -------------------------------------------------------------


def build(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Workload:
    """Build workload ``name`` with parameters and data drawn from ``seed``.

    Args:
        name: One of ``WORKLOAD_NAMES``.
        device: Device for the model and the batch.
        dtype: Floating-point dtype of the parameters and inputs.
        seed: Seed of the parameter initialization and of random inputs.

    Raises:
        ValueError: If ``name`` is unknown.
    """
    if name not in WORKLOAD_NAMES:
        raise ValueError(f"workload must be one of {list(WORKLOAD_NAMES)}; got {name!r}")

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            model = mlp()
            inputs, targets = digits()
        elif name == "cnn":
            model = SmallCNN()
            inputs, targets = digits(256)
        elif name == "transformer":
            model = SequenceClassifier()
            inputs = torch.randn(64, 16, 64, generator=generator)
            targets = torch.randint(0, 10, (64,), generator=generator)
        else:
            model = ResNet18()
            inputs = torch.randn(8, 3, 32, 32, generator=generator)
            targets = torch.randint(0, 10, (8,), generator=generator)

    model = model.to(device=device, dtype=dtype).eval()
    inputs = inputs.to(device=device, dtype=dtype)
    targets = targets.to(device)
    workload = Workload(name, "", model, F.cross_entropy, inputs, targets)
    workload.description = f"{DESCRIPTIONS[name]} ({workload.num_params:,} params)"
    return workload
