"""The Hydra app (examples/train.py + conf/): config composition in-process, then real runs as subprocesses.

Every subprocess trains one epoch of three batches, so each run costs little more than Python's start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import lightning_quant

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "train.py"
CONF = ROOT / "conf"
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
]


def _needs(name: str) -> None:
    # The method callbacks land one by one; a config for one that is not there yet is skipped, not failed.
    if not hasattr(lightning_quant, name):
        pytest.skip(f"lightning_quant.{name} is not available yet")


def run_app(*overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the app from the repository root, as a user would; fail with its output if it fails."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(APP), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"app failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def read_results(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "results.json").read_text())


def find_key(tree: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a nest of dicts and lists."""
    found = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                found.append(v)
            found += find_key(v, key)
    elif isinstance(tree, list):
        for v in tree:
            found += find_key(v, key)
    return found


# ---------------------------------------------------------------- composition (in-process, no training)


def _compose(*overrides: str, hydra_node: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra_node)


def test_defaults_compose() -> None:
    cfg = _compose()
    assert cfg.data.name == "digits" and cfg.quant.name == "none" and cfg.quant.callback is None
    assert cfg.model._target_ == "lightning_quant.demos.DemoCNN"
    assert cfg.trainer.max_epochs == 8 and cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1
    assert cfg.trainer.enable_checkpointing is True
    assert cfg.trainer.logger._target_.endswith("CSVLogger")
    assert cfg.model.input_size == 8 and cfg.data.datamodule.seed == cfg.seed
    callbacks = _compose(hydra_node=True).hydra.callbacks
    assert callbacks.results_table._target_ == "lightning_quant.demos.hydra_summary.ResultsTable"


@pytest.mark.parametrize("quant", ["none", "pact", "dsq", "quant_noise"])
def test_every_quant_option_takes_bit_overrides(quant: str) -> None:
    # A sweep such as `-m quant=none,pact,dsq,quant_noise quant.act_bits=2,4` must compose for every option.
    cfg = _compose(f"quant={quant}", "quant.act_bits=2", "quant.weight_bits=3")
    quant_cfg = OmegaConf.to_container(cfg.quant, resolve=True)
    assert quant_cfg["name"] == quant
    callback = quant_cfg["callback"]
    if quant == "none":
        assert callback is None
    elif quant == "quant_noise":
        assert callback["_target_"] == "lightning_quant.QuantNoiseCallback"
        assert "act_bits" not in callback and callback["bits"] == 4
    else:
        assert callback["act_bits"] == 2 and callback["weight_bits"] == 3


def test_schedule_nodes_instantiate() -> None:
    dsq = _compose(
        "quant=dsq",
        "quant.learn_temperature=false",
        "quant.temperature={_target_:lightning_quant.schedules.CosineSchedule,start:0.3,end:0.1}",
    )
    temperature = instantiate(dsq.quant.callback.temperature)
    assert type(temperature).__name__ == "CosineSchedule"
    assert temperature(0, 5) == pytest.approx(0.3) and temperature(4, 5) == pytest.approx(0.1)
    callback = instantiate(dsq.quant.callback)
    assert callback.schedules["temperature"] == temperature and not callback.config.learn_temperature
    learned = instantiate(_compose("quant=dsq").quant.callback)
    assert learned.config.learn_temperature and learned.config.temperature == 0.2
    noise = _compose("quant=quant_noise", "quant.bits=8")
    assert noise.quant.callback.bits == 8 and noise.quant.weight_bits == 8
    assert type(instantiate(noise.quant.callback.p)).__name__ == "LinearSchedule"
    fixed = _compose("quant=quant_noise", "quant.p=0.5")
    assert fixed.quant.callback.p == 0.5


def test_data_config_feeds_the_model() -> None:
    cfg = _compose("data=mnist5k", "model=mlp")
    assert cfg.model.input_size == 28 and cfg.model.in_channels == 1 and cfg.model.num_classes == 10
    model = instantiate(cfg.model)
    assert model.hparams.input_size == 28
    assert cfg.data.datamodule._target_.endswith("MNIST5kDataModule")


def test_design_doc_overrides_compose() -> None:
    cfg = _compose("quant=dsq", "trainer.devices=2", "trainer.strategy=ddp")
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2
    assert _compose().trainer.strategy == "auto"


@pytest.mark.parametrize("trainer", ["ddp", "ddp_spawn"])
def test_ddp_trainers_extend_cpu(trainer: str) -> None:
    cfg = _compose(f"trainer={trainer}")
    assert cfg.trainer.strategy == trainer and cfg.trainer.devices == 2
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_epochs == 8 and "logger" in cfg.trainer


# ---------------------------------------------------------------- runs (subprocesses)


