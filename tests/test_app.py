"""The Hydra app (examples/train.py + conf/): config composition in-process, then real runs as subprocesses.

Every subprocess trains one epoch of three batches, so each run costs little more than Python's start-up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import lightning_quant
import lightning_quant.demos

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


def subprocess_env() -> dict[str, str]:
    """The environment of the scripts run as subprocesses: this checkout's ``lightning_quant`` first (``python
    examples/x.py`` puts ``examples/``, not the working directory, on ``sys.path``, so an editable install of another
    checkout would win), then ``tests/`` for the probe callback (``app_probe.py``)."""
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def run_app(*overrides: str, timeout: float = 240, fails: bool = False) -> subprocess.CompletedProcess:
    """Run the app from the repository root, as a user would; fail with its output if it fails (or, with ``fails``,
    if it succeeds)."""
    proc = subprocess.run(
        [sys.executable, str(APP), *overrides],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if fails:
        assert proc.returncode != 0, f"app did not fail:\n{proc.stdout[-4000:]}"
    else:
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


# ---------------------------------------------------------------- from a trained FP32 model; ONNX export

# One full training epoch (the FP32 model must have moved away from its init), two validation and test batches.
ONE_EPOCH = [
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
]


def _train_module() -> Any:
    """``examples/train.py`` imported as a module (its helpers, without running Hydra)."""
    spec = importlib.util.spec_from_file_location("app_train", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _test_images(count: int = 64) -> torch.Tensor:
    """The first test images of the app's digits split (seed 0, the app's default)."""
    datamodule = lightning_quant.demos.DigitsDataModule(seed=0)
    datamodule.setup()
    return datamodule.test_set.tensors[0][:count]


def _onnx_ops(path: str | Path) -> set[str]:
    onnx = pytest.importorskip("onnx")
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _onnx_outputs(path: str | Path, x: torch.Tensor) -> np.ndarray:
    pytest.importorskip("onnxruntime")
    from lightning_quant.export import onnxruntime_session

    session = onnxruntime_session(path)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One FP32 epoch on digits, with export on (quant=none: a float ONNX model)."""
    folder = tmp_path_factory.mktemp("fp32")
    return folder, run_app("quant=none", *ONE_EPOCH, "export.onnx=true", f"hydra.run.dir={folder}")


@pytest.fixture(scope="module")
def pact_run(
    fp32_run: tuple[Path, subprocess.CompletedProcess], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess]:
    """PACT W4A4 fine-tuned for one epoch from ``fp32_run`` (its folder) at lr 2e-4, exported, with the probe."""
    _needs("PACTCallback")
    folder = tmp_path_factory.mktemp("pact")
    proc = run_app(
        "quant=pact",
        f"init_from={fp32_run[0]}",
        "model.lr=2e-4",
        "export.onnx=true",
        *ONE_EPOCH,
        f"hydra.run.dir={folder}",
        "+trainer.callbacks.probe._target_=app_probe.WeightProbe",
        f"+trainer.callbacks.probe.path={folder / 'probe.pt'}",
    )
    return folder, proc


