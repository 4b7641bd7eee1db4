"""Models and data for the validation harness: a toy layer and two digits classifiers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F


@dataclass
class Case:
    """A model, a loss and data whose Hessian the harness checks.

    Attributes:
        name: Short name used on the command line.
        description: One line for the report.
        model: The model, already on the requested device and dtype.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced.
        data: A list of ``(inputs, targets)`` batches.
        notes: Extra lines for the report (training loss, data size).
    """

    name: str
    description: str
    model: nn.Module
    loss_fn: Callable
    data: list
    notes: list[str] = field(default_factory=list)


def load_digits_tensors(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Return scikit-learn's bundled digits: 1,797 images of 8 x 8 pixels scaled to [0, 1], and labels.

    The data set ships inside scikit-learn, so nothing is downloaded.

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits cases need scikit-learn, which ships the data set; install it with "
            "pip install 'hutch[validate]' or pip install scikit-learn"
        ) from error
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=dtype) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return images, labels


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Train full-batch with Adam for a few steps; return the final loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        return float(F.cross_entropy(model(images), labels))


def _batches(inputs: torch.Tensor, targets: torch.Tensor, size: int, device) -> list:
    return [
        (inputs[i : i + size].to(device), targets[i : i + size].to(device))
        for i in range(0, inputs.shape[0], size)
    ]


def linear_case(seed: int, device: torch.device, dtype: torch.dtype) -> Case:
    """Build ``nn.Linear(2, 2)`` on one uniform input of shape (1, 2), cross-entropy with target class 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Linear(2, 2)
    model = model.to(device=device, dtype=dtype)
    x = torch.rand(1, 2, generator=generator, dtype=dtype).to(device)
    y = torch.tensor([1], device=device)
    return Case(
        name="linear",
        description="nn.Linear(2, 2), one input of shape (1, 2), cross-entropy, target class 1",
        model=model,
        loss_fn=F.cross_entropy,
        data=[(x, y)],
        notes=[f"input x = {x.cpu().tolist()}"],
    )


def mlp_case(seed: int, device: torch.device, dtype: torch.dtype) -> Case:
    """Build an MLP 64-32-10 with biases, trained briefly on all 1,797 digits, with the loss over the whole set."""
    images, labels = load_digits_tensors(dtype)
    inputs = images.reshape(-1, 64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)
    final_loss = _train(model, inputs, labels, steps=150)
    model = model.to(device)
    return Case(
        name="mlp",
        description="MLP 64-32-10 (tanh) on scikit-learn's digits, all 1,797 samples",
        model=model,
        loss_fn=F.cross_entropy,
        data=_batches(inputs, labels, 512, device),
        notes=[f"trained 150 full-batch Adam steps, final loss {final_loss:.4f}; 4 batches of <= 512"],
    )


def cnn_case(seed: int, device: torch.device, dtype: torch.dtype) -> Case:
    """Build a small CNN (conv 1->6, 3x3, ReLU, 2x2 average pool, linear 96->10), trained briefly on 512 digits."""
    images, labels = load_digits_tensors(dtype)
    inputs, labels = images[:512, None], labels[:512]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 10),
        ).to(dtype)
    final_loss = _train(model, inputs, labels, steps=100)
    model = model.to(device)
    return Case(
        name="cnn",
        description="CNN conv(1->6, 3x3)-ReLU-avgpool-linear(96->10) on the first 512 digits",
        model=model,
        loss_fn=F.cross_entropy,
        data=_batches(inputs, labels, 256, device),
        notes=[f"trained 100 full-batch Adam steps, final loss {final_loss:.4f}; 2 batches of 256"],
    )


CASES = {"linear": linear_case, "mlp": mlp_case, "cnn": cnn_case}
