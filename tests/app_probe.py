"""A probe callback for the app tests (``tests/test_app.py``), added to a run with a ``trainer.callbacks`` override.

Not a test module: the app's subprocess imports it (the test puts ``tests/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import lightning as L
import torch


class WeightProbe(L.Callback):
    """Save the model's ``state_dict`` and the optimizer's learning rates when training starts, before any step.

    By then the quant callback has injected its quantizers (in ``setup``) and the sanity check has run (eval mode, no
    BatchNorm update), so the float weights are those the run started from.

    Args:
        path: Where to ``torch.save`` ``{"state_dict": ..., "lrs": [...]}``.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        lrs = [group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups]
        torch.save({"state_dict": state, "lrs": lrs}, self.path)
