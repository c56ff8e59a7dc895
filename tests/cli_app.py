"""A plain LightningCLI app over the shared toy model, run by tests/test_cli.py as a user would run theirs.

After fitting it prints one line, ``STATE <json>``, with the state of every lightning_quant callback it trained with.
"""

from __future__ import annotations

import json

from conftest import ToyNet
from lightning.pytorch.cli import LightningCLI

from lightning_quant import QuantizationCallback

if __name__ == "__main__":
    cli = LightningCLI(ToyNet, save_config_callback=None)
    states = [cb.state_dict() for cb in cli.trainer.callbacks if isinstance(cb, QuantizationCallback)]
    print("STATE " + json.dumps(states), flush=True)
