"""Small models, data and a minimal Trainer shared by the callback tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def toy_data(n: int = 96, features: int = 8, seed: int = 0) -> TensorDataset:
    """A three-class problem a small MLP learns in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorDataset(x, y)


class _Classifier(L.LightningModule):
    """Cross-entropy training and validation steps, logging ``train_loss`` (per epoch) and ``val_loss``."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


class ToyNet(_Classifier):
    """``backbone`` (Linear, ReLU, Linear), then ``self.relu``, then ``head`` (Linear): two activation sites (one in
    the backbone, one outside it) and three weight layers.

    Args:
        hidden: Width of the hidden layers.
        lr: Adam's learning rate.
        freeze_backbone: Freeze the backbone in ``__init__`` (``requires_grad_(False)``), as users do.
        batch_size: Training batch size (96 samples: 6 batches of 16 per epoch by default).
    """

    def __init__(self, hidden: int = 16, lr: float = 1e-2, freeze_backbone: bool = False, batch_size: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.relu = nn.ReLU()
        self.head = nn.Linear(hidden, 3)
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.backbone(x)))

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    def train_dataloader(self):
        return DataLoader(toy_data(), batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        return DataLoader(toy_data(32, seed=1), batch_size=16)


class MLPNet(_Classifier):
    """``fc1, relu1, fc2, relu2, fc3`` (Linear layers with ``nn.ReLU`` modules): two activation sites and three weight
    layers, the model most callback tests use.

    Args:
        in_features: Input features of the toy data.
        hidden: Width of the hidden layers.
        optimizer: ``"adam"`` (lr 1e-2) or ``"sgd"`` (lr 0.05, momentum 0.9, weight decay 1e-4).
        scheduler: None or one of ``"step"``, ``"cosine"``, ``"lambda"``, ``"onecycle"``, ``"cyclic"``, ``"plateau"``
            (6 batches per epoch, the step-wise ones sized for 4 epochs).
    """

    def __init__(
        self, in_features: int = 8, hidden: int = 16, optimizer: str = "adam", scheduler: str | None = None
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        kind = self.hparams.scheduler
        if kind is None:
            return opt
        step_wise = {
            "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=4 * 6),
            "cyclic": lambda: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.005, max_lr=0.05, step_size_up=5),
        }
        if kind in step_wise:
            return {"optimizer": opt, "lr_scheduler": {"scheduler": step_wise[kind](), "interval": "step"}}
        if kind == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=10.0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "train_loss"}}
        epoch_wise = {
            "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
            "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4),
            "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch)),
        }
        return {"optimizer": opt, "lr_scheduler": epoch_wise[kind]()}

    def train_dataloader(self):
        return DataLoader(toy_data(features=self.hparams.in_features), batch_size=16)

    def val_dataloader(self):
        return DataLoader(toy_data(32, features=self.hparams.in_features, seed=1), batch_size=16)


class BNNet(_Classifier):
    """``body`` (Linear, BatchNorm1d, ReLU, Linear, BatchNorm1d, ReLU) then ``head`` (Linear), with dropout: the
    BatchNorm model of the re-estimation tests.

    Args:
        split_calls: ``forward`` calls the body's layers one by one instead of ``body`` itself.
    """

    def __init__(self, split_calls: bool = False) -> None:
        super().__init__()
        self.split_calls = split_calls
        self.body = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU()
        )
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(16, 3)
        self.example_input_array = torch.randn(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_calls:
            for layer in self.body:
                x = layer(x)
        else:
            x = self.body(x)
        return self.head(self.dropout(x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return DataLoader(toy_data(), batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(toy_data(32, seed=1), batch_size=16)


def make_trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    """A minimal CPU Trainer: no logger, no progress bar, no checkpoints unless asked."""
    defaults = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


@pytest.fixture
def toy_net() -> ToyNet:
    torch.manual_seed(0)
    return ToyNet()
