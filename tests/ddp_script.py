"""Trains a small model with PACTCallback under a 2-process CPU DDP strategy; run by tests/test_ddp.py.

A script, not a test module: `strategy="ddp"` relaunches the running command once per extra rank, which must be
this script, not pytest. Every rank saves its final parameters to ``<out>/rank<r>.pt``.

Usage: python tests/ddp_script.py <ddp|ddp_spawn> <out dir> [pact|dsq|quant_noise]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import DSQCallback, PACTCallback, QuantNoiseCallback, load_from_checkpoint


class Net(L.LightningModule):
    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1 = nn.Linear(8, 16)
        self.bn1 = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.bn1(self.fc1(x))))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(128, 8, generator=g)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()), batch_size=16)


class SaveRankState(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


CALLBACKS = {
    # Clips calibrated from each rank's own first batch, averaged across ranks: the ranks must still start alike.
    "pact": lambda: PACTCallback(act_bits=3, weight_bits=3, first_last="quantize", alpha_lr=0.05),
    "dsq": lambda: DSQCallback(act_bits=2, weight_bits=2, first_last="quantize", quantizer_lr=0.05),
    "quant_noise": lambda: QuantNoiseCallback(bits=4, p=0.5),
    # Each rank re-estimates BatchNorm on its own last 3 inputs at the end; the average must leave them identical.
    "pact_bn": lambda: PACTCallback(act_bits=3, weight_bits=3, reestimate_bn=3),
}


def main(strategy: str, out: Path, method: str = "pact") -> None:
    out.mkdir(parents=True, exist_ok=True)
    # A different seed per rank would make ranks start apart; DDP must still end them identical.
    L.seed_everything(0)
    model = Net(batchnorm=method.endswith("_bn"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=2,
        logger=CSVLogger(out, name="logs"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            CALLBACKS[method](),
            SaveRankState(out),
            ModelCheckpoint(dirpath=out / "ckpt", save_last=True),
        ],
        default_root_dir=out,
    )
    trainer.fit(model)
    if trainer.global_rank == 0:
        loaded = load_from_checkpoint(Net, out / "ckpt" / "last.ckpt")
        torch.save(loaded.state_dict(), out / "loaded.pt")
        summary = {"main_model_keys": sorted(model.state_dict())}
        (out / "main.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
