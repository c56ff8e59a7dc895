"""LightningCLI: the callbacks and their schedules from the command line and from a YAML config, with a plain
``LightningCLI(MyModule)`` and no extra settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).with_name("cli_app.py")
TRAINER = [
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=1",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _run(args: list[str], cwd: Path) -> list[dict]:
    result = subprocess.run([sys.executable, str(APP), "fit", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("STATE "))
    return json.loads(line.removeprefix("STATE "))


@pytest.mark.slow
def test_schedule_from_a_yaml_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  callbacks:
    - class_path: lightning_quant.DSQCallback
      init_args:
        act_bits: 3
        first_last: quantize
        temperature:
          class_path: lightning_quant.schedules.LinearSchedule
          init_args: {start: 0.4, end: 0.05}
"""
    )
    (state,) = _run([f"--config={config}", *TRAINER], tmp_path)
    assert state["config"]["act_bits"] == 3
    assert state["schedules"] == {"temperature": {"type": "LinearSchedule", "start": 0.4, "end": 0.05}}


@pytest.mark.slow
def test_callback_from_the_command_line(tmp_path):
    args = ["--trainer.callbacks+=lightning_quant.PACTCallback", "--trainer.callbacks.act_bits=2", *TRAINER]
    (state,) = _run(args, tmp_path)
    assert state["config"]["method"] == "pact" and state["config"]["act_bits"] == 2
