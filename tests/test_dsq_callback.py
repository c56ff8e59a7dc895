"""DSQCallback in real Trainer runs: calibration, temperature schedule and resume, learned temperature, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import MLPNet, make_trainer, toy_data
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import DSQCallback, load_from_checkpoint
from lightning_quant.optim import GROUP_NAME
from lightning_quant.quantizers.dsq import DSQActivation, DSQWeight
from lightning_quant.schedules import CosineSchedule, LinearSchedule


class FirstStep(L.Callback):
    """Captures the activation ranges after the first forward/backward, before the optimizer moves them."""

    def __init__(self):
        self.ranges = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.ranges is None:
            self.ranges = {
                n: (m.lower.detach().clone(), m.upper.detach().clone())
                for n, m in pl_module.named_modules()
                if isinstance(m, DSQActivation)
            }


@pytest.mark.parametrize("calibration", ["mse", "max"])
def test_activation_ranges_calibrate_from_the_first_batch_and_train_in_their_group(tmp_path, calibration):
    from lightning_quant import inject_quantizers
    from lightning_quant.calibration import mse_clip

    torch.manual_seed(0)
    model = MLPNet()
    cb = DSQCallback(
        act_bits=2,
        weight_bits=2,
        first_last="quantize",
        quantizer_lr=0.05,
        calibration=calibration,
        quantize_inputs=False,
    )
    inject_quantizers(model, cb.config)  # the callback's own injection is then a no-op
    x0 = toy_data()[:16][0]
    with torch.no_grad():
        pre = model.fc1(x0)  # fc1's weights are quantized in this forward too
    expected_upper = mse_clip(pre, 2).float() if calibration == "mse" else F.relu(pre).max()
    first = FirstStep()
    trainer = make_trainer(tmp_path, [cb, first])
    trainer.fit(model)
    lower, upper = first.ranges["relu1"]
    assert float(lower) == 0.0 and torch.allclose(upper, expected_upper)
    # weight ranges start at each weight's [min, max] (checked after fit: moved by training but calibrated)
    assert all(bool(m.calibrated.all()) for m in model.modules() if isinstance(m, DSQActivation))
    group = trainer.optimizers[0].param_groups[-1]
    assert group["name"] == GROUP_NAME and group["lr"] == 0.05
    quantizer_params = {
        id(p) for m in model.modules() if isinstance(m, (DSQActivation, DSQWeight)) for p in m.parameters()
    }
    assert {id(p) for p in group["params"]} == quantizer_params
    assert not torch.equal(model.relu1.upper.detach(), upper), "the range never trained"
    assert cb._calibrator is None  # hooks removed once every site was calibrated


def test_weight_range_starts_at_min_max():
    from lightning_quant import inject_quantizers
    from lightning_quant.config import DSQConfig

    torch.manual_seed(0)
    model = MLPNet()
    w = model.fc2.weight.detach().clone()
    inject_quantizers(model, DSQConfig(act_bits=4, weight_bits=4))
    assert float(model.fc2.weight_quantizer.lower) == pytest.approx(float(w.min()))
    assert float(model.fc2.weight_quantizer.upper) == pytest.approx(float(w.max()))


def test_temperature_schedule_logged_and_applied(tmp_path):
    torch.manual_seed(0)
    schedule = CosineSchedule(0.4, 0.05)
    logger = CSVLogger(tmp_path, name="logs")
    seen = {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.current_epoch] = (
                float(pl_module.relu1.temperature[0]),
                float(pl_module.fc2.weight_quantizer.get_temperature()),
            )

    cb = DSQCallback(temperature=schedule, schedule_by="epoch")
    make_trainer(tmp_path, [cb, Record()], max_epochs=4, logger=logger).fit(MLPNet())
    for epoch in range(4):
        assert seen[epoch] == pytest.approx((schedule(epoch, 4), schedule(epoch, 4)), rel=1e-6)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = [float(r["dsq/temperature"]) for r in rows if r.get("dsq/temperature")]
    assert logged == pytest.approx([schedule(e, 4) for e in range(4)], rel=1e-6)
    assert any(r.get("dsq/upper/relu1") for r in rows) and any(r.get("dsq/lower/fc2.weight") for r in rows)


def test_resume_continues_the_temperature_exactly(tmp_path):
    schedule = LinearSchedule(0.5, 0.1)

    class StopAfter(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                trainer.should_stop = True

    def run(max_epochs, root, ckpt_path=None, stop=False):
        torch.manual_seed(0)
        seen = {}

        class Record(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen[trainer.current_epoch] = float(pl_module.relu1.temperature[0])

        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True)
        trainer = make_trainer(
            tmp_path / root,
            [DSQCallback(temperature=schedule, schedule_by="epoch"), Record(), ckpt] + ([StopAfter()] if stop else []),
            max_epochs=max_epochs,
            enable_checkpointing=True,
        )
        model = MLPNet()
        trainer.fit(model, ckpt_path=ckpt_path)
        return seen, model

    full, full_model = run(4, "full")
    # Same max_epochs in both halves: the schedule is a function of (epoch, max_epochs).
    stopped, _ = run(4, "part", stop=True)
    assert list(stopped) == [0, 1, 2]
    resumed, resumed_model = run(4, "part", str(tmp_path / "part" / "last.ckpt"))
    assert list(resumed) == [3] and resumed[3] == full[3] == pytest.approx(schedule(3, 4))
    for (name, p), q in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name


def test_learned_temperature_stays_inside_and_is_logged(tmp_path):
    torch.manual_seed(0)
    logger = CSVLogger(tmp_path, name="logs")
    model = MLPNet()
    cb = DSQCallback(temperature=0.3, learn_temperature=True, first_last="quantize", quantizer_lr=0.1)
    make_trainer(tmp_path, [cb], logger=logger, max_epochs=3).fit(model)
    alpha = model.relu1.get_temperature().detach()
    assert bool(((alpha > 0) & (alpha < 1)).all())
    assert not torch.allclose(alpha, torch.full_like(alpha, 0.3)), "the temperature never learned"
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    assert any(r.get("dsq/temperature/relu1") for r in rows)
    assert not any(r.get("dsq/temperature") for r in rows)


def test_load_from_checkpoint_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = MLPNet()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(tmp_path, [DSQCallback(act_bits=3, weight_bits=3), ckpt], enable_checkpointing=True).fit(model)
    loaded = load_from_checkpoint(MLPNet, tmp_path / "last.ckpt")
    model.eval()
    x = torch.randn(10, 8)
    assert torch.equal(loaded(x), model(x))


def test_non_finite_first_batch_does_not_poison_the_range(tmp_path):
    class Poisoned(MLPNet):
        def train_dataloader(self):
            data = toy_data()
            x, y = data.tensors
            x = x.clone()
            x[0, :] = float("inf")
            x[1, :] = float("nan")
            return DataLoader(TensorDataset(x, y), batch_size=16)

    torch.manual_seed(0)
    model = Poisoned()
    first = FirstStep()
    make_trainer(tmp_path, [DSQCallback(first_last="quantize"), first], max_epochs=1, limit_train_batches=1).fit(model)
    lower, upper = first.ranges["relu1"]
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all() and float(upper) > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, r"`temperature` must stay inside \(0\.0, 1\.0\)"),
        ({"temperature": 1.0}, r"`temperature` must stay inside \(0\.0, 1\.0\)"),
        ({"temperature": 1.5}, r"`temperature` must stay inside \(0\.0, 1\.0\)"),
        ({"temperature": LinearSchedule(0.5, 1.0)}, r"`temperature` must stay inside .*LinearSchedule"),
        ({"temperature": CosineSchedule(0.4, 0.1), "learn_temperature": True}, r"must be a number when"),
        ({"act_bits": 0}, r"`act_bits` must be an int in 1\.\.16"),
        ({"weight_bits": 17}, r"`weight_bits` must be an int in 1\.\.16"),
        ({"quantizer_lr": -1.0}, r"`quantizer_lr` must be a finite number > 0, got -1\.0"),
        ({"quantizer_weight_decay": -1.0}, r"`quantizer_weight_decay` must be a finite number >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSQCallback(**kwargs)


def test_activation_lower_bound_stays_at_zero_unless_asked():
    x = torch.relu(torch.randn(256))
    for learn_lower in (False, True):
        module = DSQActivation(bits=2, learn_lower=learn_lower)
        module.calibrate(x, 0)
        module(x).sum().backward()
        if learn_lower:
            assert module.lower.grad is not None and float(module.lower.grad.abs().sum()) > 0
        else:  # the exact zeros at x = l would drag a learned l away from 0 (see DSQActivation's docstring)
            assert module.lower.grad is None and float(module.lower) == 0.0
        assert module.upper.grad is not None


def test_learn_activation_lower_option_reaches_the_modules(tmp_path):
    torch.manual_seed(0)
    model = MLPNet()
    cb = DSQCallback(first_last="quantize", learn_activation_lower=True, quantizer_lr=0.05)
    make_trainer(tmp_path, [cb], max_epochs=1).fit(model)
    assert model.relu1.lower.requires_grad and float(model.relu1.lower) != 0.0
    assert not DSQCallback().config.learn_activation_lower
    with pytest.raises(ValueError, match="`learn_activation_lower` must be a bool"):
        DSQCallback(learn_activation_lower="yes")
