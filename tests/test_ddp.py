"""Real 2-process DDP on CPU (gloo): every rank ends with the same alphas; ddp_spawn warns and the result loads."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_script.py")


def _run(strategy: str, out: Path, method: str = "pact") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), strategy, str(out), method], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _load_ranks(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    return rank0, rank1


def _check_ranks_identical_and_trained(out: Path) -> dict[str, torch.Tensor]:
    rank0, _ = _load_ranks(out)
    alpha_keys = [k for k in rank0 if k.endswith("alpha")]
    assert alpha_keys == ["relu1.alpha", "relu2.alpha"]
    for key in alpha_keys:
        # Calibrated from the data (6 is the placeholder before), identically on both ranks (checked above).
        assert bool(rank0[key.replace("alpha", "calibrated")].all()), f"{key} never calibrated"
        assert not torch.equal(rank0[key], torch.full_like(rank0[key], 6.0)), f"{key} never calibrated"
    return rank0


@pytest.mark.slow
def test_ddp_two_processes_identical_alphas_logged_once(tmp_path):
    proc = _run("ddp", tmp_path)
    rank0 = _check_ranks_identical_and_trained(tmp_path)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert all(torch.equal(loaded[k], rank0[k]) for k in rank0)
    # The plan is printed once (rank zero), and one logger folder holds the clips.
    assert proc.stdout.count("PACTCallback: quantization plan of Net") == 1
    versions = list((tmp_path / "logs").iterdir())
    assert len(versions) == 1
    rows = list(csv.DictReader(open(versions[0] / "metrics.csv")))
    assert [r for r in rows if r.get("pact/alpha/relu1")]
    # strategy="ddp" runs fit in this process too: the user's model holds the trained quantizers.
    assert "relu1.alpha" in json.loads((tmp_path / "main.json").read_text())["main_model_keys"]


@pytest.mark.slow
def test_ddp_spawn_warns_and_load_from_checkpoint_recovers(tmp_path):
    proc = _run("ddp_spawn", tmp_path)
    rank0 = _check_ranks_identical_and_trained(tmp_path)
    assert "drops the quantizer parameters" in proc.stderr
    assert "lightning_quant.load_from_checkpoint(YourModule, checkpoint_path)" in proc.stderr
    # Lightning's strict=False copy-back left the user's object without quantizers, as the warning says ...
    assert "relu1.alpha" not in json.loads((tmp_path / "main.json").read_text())["main_model_keys"]
    # ... and the one call named in the warning gives the trained model.
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert all(torch.equal(loaded[k], rank0[k]) for k in rank0)


@pytest.mark.slow
def test_ddp_dsq_ranks_share_calibrated_ranges(tmp_path):
    _run("ddp", tmp_path, "dsq")
    rank0, _ = _load_ranks(tmp_path)
    # Each rank saw a different first batch; the reduced calibration and DDP keep them identical.
    assert bool(rank0["relu1.calibrated"].all()) and float(rank0["relu1.upper"][0]) != 6.0
    assert {"relu1.lower", "relu1.upper", "fc2.weight_quantizer.lower"} <= set(rank0)


@pytest.mark.slow
def test_ddp_quant_noise_stored_weights_identical(tmp_path):
    _run("ddp", tmp_path, "quant_noise")
    rank0, _ = _load_ranks(tmp_path)
    assert float(rank0["fc1.weight_quantizer.p"]) == 0.5


@pytest.mark.slow
def test_ddp_batchnorm_reestimated_identically_on_every_rank(tmp_path):
    _run("ddp", tmp_path, "pact_bn")
    rank0, _ = _load_ranks(tmp_path)  # running statistics included: re-estimated per rank, then averaged
    # 3 re-estimation batches, where the running average of 8 training steps would count 8.
    assert int(rank0["bn1.num_batches_tracked"]) == 3