def test_float_run_writes_results(tmp_path: Path) -> None:
    proc = run_app("quant=none", *FAST, f"hydra.run.dir={tmp_path}")
    results = read_results(tmp_path)
    assert results["quant"] == "none" and results["act_bits"] is None and results["weight_bits"] is None
    assert 0.0 <= results["test_acc"] <= 1.0 and results["epochs"] == 1
    assert results["world_size"] == 1 and results["callback"] is None
    assert f"RESULT quant=none act_bits=None weight_bits=None test_acc={results['test_acc']:.4f}" in proc.stdout
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    assert list(tmp_path.glob("csv/version_0/metrics.csv")) and not list(tmp_path.glob("csv/version_1"))
    assert results["checkpoint"] and Path(results["checkpoint"]).exists()


def test_pact_run_gets_act_bits_override(tmp_path: Path) -> None:
    _needs("PACTCallback")
    proc = run_app("quant=pact", "quant.act_bits=2", *FAST, f"hydra.run.dir={tmp_path}")
    results = read_results(tmp_path)
    assert results["quant"] == "pact" and results["act_bits"] == 2 and results["weight_bits"] == 4
    assert results["quant_config"]["callback"]["act_bits"] == 2
    assert results["callback"]["class"].endswith("PACTCallback")
    # What the instantiated callback holds, not only what the config said.
    held = find_key(results["callback"]["attrs"], "act_bits")
    assert held and all(v == 2 for v in held), held
    assert "RESULT quant=pact act_bits=2 weight_bits=4 test_acc=" in proc.stdout


def test_sweep_over_methods_and_bits(tmp_path: Path) -> None:
    _needs("PACTCallback")
    proc = run_app("-m", "quant=none,pact", "quant.act_bits=2,4", *FAST, f"hydra.sweep.dir={tmp_path}")
    rows = [read_results(p.parent) for p in sorted(tmp_path.glob("*/results.json"))]
    assert len(rows) == 4
    combos = {(r["quant"], next(o for o in r["overrides"] if o.startswith("quant.act_bits="))) for r in rows}
    assert combos == {(q, f"quant.act_bits={b}") for q in ("none", "pact") for b in (2, 4)}
    assert {(r["quant"], r["act_bits"]) for r in rows} == {("none", None), ("pact", 2), ("pact", 4)}
    assert sorted(r["job_num"] for r in rows) == [0, 1, 2, 3]
    # The Hydra callback's table and its summary file.
    assert "[results] 4 job(s)" in proc.stdout and proc.stdout.count("RESULT quant=") == 4
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 4


def test_sweep_over_all_methods(tmp_path: Path) -> None:
    _needs("DSQCallback")
    _needs("QuantNoiseCallback")
    # The issues' sweep: every method in one -m run.
    run_app("-m", "quant=none,pact,dsq,quant_noise", *FAST, f"hydra.sweep.dir={tmp_path}")
    rows = {r["quant"]: r for r in (read_results(p.parent) for p in tmp_path.glob("*/results.json"))}
    assert set(rows) == {"none", "pact", "dsq", "quant_noise"}
    assert rows["dsq"]["act_bits"] == 4 and rows["dsq"]["callback"]["class"].endswith("DSQCallback")
    assert rows["quant_noise"]["act_bits"] is None and rows["quant_noise"]["weight_bits"] == 4


@pytest.mark.slow
def test_ddp_single_run(tmp_path: Path) -> None:
    quant = "pact" if hasattr(lightning_quant, "PACTCallback") else "none"
    proc = run_app("trainer=ddp", f"quant={quant}", *FAST, f"hydra.run.dir={tmp_path}")
    results = read_results(tmp_path)
    assert results["world_size"] == 2 and results["strategy"] == "DDPStrategy" and results["quant"] == quant
    # Lightning relaunched the script for rank 1 into the same run dir; only rank 0 reported.
    assert (tmp_path / "train_ddp_process_1.log").exists()
    assert proc.stdout.count("RESULT quant=") == 1


@pytest.mark.slow
def test_ddp_spawn_sweep(tmp_path: Path) -> None:
    _needs("PACTCallback")
    proc = run_app("-m", "trainer=ddp_spawn", "quant=none,pact", *FAST, f"hydra.sweep.dir={tmp_path}", timeout=400)
    rows = [read_results(p.parent) for p in sorted(tmp_path.glob("*/results.json"))]
    assert sorted(r["quant"] for r in rows) == ["none", "pact"]
    assert all(r["world_size"] == 2 and r["strategy"] == "DDPStrategy" for r in rows)
    assert "[results] 2 job(s)" in proc.stdout
    # One logger folder per job: fit and test workers share the version fixed in the main process.
    assert not list(tmp_path.glob("*/csv/version_1"))