def test_qat_starts_from_the_fp32_checkpoint(fp32_run, pact_run) -> None:
    fp32, pact = read_results(fp32_run[0]), read_results(pact_run[0])
    assert pact["init_from"] == fp32["checkpoint"] and fp32["init_from"] is None
    float_state = torch.load(fp32["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    probe = torch.load(pact_run[0] / "probe.pt", map_location="cpu", weights_only=True)
    started = probe["state_dict"]
    # The probe saw the injected model (quantizer state beside the float weights)...
    assert any(k.endswith(".alpha") for k in started) and any("weight_quantizer" in k for k in started)
    # ...whose every float weight and BatchNorm statistic was the FP32 checkpoint's when training started.
    for key, value in float_state.items():
        assert torch.equal(started[key], value), key
    # The check can fail: without init_from the app builds seed-0 weights, which the FP32 epoch has moved.
    L.seed_everything(0)
    fresh = lightning_quant.demos.DemoCNN().state_dict()
    assert not torch.equal(fresh["conv2.weight"], float_state["conv2.weight"])
    # model.lr=2e-4 is the weights' fine-tuning lr (PACT's clips have their own group).
    assert 2e-4 in probe["lrs"]
    assert 0.0 <= pact["test_acc"] <= 1.0 and pact["quant"] == "pact" and pact["epochs"] == 1


def test_onnx_export_matches_the_quantized_checkpoint(pact_run) -> None:
    folder, proc = pact_run
    results = read_results(folder)
    assert results["onnx"] == str(folder / "model.onnx") and (folder / "model.onnx").is_file()
    assert f"EXPORT onnx={folder / 'model.onnx'}" in proc.stdout
    model = lightning_quant.load_from_checkpoint(lightning_quant.demos.DemoCNN, results["checkpoint"])
    x = _test_images()
    with torch.no_grad():
        ref = model(x).numpy()
    out = _onnx_outputs(folder / "model.onnx", x)
    assert out.shape == ref.shape == (len(x), 10)
    np.testing.assert_array_equal(out.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())
    assert {"QuantizeLinear", "DequantizeLinear"} <= _onnx_ops(folder / "model.onnx")


def test_onnx_export_of_a_float_run_is_a_float_model(fp32_run) -> None:
    folder, proc = fp32_run
    results = read_results(folder)
    assert results["onnx"] == str(folder / "model.onnx") and f"EXPORT onnx={results['onnx']}" in proc.stdout
    model = lightning_quant.demos.DemoCNN.load_from_checkpoint(results["checkpoint"], map_location="cpu").eval()
    x = _test_images()
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_onnx_outputs(results["onnx"], x), ref, rtol=1e-4, atol=1e-5)
    assert not _onnx_ops(results["onnx"]) & {"QuantizeLinear", "DequantizeLinear"}


def test_init_from_a_missing_path_fails_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.ckpt"
    proc = run_app("quant=pact", f"init_from={missing}", *FAST, f"hydra.run.dir={tmp_path / 'run'}", fails=True)
    assert f"no checkpoint at {str(missing)!r}" in proc.stderr and "FileNotFoundError" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_init_from_refuses_wrong_checkpoints(fp32_run, pact_run, tmp_path: Path) -> None:
    app = _train_module()
    cnn = lightning_quant.demos.DemoCNN
    # A QAT run's checkpoint: quantizer state, refused by name.
    pact_ckpt = read_results(pact_run[0])["checkpoint"]
    with pytest.raises(ValueError, match="holds quantizer state") as err:
        app.load_float_weights(cnn(), pact_ckpt)
    assert pact_ckpt in str(err.value) and ".alpha" in str(err.value)
    # Another model (or config) than the checkpoint's: the strict load's error, with the path.
    with pytest.raises(ValueError, match="does not fit DemoMLP") as err:
        app.load_float_weights(lightning_quant.demos.DemoMLP(), str(fp32_run[0]))
    assert read_results(fp32_run[0])["checkpoint"] in str(err.value)
    with pytest.raises(ValueError, match="does not fit DemoCNN"):
        app.load_float_weights(cnn(width=16), str(fp32_run[0]))
    # A folder that is no run folder.
    with pytest.raises(FileNotFoundError, match="holds no results.json"):
        app.load_float_weights(cnn(), str(tmp_path))
    # The checkpoint file itself works as well as its run folder.
    checkpoint = read_results(fp32_run[0])["checkpoint"]
    assert str(app.load_float_weights(cnn(), checkpoint)) == checkpoint
    # A moved run folder: its results.json names the old place; the checkpoint is found at the same place inside.
    moved = tmp_path / "moved"
    inside = Path(checkpoint).relative_to(fp32_run[0])
    (moved / inside).parent.mkdir(parents=True)
    shutil.copy(checkpoint, moved / inside)
    stale = {"checkpoint": str(tmp_path / "gone" / inside), "output_dir": str(tmp_path / "gone")}
    (moved / "results.json").write_text(json.dumps(stale))
    assert app.load_float_weights(cnn(), str(moved)) == moved / inside


def test_init_from_and_export_compose() -> None:
    cfg = _compose()
    assert cfg.init_from is None and cfg.export.onnx is False
    # Lightning's checkpoint names hold '=': quoted, the override keeps the whole path.
    cfg = _compose('init_from="outputs/fp32/csv/version_0/checkpoints/epoch=7-step=144.ckpt"', "export.onnx=true")
    assert cfg.init_from.endswith("epoch=7-step=144.ckpt") and cfg.export.onnx is True


@pytest.mark.slow
def test_finetune_demo(tmp_path: Path) -> None:
    _needs("PACTCallback")
    # examples/finetune_demo.py with its defaults: FP32, then PACT W4A4 from its checkpoint, then ONNX in onnxruntime.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "finetune_demo.py"), "--out", str(tmp_path)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    acc = {}
    for name, label in (("fp32", "FP32"), ("w4a4", "W4A4"), ("onnx", "ONNX W4A4")):
        found = re.findall(rf"^{label} test acc (\d\.\d{{4}})\b", proc.stdout, flags=re.M)
        assert len(found) == 1, (label, proc.stdout[-2000:])
        acc[name] = float(found[0])
    # Sane numbers after the short run (the accuracy targets live in benchmarks/): far above chance (0.1), the
    # fine-tuned W4A4 model near its FP32 start, and onnxruntime agreeing with torch on the quantized model.
    assert 0.8 <= acc["fp32"] <= 1.0, acc
    assert acc["w4a4"] >= acc["fp32"] - 0.10, acc
    assert abs(acc["onnx"] - acc["w4a4"]) <= 0.01, acc
    assert (tmp_path / "model.onnx").is_file() and list((tmp_path / "fp32" / "checkpoints").glob("*.ckpt"))


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
