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


class ToyNet(L.LightningModule):
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

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    def train_dataloader(self):
        return DataLoader(toy_data(), batch_size=self.hparams.batch_size)

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
