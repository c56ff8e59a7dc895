"""The post-training app (examples/ptq.py + conf/ptq.yaml), run as a user would, on a float checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_quant import export_onnx, load_from_checkpoint
from lightning_quant.demos import DemoCNN

ROOT = Path(__file__).resolve().parents[1]


def test_ptq_app_writes_a_loadable_exportable_checkpoint(tmp_path):
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    fp32 = DemoCNN(in_channels=1, num_classes=10, input_size=8)
    torch.save({"state_dict": fp32.state_dict(), "hyper_parameters": dict(fp32.hparams)}, tmp_path / "fp32.ckpt")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "ptq.py"),
            f"model.checkpoint={tmp_path / 'fp32.ckpt'}",
            "ptq.steps=2",
            "ptq.calibration_batches=1",
            "trainer.limit_test_batches=2",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "RESULT ptq act_bits=4 weight_bits=8" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    model = load_from_checkpoint(DemoCNN, out / "ptq.ckpt")
    x = torch.randn(2, 1, 8, 8)
    assert not torch.equal(model(x), fp32.eval()(x))  # quantized
    assert results["checkpoint"] == str(out / "ptq.ckpt")
    assert Path(export_onnx(model, x, tmp_path / "ptq.onnx")).exists()
