"""Plain LightningModules for the demos: ordinary float models with no knowledge of quantization.

They are written the way a user writes a model (``nn.ReLU`` modules, Conv/Linear layers, Adam over
``self.parameters()``), so that the quantization callbacks can be shown and tested on code they do not control.
Modules are registered in the order they run, which keeps "first" and "last" layer well defined for surgery
policies that read ``named_modules()`` order.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy


class _Classifier(L.LightningModule):
    """Training, evaluation, metrics and optimizer shared by the demo models; subclasses define ``forward``."""

    def _init_classifier(self, num_classes: int, lr: float, weight_decay: float, example: Tensor) -> None:
        self.lr = lr
        self.weight_decay = weight_decay
        # Micro average: plain fraction of correct predictions (torchmetrics' default for multiclass is macro).
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.example_input_array = example

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        # sync_dist averages the loss over DDP ranks (a no-op on one device); the metric objects sync themselves.
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class DemoCNN(_Classifier):
    """Three conv blocks (conv, BatchNorm, ReLU), pooling, and a two-layer classifier head.

    The second and third blocks stride by 2 and an adaptive pool brings any input to 2x2, so the same model runs on
    8x8 digits and 28x28 MNIST.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output classes.
        input_size: Height (= width) of the input images; only sets ``example_input_array``.
        width: Channels of the first block; later blocks use ``2 * width``.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 8,
        width: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        w2 = 2 * width
        # Registration order is execution order (see module docstring).
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, w2, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(w2, w2, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w2)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(w2 * 4, w2, bias=False)
        self.bn4 = nn.BatchNorm1d(w2)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(w2, num_classes)
        # Batch of 2: BatchNorm1d refuses a batch of one in train mode.
        self._init_classifier(num_classes, lr, weight_decay, torch.zeros(2, in_channels, input_size, input_size))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images of shape ``(N, in_channels, H, W)``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.flatten(self.pool(x))
        x = self.relu4(self.bn4(self.fc1(x)))
        return self.fc2(x)


class DemoMLP(_Classifier):
    """A tiny multi-layer perceptron (Linear, ReLU, Linear, ReLU, Linear) on flattened images, for fast tests.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output classes.
        input_size: Height (= width) of the input images.
        hidden: Width of the two hidden layers.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 8,
        hidden: int = 64,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * input_size * input_size, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, num_classes)
        self._init_classifier(num_classes, lr, weight_decay, torch.zeros(2, in_channels, input_size, input_size))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images of shape ``(N, in_channels, input_size, input_size)``."""
        x = self.flatten(x)
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)
